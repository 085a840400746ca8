"""Does a pooled answer read its memory? Attention mass on memory and the answer loss's dependence on it (issue 39).

For a reader adapter (``msa train-reader --out``) and its training data folder (``--data``, with ``mem.msa`` and
``questions.jsonl``), on dev questions (held-out facts) and training questions:

- ``memory mass``: at each router layer, the share of the question's last token's attention (softmax over
  [template prefix | memory K̄ | local tokens], heads averaged) that falls on the pooled memory keys, in
  ``Memory.ask(mode="pooled")``'s own prefill, with the reader and without it (the base model);
- ``memory gain``: the answer's mean cross-entropy with the gold passages in memory, and with random passages
  in their place (``ReaderTrainer.memory_gain``); equal losses mean the answers do not depend on the memory.

The baseline is the base model's row of the same run. Prints a table and a final JSON line.

Run: ``nice .venv/bin/python benchmarks/bench_reader_memory.py --reader .bench/reader/r16 --data .bench/reader/data
--out benchmarks/results/reader/memory.json``.
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


def memory_mass(mem, questions, reader: bool, k: int) -> dict[int, float]:
    """Mean share of the last prompt token's attention on memory keys, per router layer."""
    import torch

    import msa_memory.runtime.attention as attention

    layers = set(mem.identity.router_layers)
    mass: dict[int, list[float]] = {}
    orig = attention.attend

    def attend(st, layer_idx, q, k_, v, scaling, window, softcap):
        out = orig(st, layer_idx, q, k_, v, scaling, window, softcap)
        buf = st.layers[layer_idx]
        P, M0 = st.prefix_len, buf.local_start
        if layer_idx in layers and M0 > P and q.shape[2] > 1:          # a prefill with memory attached
            keys = buf.k[:, :M0 + buf.n_local]
            keys = keys.repeat_interleave(q.shape[1] // keys.shape[0], 0)
            w = (q[0, :, -1:].float() @ keys.float().transpose(-1, -2)) * (scaling or q.shape[-1] ** -0.5)
            if softcap:
                w = torch.tanh(w / softcap) * softcap
            p = torch.softmax(w, -1)[:, 0]                                # (Hq, S)
            mass.setdefault(layer_idx, []).append(float(p[:, P:M0].sum(-1).mean()))
        return out

    attention.attend = attend
    try:
        for q in questions:
            mem.ask(q.question, mode="pooled", k=k, reader=reader, max_new_tokens=1)
    finally:
        attention.attend = orig
    return {l: sum(v) / len(v) for l, v in sorted(mass.items())}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reader", required=True, help="a msa train-reader --out folder")
    ap.add_argument("--data", required=True, help="its --data folder (mem.msa, questions.jsonl)")
    ap.add_argument("--n", type=int, default=20, help="questions of each split (default 20)")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)

    from msa_memory.runtime import Memory
    from msa_memory.runtime.reader import ReaderAdapter
    from msa_memory.train.reader import ReaderTrainer, load_questions

    t0 = time.perf_counter()
    data = Path(args.data)
    mem = Memory(str(data / "mem.msa"), cpu_gemv=False, reader=False)
    trainer = ReaderTrainer(mem, ReaderAdapter.load(args.reader), k=args.k, seed=args.seed)
    qs = load_questions(data / "questions.jsonl")
    rng = random.Random(args.seed)
    splits = {s: rng.sample([q for q in qs if q.split == s], min(args.n, sum(q.split == s for q in qs)))
              for s in ("dev", "train")}
    res: dict = {"mass": {}, "gain": {}}
    for name, on in (("base model", False), ("reader", True)):
        res["mass"][name] = memory_mass(mem, splits["dev"], on, args.k)
    for s, questions in splits.items():
        res["gain"][s] = trainer.memory_gain(questions)
    layers = list(res["mass"]["base model"])
    print("attention of the question's last token on the pooled memory, per router layer (dev questions)")
    print(f"{'':<11}" + "".join(f"{l:>8}" for l in layers))
    for name, m in res["mass"].items():
        print(f"{name:<11}" + "".join(f"{m[l]:>8.3f}" for l in layers))
    print("answer cross-entropy (nats/token), reader on: gold passages in memory | random passages instead")
    for s, g in res["gain"].items():
        print(f"  {s:<6} {g['loss_gold']:.4f} | {g['loss_without_gold']:.4f}  (n {g['n']})")
    meta = json.loads((Path(args.reader) / "reader_adapter.json").read_text())
    out = {"bench": "reader_memory", "commit": git_commit(), "date": time.strftime("%Y-%m-%d"),
           "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
           "reader": args.reader, "reader_command": meta.get("extra", {}).get("command"), "k": args.k,
           "n_per_split": args.n, "seconds": round(time.perf_counter() - t0, 1),
           "memory_mass": {n: {str(l): round(v, 4) for l, v in m.items()} for n, m in res["mass"].items()},
           "memory_gain": {s: {k: round(v, 4) if isinstance(v, float) else v for k, v in g.items()}
                           for s, g in res["gain"].items()}}
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
