"""``python -m msa_memory.train.distill_cli``: ``msa train-router`` with the distillation options.

The same options as ``msa train-router`` (same names, same defaults) plus the ones of listwise distillation
(``msa_memory.train.distill``), until ``msa train-router`` takes them itself:

- ``--queries summary,name,first-sentence,ict``: pseudo-queries of the built-in recipe instead of inverse
  cloze + synthetic facts;
- ``--objective distill``: train on the teacher's softmax over each query's candidate list
  (``--teacher minilm|bm25|fusion``, ``--teacher-mined N`` of its best passages + ``--teacher-random N``),
  at ``--distill-tau`` for the teacher, plus ``--distill-alpha`` times the positives' InfoNCE.

Example (a suffix query at layers 13 and 16 distilled from MiniLM, the default's router keys kept)::

    python -m msa_memory.train.distill_cli --out router/ --builtin stdlib,man,packages --layers 13,16 \\
        --keep-layers --init-adapter tokenmax --freeze-keys --query-reduce last \\
        --query-suffix $'\\nThis passage is about' --queries summary,name,first-sentence \\
        --objective distill --teacher minilm --n-train 6000 --n-dev 400 --cache .bench/distill/cache
"""

from __future__ import annotations

import argparse
import json
import sys

from msa_memory.train.cli_support import train_router_command, train_router_from_cli

__all__ = ["main"]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m msa_memory.train.distill_cli", description=__doc__.split("\n")[0])
    a = ap.add_argument
    a("--out", required=True)
    a("--corpus", action="append", default=None)
    a("--store", default=None)
    a("--pairs", default=None)
    a("--model", default="default")
    a("--layers", default="lower-half")
    a("--max-layers", type=int, default=9)
    a("--epochs", type=int, default=4)
    a("--batch-size", type=int, default=64)
    a("--lr", type=float, default=2e-4)
    a("--builtin", default="stdlib")
    a("--n-train", type=int, default=500)
    a("--n-dev", type=int, default=100)
    a("--max-chars", type=int, default=800)
    a("--seed", type=int, default=0)
    a("--cache", default=None)
    a("--device", default="cpu")
    a("--hard-negatives", default="bm25")
    a("--mine-every", type=int, default=1)
    a("--negatives", type=int, default=32)
    a("--cloze-remove", type=float, default=0.5)
    a("--dev-distractors", action="store_true")
    a("--bf16", action="store_true")
    a("--layer-loss", default="each")
    a("--query-reduce", default="max")
    a("--head-reduce", default="mean")
    a("--query-suffix", default="")
    a("--init-adapter", default=None)
    a("--freeze-layers", default=None)
    a("--fact-names", default="syllables")
    a("--keep-layers", action="store_true")
    a("--shifted-layers", default=None)
    a("--shifted-window", type=int, default=None)
    a("--freeze-keys", action="store_true")
    a("--queries", default=None, help="pseudo-query sources: summary,name,first-sentence,ict")
    a("--objective", default="infonce", help="infonce or distill")
    a("--teacher", default="minilm", help="minilm, bm25 or fusion")
    a("--distill-tau", type=float, default=0.1)
    a("--distill-alpha", type=float, default=0.25)
    a("--teacher-mined", type=int, default=15)
    a("--teacher-random", type=int, default=8)
    a("--json", action="store_true")
    o = ap.parse_args(argv)
    builtin = [b.strip() for b in o.builtin.split(",") if b.strip()]
    opts = dict(hard_negatives=o.hard_negatives, mine_every=o.mine_every, negatives=o.negatives,
                cloze_remove=o.cloze_remove, dev_distractors=o.dev_distractors, bf16=o.bf16, layer_loss=o.layer_loss,
                query_reduce=o.query_reduce, head_reduce=o.head_reduce, init_adapter=o.init_adapter,
                freeze_layers=o.freeze_layers, fact_names=o.fact_names, keep_layers=o.keep_layers,
                shifted_layers=o.shifted_layers, shifted_window=o.shifted_window, query_suffix=o.query_suffix,
                freeze_keys=o.freeze_keys, objective=o.objective, teacher=o.teacher, queries=o.queries,
                distill_tau=o.distill_tau, distill_alpha=o.distill_alpha, teacher_mined=o.teacher_mined,
                teacher_random=o.teacher_random)
    command = train_router_command(o.out, o.corpus, o.store, o.pairs, o.model, o.layers, o.max_layers, o.epochs,
                                   o.batch_size, o.lr, o.n_train, o.n_dev, o.max_chars, o.seed, o.cache, o.device,
                                   builtin=",".join(builtin), **opts)
    summary = train_router_from_cli(out=o.out, corpus=o.corpus, store=o.store, pairs=o.pairs, model=o.model,
                                    layers=o.layers, max_layers=o.max_layers, epochs=o.epochs,
                                    batch_size=o.batch_size, lr=o.lr, n_train=o.n_train, n_dev=o.n_dev, seed=o.seed,
                                    max_chars=o.max_chars, cache=o.cache, device=o.device, command=command,
                                    log=lambda s: print(s, file=sys.stderr, flush=True), builtin=builtin, **opts)
    if o.json:
        print(json.dumps({k: v for k, v in summary.items() if k in ("out", "router_id", "router_layers",
                                                                     "dev_recall", "seconds")}, default=str))
    else:
        print(f"saved router adapter {summary['router_id']} to {summary['out']}: layers {summary['router_layers']}")
    return summary


if __name__ == "__main__":
    main()
