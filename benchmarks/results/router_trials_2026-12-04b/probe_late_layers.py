"""Per-layer routing scores of the default (MSA's query-max / chunk-max) and of a late-interaction-trained
adapter (per query token its best chunk of each passage, mean over tokens) on bench_quality's haystacks,
from bench_quality's feature cache; every layer combination below is a sum of those per-layer scores.

Usage: python probe_late_layers.py LATE_ADAPTER_DIR --seed 0 [--sizes 16384,131072,1048576]
Inference only on cached pooled inputs (no encode); prints a table and one JSON line.
"""
import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_quality as bq  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("late")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sizes", default="16384,131072,1048576")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    warnings.simplefilter("ignore")
    from msa_memory.encode import RouterAdapter
    from msa_memory.train.features import extract_queries

    t0 = time.perf_counter()
    sizes = [int(s) for s in a.sizes.split(",")]
    default = RouterAdapter.load("default")
    layers = list(default.config.router_layers)
    shifted, window = tuple(default.config.shifted_layers), default.config.shifted_window
    late = RouterAdapter.load(a.late).with_shifted_layers(shifted, window)
    ev = bq.seed_eval(default, a.seed, sizes, ROOT / ".bench" / "quality")
    queries, loaded, plans, x, chunk_doc, grid = (ev[k] for k in ("queries", "loaded", "plans", "x", "chunk_doc",
                                                                   "grid"))
    qx, qoff = extract_queries(loaded, [q.text for q in queries])
    adapters = {"max": default, "late": late}
    combos = {
        "default: max at all 7": [("max", l) for l in layers],
        "late at 1, 5, 8, 11 + max at 13, 16, 17": [("late", l) for l in (1, 5, 8, 11)] + [("max", l) for l in (13, 16, 17)],
        "max at all 7 + late at 1, 5, 8, 11": [("max", l) for l in layers] + [("late", l) for l in (1, 5, 8, 11)],
        "late at 1, 5, 8, 11": [("late", l) for l in (1, 5, 8, 11)],
        "max at 1, 5, 8, 11": [("max", l) for l in (1, 5, 8, 11)],
        "max at 13, 16, 17": [("max", l) for l in (13, 16, 17)],
    }
    results = {}
    for S in sizes:
        rows = {}
        for docs, qidx in plans[S]:
            pos_local = [[docs.index(p) for p in queries[i].positives] for i in qidx]
            per = {}
            for name, ad in adapters.items():
                for l in layers:
                    if name == "late" and l not in (1, 5, 8, 11):
                        continue
                    sub = ad.subset([l]).with_shifted_layers([l], window)
                    per[(name, l)] = bq.routing_scores(sub, layers, x, chunk_doc, qx, qoff, docs, qidx, sub.config, grid)
            for cname, parts in combos.items():
                s = sum(per[p] for p in parts)
                for kind in ("fact", "ict"):
                    m = [j for j, i in enumerate(qidx) if queries[i].kind == kind]
                    r = bq.recall(s[m], [pos_local[j] for j in m])
                    rows.setdefault(cname, {}).setdefault(kind, []).append((len(m), r))
        results[S] = {c: {k: {kk: round(sum(n * r[kk] for n, r in v) / sum(n for n, _ in v), 4) for kk in bq.KS}
                          for k, v in kinds.items()} for c, kinds in rows.items()}
        print(f"size {S} done ({time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)
    print(f"{'combination':45s} " + "  ".join(f"needles@16 {S:>8d}" for S in sizes) + "  " +
          "  ".join(f"cloze@16 {S:>8d}" for S in sizes))
    for c in combos:
        print(f"{c:45s} " + "  ".join(f"{results[S][c]['fact'][16]:19.2f}" for S in sizes) + "  " +
              "  ".join(f"{results[S][c]['ict'][16]:17.2f}" for S in sizes))
    out = {"seed": a.seed, "late_adapter": late.fingerprint(), "default": default.fingerprint(),
           "seconds": round(time.perf_counter() - t0), "results": {str(S): results[S] for S in sizes}}
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
