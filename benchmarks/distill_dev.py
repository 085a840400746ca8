"""Fast dev-set check of router adapters on CISI / MED (a development set: never trained on).

For quick iteration on router training (``msa_memory.train.distill``); ``benchmarks/bench_retrieval.py`` stays
the reference run. Scores every judged question of the cached ``bench_retrieval`` stores (``--cache``, encoded
with the default adapter) against every passage with the runtime's own routing index (``Memory.index``: both
grids, cosine, head mean, token max, chunk max) and each adapter's query projections (question rows, and its
suffix queries at the suffix's last token), summed over its router layers as ``Memory.route`` sums them.
Adapters must have the store's router keys at their layers (trained with ``--freeze-keys`` from the default's
token-max router): others are refused. A document scores as its best passage; BM25 (bm25s) on the same passages
beside them; nDCG@10, R@16, R@100, MRR@10 and the sign test against BM25.

Run: ``python benchmarks/distill_dev.py --adapter default --adapter .bench/adapters/X``
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_retrieval import BM25, DATA, METRICS, doc_ranking, load_collection, sign_test  # noqa: E402


def adapter_scores(mem, ad, rows_sfx, rows_plain, n_sfx: int) -> np.ndarray:
    """(Q, N) document scores of every question under adapter ``ad`` against ``mem``'s routing index."""
    import torch

    ident = mem.identity
    c = ad.config
    for l in c.router_layers:
        if l not in ident.router_layers:
            raise SystemExit(f"adapter layer {l} is not a router layer of the store {list(ident.router_layers)}")
        if not torch.equal(ad.k_proj[str(l)].weight.float().cpu(), mem.model.router.k_proj[str(l)].weight.float().cpu()):
            raise SystemExit(f"adapter has other router keys than the store at layer {l}")
    last = c.query_reduce == "last"
    use_sfx = bool(c.suffix_layers) or (last and bool(c.query_suffix))
    rows = rows_sfx if use_sfx else rows_plain
    out = []
    with torch.no_grad():
        for x in rows:          # (T, L, E) one question's rows at the store's router layers
            ds = None
            for l in c.router_layers:
                p = ident.router_layers.index(l)
                xl = x[:, p].float()
                if last:
                    q = ad.router_q(l, xl[-1:])
                else:
                    q = ad.router_q(l, xl[:-n_sfx] if (c.suffix_layers and n_sfx) else xl)
                s = mem.index.doc_scores(p, q.reshape(q.shape[0], -1, c.head_dim))
                if l in c.suffix_layers:
                    sq = ad.router_sq(l, xl[-1:])
                    s = s + mem.index.doc_scores(p, sq.reshape(1, -1, c.head_dim))
                ds = s if ds is None else ds + s
            out.append(ds.float().cpu().numpy())
    return np.stack(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapter", action="append", default=[])
    ap.add_argument("--collections", default="cisi,med")
    ap.add_argument("--cache", type=Path, default=ROOT / ".bench" / "retrieval")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = ap.parse_args()
    from msa_memory.encode import RouterAdapter, load_model
    from msa_memory.runtime import Memory
    from msa_memory.store import open_store
    from msa_memory.train.features import extract_queries, suffix_tokens

    out = {}
    loaded = load_model("default")
    sfx = loaded.router.config.query_suffix
    n_sfx = len(suffix_tokens(loaded.tokenizer, sfx))
    for name in args.collections.split(","):
        queries, qrels = load_collection(DATA / name, name)
        base = args.cache / f"{name}-default"
        mem = Memory(str(base), model=loaded, source="store")
        doc_ids = np.asarray(mem.index.doc_ids)
        tab = open_store(base).documents(["doc_id", "source_path", "text"])
        pos = {int(d): i for i, d in enumerate(tab.column("doc_id").to_pylist())}
        paths = tab.column("source_path").to_pylist()
        passage_doc = [Path(paths[pos[int(d)]]).stem for d in doc_ids]     # index order
        texts = tab.column("text").to_pylist()
        qids = sorted(queries, key=int)
        qtext = [queries[q] for q in qids]
        t = time.perf_counter()
        xs, offs = extract_queries(loaded, qtext, suffix=sfx)
        xp, offp = extract_queries(loaded, qtext, suffix="")
        rows_sfx = [xs[offs[i]:offs[i + 1]] for i in range(len(qids))]
        rows_plain = [xp[offp[i]:offp[i + 1]] for i in range(len(qids))]
        bm = BM25(texts, stem=False)
        order = np.array([pos[int(d)] for d in doc_ids])
        scores = {"BM25": np.stack([bm.passage_scores(q)[order] for q in qtext])}
        for a in args.adapter:
            scores[a] = adapter_scores(mem, RouterAdapter.load(a), rows_sfx, rows_plain, n_sfx)
        res = {}
        for s, sc in scores.items():
            per = {m: [] for m in METRICS}
            for i, qid in enumerate(qids):
                r = doc_ranking(sc[i], passage_doc)
                for m, f in METRICS.items():
                    per[m].append(f(r, qrels[qid]))
            res[s] = {m: float(np.mean(v)) for m, v in per.items()}
            res[s]["_nd"] = per["nDCG@10"]
        b = res["BM25"]["_nd"]
        for s, r in res.items():
            w = sum(x > y + 1e-12 for x, y in zip(r["_nd"], b)); l = sum(x < y - 1e-12 for x, y in zip(r["_nd"], b))
            r["vs_bm25"] = [w, l, round(sign_test(w, l), 4)]
            print(f"{name:5} {s[-44:]:44} nDCG@10 {r['nDCG@10']:.3f} R@16 {r['R@16']:.3f} R@100 {r['R@100']:.3f} "
                  f"MRR@10 {r['MRR@10']:.3f}  vs BM25 {w}/{l} p={sign_test(w, l):.3f}", flush=True)
            out[f"{name}/{s}"] = {k: v for k, v in r.items() if k != "_nd"}
        print(f"  ({time.perf_counter() - t:.0f}s)", flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
