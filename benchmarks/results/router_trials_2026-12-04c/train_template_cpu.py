"""Does a prompt around the question make MSA's ``last`` reducer useful once the router is trained for it?

A controlled CPU trial, with the same passages, pairs, hard negatives, passage features and trainer for
every row. Only two things vary: the reducer (``max`` or ``last``), and the text the question is put into
before its router-layer inputs are taken (none, or a template with ``{q}``). The passages are encoded once.
The queries are encoded once per template. Each row is trained with ``recipe.run_training`` and measured on
held-out pairs against the dev + training passages (``--dev-distractors``), as ``msa train-router`` does.

Usage: python train_template_cpu.py --out DIR [--n-train 3000] [--layers 13,16,17] [--epochs 4]
Writes DIR/<row>/ (adapter + training.json) and DIR/summary.json; prints a table.
"""
import argparse
import dataclasses
import json
import time
import warnings
from pathlib import Path

import torch

TEMPLATES = {
    "bare": None,
    "eol": 'This sentence : "{q}" means in one word:"',
    "about": "{q}\nThis passage is about",
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--n-train", type=int, default=3000)
    ap.add_argument("--n-dev", type=int, default=400)
    ap.add_argument("--layers", default="13,16,17")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--rows", default="max:bare,last:bare,last:eol,last:about",
                    help="comma-separated REDUCE:TEMPLATE rows (templates: " + ", ".join(TEMPLATES) + ")")
    a = ap.parse_args()
    warnings.simplefilter("ignore")
    from msa_memory.encode import load_model
    from msa_memory.train.cli_support import train_config
    from msa_memory.train.features import build_features, extract_queries
    from msa_memory.train.recipe import bm25_hard_negatives, builtin_pairs, run_training

    t0 = time.perf_counter()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    layers = tuple(int(x) for x in a.layers.split(","))
    rows = [tuple(r.split(":")) for r in a.rows.split(",")]
    train, dev = builtin_pairs(a.n_train, a.n_dev, seed=0, max_chars=800, sources=("stdlib", "man", "packages"),
                               p_remove=0.9, fact_names="varied")
    print(f"pairs: train {train.counts()}, dev {dev.counts()} ({time.perf_counter() - t0:.0f}s)", flush=True)
    negs = bm25_hard_negatives(train.passages, train.queries, 4)
    loaded = load_model("default", router_layers=layers)
    feats = {"bare": (build_features(loaded, train.passages, train.queries, hard_negatives=negs, log=print),
                      build_features(loaded, dev.passages, dev.queries, log=print))}
    print(f"features, bare questions ({time.perf_counter() - t0:.0f}s)", flush=True)
    for name in sorted({t for _, t in rows} - {"bare"}):
        tpl = TEMPLATES[name]
        pair = []
        for f, ps in zip(feats["bare"], (train, dev)):
            qx, qoff = extract_queries(loaded, [tpl.replace("{q}", q.text) for q in ps.queries])
            pair.append(dataclasses.replace(f, q_x=qx, q_offsets=qoff))
        feats[name] = tuple(pair)
        print(f"features, template {name} ({time.perf_counter() - t0:.0f}s)", flush=True)
    summary = {"n_train": a.n_train, "n_dev": a.n_dev, "layers": list(layers), "epochs": a.epochs,
               "templates": TEMPLATES, "train": train.counts(), "dev": dev.counts(), "rows": {}}
    for reduce, tname in rows:
        row = f"{reduce}:{tname}"
        cfg = train_config(epochs=a.epochs, batch_size=64, lr=0.005, seed=0, device="cpu", negatives=256, bf16=True,
                           query_reduce=reduce)
        t = time.perf_counter()
        s = run_training(out=out / row.replace(":", "_"), candidate_layers=layers, max_layers=len(layers), config=cfg,
                         loaded=loaded, features=feats[tname], dev_distractors=True, keep_layers=True,
                         command=f"train_template_cpu.py row {row}", log=lambda m: print(f"[{row}] {m}", flush=True))
        rec = json.loads((out / row.replace(":", "_") / "training.json").read_text())
        last = rec["history"][-1]
        summary["rows"][row] = {"dev_recall": rec["dev_recall"], "by_kind": rec["dev_recall_by_kind"],
                                "per_layer_r16": {l: v["16"] for l, v in last["per_layer"].items()},
                                "router_id": s["router_id"], "seconds": round(time.perf_counter() - t)}
        print(f"[{row}] done ({time.perf_counter() - t0:.0f}s)", flush=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"{'row':14s} {'r16 sum':>8s} {'facts':>6s} {'cloze':>6s}   per layer r16 " + " ".join(map(str, layers)))
    for row, r in summary["rows"].items():
        print(f"{row:14s} {r['dev_recall']['16']:8.3f} {r['by_kind']['fact']['16']:6.3f} {r['by_kind']['ict']['16']:6.3f}   "
              + " ".join(f"{r['per_layer_r16'][str(l)]:.3f}" for l in layers))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
