"""BM25 hard-negative mining of ``msa train-router``: ``bm25_negatives.bm25_topk`` vs bm25s's own retrieve.

The training recipe mines, for every query, the best BM25 passages that are not its positives
(``bm25_negatives.bm25_hard_negatives``). bm25s scores one query at a time (one ``np.add.at`` per query
token over that token's documents, then a top-k), which took 1,276 s for the 142k queries over
69k passages of the shipped adapter's data on 2 cores. ``bm25_topk`` computes the same scores as
one sparse product per block of queries. Both run here on the same index, passages and queries
(standard-library docstrings + man pages packed as the recipe packs them; queries = one sentence
of each passage, as the inverse-cloze pairs are), and the run checks that both select the same
top-k scores. Prints a table and ends with one JSON line.

Measured (2-core AVX512-BF16 VM, benchmarks/results/bench_mining_cpu.json): 25,000 passages, 5,000
queries, k = 12: bm25s 7.42 s (1.48 ms a query), ``bm25_topk`` 1.22 s (0.24 ms), same top-12 scores
for all 5,000 queries (4,826 identical passage sets; the rest differ only among tied scores).

Usage: ``python benchmarks/bench_mining.py [--passages 25000] [--queries 5000] [--k 12]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--passages", type=int, default=25_000)
    ap.add_argument("--queries", type=int, default=5_000)
    ap.add_argument("--k", type=int, default=12, help="passages kept per query (the recipe: negatives + positives)")
    a = ap.parse_args(argv)
    import bm25s

    from msa_memory.train.pairs import sentences
    from msa_memory.train.bm25_negatives import bm25_topk
    from msa_memory.train.recipe import builtin_passages

    t0 = time.perf_counter()
    passages = [p for _, p in builtin_passages(("stdlib", "man"))][: a.passages]
    rng = random.Random(0)
    queries = []
    for p in rng.sample(passages, min(a.queries, len(passages))):
        spans = sentences(p) or [(0, len(p))]
        s, e = rng.choice(spans)
        queries.append(p[s:e])
    t_data = time.perf_counter() - t0
    retriever = bm25s.BM25()
    t0 = time.perf_counter()
    retriever.index(bm25s.tokenize(passages, stopwords="en", show_progress=False), show_progress=False)
    t_index = time.perf_counter() - t0

    t0 = time.perf_counter()
    ref, ref_scores = retriever.retrieve(bm25s.tokenize(queries, stopwords="en", show_progress=False), k=a.k,
                                         show_progress=False)
    t_ref = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours = bm25_topk(retriever, bm25s.tokenize(queries, stopwords="en", return_ids=False, show_progress=False), a.k)
    t_ours = time.perf_counter() - t0

    toks = bm25s.tokenize(queries, stopwords="en", return_ids=False, show_progress=False)
    same_scores = same_sets = 0
    for i, q in enumerate(toks):
        s = retriever.get_scores(q) if q else np.zeros(len(passages), dtype=np.float32)
        same_scores += bool(np.allclose(np.sort(s[ours[i]])[::-1], ref_scores[i], rtol=1e-5, atol=1e-5))
        same_sets += set(ours[i].tolist()) == set(ref[i].tolist())
    rows = [("bm25s BM25.retrieve (baseline)", t_ref), ("bm25_negatives.bm25_topk", t_ours)]
    print(f"{len(passages)} passages, {len(queries)} queries, k={a.k}; index {t_index:.1f} s (shared), "
          f"data {t_data:.1f} s")
    print(f"| {'what':32} | {'seconds':>8} | {'ms / query':>10} |")
    print(f"|{'-' * 34}|{'-' * 10}|{'-' * 12}|")
    for name, t in rows:
        print(f"| {name:32} | {t:8.2f} | {1e3 * t / len(queries):10.3f} |")
    print(f"same top-{a.k} scores: {same_scores}/{len(queries)} queries; same passage sets: {same_sets} "
          f"(the rest differ only among tied scores)")
    print(json.dumps({"bench": "mining", "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                      "passages": len(passages), "queries": len(queries), "k": a.k,
                      "bm25s_retrieve_s": round(t_ref, 3), "bm25_topk_s": round(t_ours, 3),
                      "speedup": round(t_ref / t_ours, 2), "same_scores": same_scores, "same_sets": same_sets}))


if __name__ == "__main__":
    main()
