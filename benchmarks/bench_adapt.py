"""Corpus adaptation (issue 6, item 1a): the shipped router adapter fine-tuned self-supervised on the
memory's own text, against the shipped adapter and BM25, on bench_quality's held-out queries.

Regime: bench_quality's haystack of ``--size`` tokens (1M: pydoc query passages + Debian distractors;
100 needle facts + 100 inverse-cloze queries, the same queries, passages and cached pooled inputs as
``bench_quality.py``). Training text: that haystack's passages as a store of them would hold them, with
two exceptions that keep every benchmark query unseen: the needle passages as they were *before* their
eval fact was inserted (no eval name, value or question is trained on), and the cloze passages as the
haystack holds them (without their query sentence). Pairs: ``recipe.self_supervised_pairs``, what
``msa train-router --store`` builds from a store's texts (a tenth of the documents held out as dev;
inverse cloze + synthetic facts with train-split names). Training: ``recipe.run_training`` from the
shipped adapter with every layer kept, i.e. the command

    msa train-router --store MEM --init-adapter default --layers 1,5,8,11,13,16,17 --keep-layers \
        --epochs 3 --lr 0.001 --negatives 256 --cloze-remove 0.9 --fact-names varied --bf16 --dev-distractors

(the options of this script). Scoring: ``_quality_eval.routing_scores`` over the haystack's cached pooled
inputs, whose linear map is what ``msa store reindex-router`` writes as the re-keyed store's router keys.
The training features (every passage re-encoded with its edits, the encoder's own forward) are cached under
``--train-cache``. Prints a table, writes ``adapt.json`` into ``--out``, ends with one JSON line.

Measured (``--size 1048576 --cache .bench/quality``, 2-core AVX512-BF16 CPU, 2026-12-04, 1,943 s:
training features 984 s, 3 epochs of 178–194 s; benchmarks/results/bench_adapt_cpu.json), the default router
without its suffix query
(layers 1, 5, 8, 11, 13, 16, 17 with its 32-token window grid, which the adapted adapter keeps): recall@1/5/16
needles 0.88 / 1.00 / 1.00 adapted vs 0.88 / 1.00 / 1.00 shipped (BM25 1.00 / 1.00 / 1.00), cloze 0.08 / 0.38 /
0.64 vs 0.11 / 0.39 / 0.63 (BM25 0.15 / 0.49 / 0.71); dev recall@16 0.643 before and after: adapting to the
corpus gains nothing measurable here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import _quality_eval as qe  # noqa: E402

from msa_memory.train.features import extract_queries  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=1048576, help="memory size in tokens (one haystack)")
    ap.add_argument("--needles", type=int, default=100)
    ap.add_argument("--ict", type=int, default=100)
    ap.add_argument("--cache", default=str(ROOT / ".bench" / "quality_q200"),
                    help="bench_quality's --cache (pooled inputs of the benchmark passages)")
    ap.add_argument("--train-cache", default=str(ROOT / ".bench" / "adapt"), help="cache of the training features")
    ap.add_argument("--out", default=str(ROOT / ".bench" / "adapt_out"))
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--negatives", type=int, default=256)
    ap.add_argument("--cloze-remove", type=float, default=0.9)
    ap.add_argument("--fact-names", default="varied")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    from msa_memory.encode import RouterAdapter, load_model
    from msa_memory.train.recipe import run_training, self_supervised_pairs
    from msa_memory.train.trainer import TrainConfig

    t_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shipped = RouterAdapter.load("default")
    layers = tuple(shipped.config.router_layers)
    passages, sources, queries, n_q = qe.build_eval(args.needles, args.ict, seed=args.seed)
    pool, _ = qe.query_passage_pool(args.seed)
    texts = list(passages)
    for j in range(args.needles):  # the needle passages before their eval fact was inserted
        assert queries[j].kind == "fact" and queries[j].positives == (j,)
        assert set(pool[j][1].split()) <= set(passages[j].split()), f"needle passage {j} is not pool passage {j}"
        texts[j] = pool[j][1]
    loaded = load_model("default", adapter=shipped)
    n_tokens = np.array([len(loaded.wrap_ids(p, 0)) for p in passages])
    (docs, qidx), = qe.haystacks(n_tokens, queries, n_q, args.size, None)
    shifted = tuple(shipped.config.shifted_layers)
    tag = qe.cache_tag(layers, shifted, shipped.config.shifted_window)
    x, chunk_doc, x_s, cd_s = qe.pool_features(loaded, passages, max(docs) + 1, Path(args.cache) / tag)
    grid = (list(shifted), x_s, cd_s)       # routing over both grids at the shifted layers, as Memory does
    qx, qoff = extract_queries(loaded, [q.text for q in queries])
    print(f"haystack: {len(docs)} passages, {int(n_tokens[docs].sum())} tokens; {len(qidx)} queries", flush=True)

    train_pairs, dev_pairs = self_supervised_pairs([(sources[d], texts[d]) for d in docs], seed=args.seed,
                                                   p_remove=args.cloze_remove, fact_names=args.fact_names)
    cfg = TrainConfig(epochs=args.epochs, batch_size=64, lr=args.lr, seed=args.seed, n_random=args.negatives,
                      bf16=True)
    command = (f"msa train-router --store MEM --init-adapter default --layers {','.join(map(str, layers))} "
               f"--keep-layers --epochs {args.epochs} --lr {args.lr:g} --negatives {args.negatives} "
               f"--cloze-remove {args.cloze_remove:g} --fact-names {args.fact_names} --bf16 --dev-distractors "
               f"--seed {args.seed} --out {out / 'adapter'}")
    t0 = time.perf_counter()
    summary = run_training(out=out / "adapter", model="default", candidate_layers=layers, train_pairs=train_pairs,
                           dev_pairs=dev_pairs, config=cfg, cache_dir=args.train_cache, init_adapter="default",
                           loaded=loaded, dev_distractors=True, keep_layers=True, command=command,
                           log=lambda m: print(m, flush=True))
    t_train = time.perf_counter() - t0
    adapted = RouterAdapter.load(out / "adapter")

    pos_local = [[docs.index(p) for p in queries[i].positives] for i in qidx]
    kinds = {k: [j for j, i in enumerate(qidx) if queries[i].kind == k] for k in ("fact", "ict")}
    rows: dict[str, dict] = {}
    scorers = {"routing, shipped adapter": lambda: qe.routing_scores(shipped, list(layers), x, chunk_doc, qx, qoff, docs,
                                                                     qidx, grid),
               "routing, adapted to the memory": lambda: qe.routing_scores(adapted, list(layers), x, chunk_doc, qx, qoff,
                                                                           docs, qidx, grid),
               "BM25 (bm25s)": lambda: qe.bm25_scores([passages[d] for d in docs], [queries[i].text for i in qidx])}
    for name, fn in scorers.items():
        s = fn()
        rows[name] = {k: qe.recall(s[m], [pos_local[j] for j in m]) for k, m in kinds.items()}
        ranks = [int((s[j] > s[j, pos_local[j][0]]).sum()) for j in range(len(qidx))]
        rows[name]["positive_rank"] = ranks
    print(f"\nrecall@1/5/16 at {args.size} tokens ({len(docs)} passages)")
    print(f"{'':<34} {'needles':<18} cloze")
    for name, r in rows.items():
        print(f"{name:<34} " + "  ".join(" / ".join(f"{r[k][kk]:.2f}" for kk in qe.KS) for k in ("fact", "ict")))
    result = {
        "bench": "bench_adapt", "size_tokens": args.size, "haystack_passages": len(docs),
        "haystack_tokens": int(n_tokens[docs].sum()), "queries": {k: len(m) for k, m in kinds.items()},
        "command": command, "shipped_router_id": shipped.fingerprint(), "adapted_router_id": adapted.fingerprint(),
        "train": summary["train"], "dev": summary["dev"], "dev_memory_passages": summary["dev_memory_passages"],
        "history": [{k: v for k, v in h.items() if k != "per_layer"} for h in summary["history"]],
        "training_seconds": round(t_train, 1),
        "recall": {n: {k: {str(kk): v for kk, v in r[k].items()} for k in ("fact", "ict")} for n, r in rows.items()},
        "positive_rank": {n: r["positive_rank"] for n, r in rows.items()},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    (out / "adapt.json").write_text(json.dumps(result, indent=1))
    short = {n: {k: r[k][16] for k in ("fact", "ict")} for n, r in rows.items()}
    print(json.dumps({"bench": "bench_adapt", "size_tokens": args.size, "recall@16": short,
                      "training_seconds": result["training_seconds"], "seconds": result["seconds"]}))


if __name__ == "__main__":
    main()
