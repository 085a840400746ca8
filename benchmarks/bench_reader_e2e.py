"""Question-side reader or end-to-end training: which one makes pooled answers read their memory? (issue 39)

Two arms trained from the same start on the same questions (a ``msa train-reader`` data folder: ``mem.msa``,
``questions.jsonl``), with the same seed, steps, batch, learning rate and k:

- ``reader``: a question-side LoRA (``ReaderTrainer``): documents keep the K̄V̄ the frozen base model stored;
- ``end-to-end``: the same reader plus a writer LoRA of the same form that is active while the routed
  documents are encoded, in the training graph (``ReaderTrainer(writer=...)``, ``train.reader.pooled_kv``).

Each arm is measured before and after training on held-out dev questions (facts no training question asks)
and on training questions: the answer's mean cross-entropy with the gold passages in memory and with random
passages in their place, and the share answered exactly by greedy decoding from each memory
(``ReaderTrainer.memory_gain``). A memory that is read shows as a gap: lower loss and more exact answers with
the gold passages. The ``reader`` arm is the baseline of the same run. Prints a table and a final JSON line.

Run: ``nice .venv/bin/python benchmarks/bench_reader_e2e.py --data .bench/reader/data --k 1 --steps 250
--out benchmarks/results/reader/e2e.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import git_commit  # noqa: E402


def run_arm(mem, arm: str, train_q, splits, *, steps: int, batch: int, k: int, lr: float, rank: int, seed: int,
            log) -> dict:
    import torch

    from msa_memory.train.reader import ReaderTrainer, new_reader

    torch.manual_seed(seed)
    reader = new_reader(mem, rank=rank, alpha=2.0 * rank)          # all layers, all targets
    writer = new_reader(mem, rank=rank, alpha=2.0 * rank) if arm == "end-to-end" else None
    tr = ReaderTrainer(mem, reader, k=k, lr=lr, seed=seed, writer=writer)
    out: dict = {"params": sum(p.numel() for p in tr.params())}
    try:
        out["before"] = {s: tr.memory_gain(q) for s, q in splits.items()}
        t0 = time.perf_counter()
        tr.train(train_q, steps=steps, batch_size=batch, log=lambda m: log(f"[{arm}] {m}"))
        out["train_seconds"] = round(time.perf_counter() - t0, 1)
        out["after"] = {s: tr.memory_gain(q) for s, q in splits.items()}
    finally:
        reader.detach()
        if writer is not None:
            writer.detach()
        mem.engine.reader = mem.reader = None
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="a msa train-reader --data folder (mem.msa, questions.jsonl)")
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--k", type=int, default=1, help="documents per router layer (default 1)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--n", type=int, default=20, help="measured questions of each split (default 20)")
    ap.add_argument("--arms", default="reader,end-to-end")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    arms = args.arms.split(",")
    bad = [a for a in arms if a not in ("reader", "end-to-end")]
    if bad:
        ap.error(f"unknown arm(s) {bad}; use reader and/or end-to-end")

    from msa_memory.runtime import Memory
    from msa_memory.train.reader import load_questions

    t0 = time.perf_counter()
    data = Path(args.data)
    mem = Memory(str(data / "mem.msa"), device=args.device, cpu_gemv=False, reader=False)
    qs = load_questions(data / "questions.jsonl")
    train_q = [q for q in qs if q.split == "train"]
    rng = random.Random(args.seed)
    splits = {s: rng.sample([q for q in qs if q.split == s], min(args.n, sum(q.split == s for q in qs)))
              for s in ("dev", "train")}
    if not splits["dev"]:
        raise SystemExit(f"{data / 'questions.jsonl'} has no dev questions: make the data with more passages.")
    res = {a: run_arm(mem, a, train_q, splits, steps=args.steps, batch=args.batch_size, k=args.k, lr=args.lr,
                      rank=args.rank, seed=args.seed, log=lambda m: print(m, flush=True)) for a in arms}
    print(f"\nanswer loss (nats/token) and greedy exact match, gold passages in memory | random passages instead "
          f"(k = {args.k}, {args.steps} steps)")
    print(f"{'arm':<11} {'when':<7} {'split':<6} {'loss gold':>10} {'loss rand':>10} {'EM gold':>8} {'EM rand':>8}")
    for a, r in res.items():
        for when in ("before", "after"):
            for s, g in r[when].items():
                print(f"{a:<11} {when:<7} {s:<6} {g['loss_gold']:>10.4f} {g['loss_without_gold']:>10.4f} "
                      f"{g['exact_gold']:>8.2f} {g['exact_without_gold']:>8.2f}")
    rnd = lambda d: {k: round(v, 4) if isinstance(v, float) else v for k, v in d.items()}
    out = {"bench": "reader_e2e", "commit": git_commit(), "date": time.strftime("%Y-%m-%d"),
           "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.device}",
           "data": str(data), "k": args.k, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
           "rank": args.rank, "seed": args.seed, "n_per_split": args.n, "baseline": "reader",
           "seconds": round(time.perf_counter() - t0, 1),
           "arms": {a: {"params": r["params"], "train_seconds": r["train_seconds"],
                        **{w: {s: rnd(g) for s, g in r[w].items()} for w in ("before", "after")}}
                    for a, r in res.items()}}
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
