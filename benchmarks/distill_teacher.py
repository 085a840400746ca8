"""Precompute the teachers' candidate lists of a distillation recipe in a process of its own (while the router
features are extracted in another): the same pairs as ``msa train-router --objective distill`` builds for the
same options, MiniLM embeddings computed once, lists for minilm, bm25 and fusion written where ``run_training``
looks for them (``CACHE/teacher-NAME-MINED-RANDOM-SEED.pt``).

Run: ``python benchmarks/distill_teacher.py --cache DIR --n-train N --n-dev N --max-chars N [--builtin ...]``
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from msa_memory.train.distill import minilm_embed, teacher_lists
from msa_memory.train.recipe import distill_pairs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", required=True)
    ap.add_argument("--builtin", default="stdlib,man,packages")
    ap.add_argument("--queries", default="summary,name,first-sentence")
    ap.add_argument("--n-train", type=int, required=True)
    ap.add_argument("--n-dev", type=int, required=True)
    ap.add_argument("--max-chars", type=int, default=800)
    ap.add_argument("--cloze-remove", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mined", type=int, default=15)
    ap.add_argument("--random", type=int, default=8)
    ap.add_argument("--teachers", default="minilm,bm25,fusion")
    a = ap.parse_args()
    train, _ = distill_pairs(a.n_train, a.n_dev, seed=a.seed, max_chars=a.max_chars, sources=a.builtin.split(","),
                             queries=a.queries.split(","), p_remove=a.cloze_remove, docs_cache=a.cache)
    print(train.counts(), flush=True)
    memo: dict[int, np.ndarray] = {}

    def embed(texts):
        key = hash(tuple(texts))
        if key not in memo:
            t = time.perf_counter()
            memo[key] = minilm_embed(texts)
            print(f"embedded {len(texts)} texts in {time.perf_counter() - t:.0f}s", flush=True)
        return memo[key]

    for name in a.teachers.split(","):
        t = time.perf_counter()
        c, s = teacher_lists(train.passages, train.queries, name, n_mined=a.mined, n_random=a.random, seed=a.seed,
                             embed=embed)
        f = Path(a.cache) / f"teacher-{name}-{a.mined}-{a.random}-{a.seed}.pt"
        torch.save({"cands": torch.from_numpy(c), "scores": torch.from_numpy(s)}, f)
        print(f"{name}: {c.shape} -> {f} ({time.perf_counter() - t:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
