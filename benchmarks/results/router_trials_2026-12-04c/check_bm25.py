"""BM25 (bm25s) recomputed on the CPU benchmark's query sets, from the same haystack plans, against the committed
per-query BM25 ranks that probe_last_layers.py pairs with (cloze_gap_2026-12-04/bench_quality_cpu_seedN.json).
Usage: python check_bm25.py 0 1 2 3   (prints, per set and size, how many of the 200 ranks repeat, and
recall@16 per kind recomputed)"""
import json
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_quality as bq  # noqa: E402

COMMITTED = ROOT / "benchmarks" / "results" / "cloze_gap_2026-12-04"


def main() -> None:
    warnings.simplefilter("ignore")
    from msa_memory.encode import RouterAdapter

    default = RouterAdapter.load("default")
    sizes = [16384, 131072, 1048576]
    out = {}
    for seed in map(int, sys.argv[1:]):
        ev = bq.seed_eval(default, seed, sizes, ROOT / ".bench" / "quality")
        passages, queries = ev["passages"], ev["queries"]
        committed = json.loads((COMMITTED / f"bench_quality_cpu_seed{seed}.json").read_text())
        for S in sizes:
            rk = {}
            for docs, qidx in ev["plans"][S]:
                s = bq.bm25_scores([passages[d] for d in docs], [queries[i].text for i in qidx])
                for j, i in enumerate(qidx):
                    pos = [docs.index(p) for p in queries[i].positives]
                    rk[i] = bq.positive_rank(s[j], pos)
            ranks = [rk[i] for i in range(len(queries))]
            cr = committed["results"][str(S)]["_positive_rank"]["BM25 (bm25s)"]
            same = sum(a == b for a, b in zip(ranks, cr))
            r16 = {k: sum(ranks[i] <= 16 for i, q in enumerate(queries) if q.kind == k) /
                   sum(q.kind == k for q in queries) for k in ("fact", "ict")}
            same16 = sum((a <= 16) == (b <= 16) for a, b in zip(ranks, cr))
            out[f"{seed}/{S}"] = {"ranks_repeat": same, "top16_repeat": same16, "r16": r16}
            print(f"set {seed} size {S}: {same}/200 ranks and {same16}/200 top-16 hits repeat the committed run; "
                  f"recall@16 needles {r16['fact']:.2f} cloze {r16['ict']:.2f}", flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
