"""Seventh-session screen: routing recall@1/16 of several adapters on bench_quality's cached pooled
inputs (layers 1, 2, 5, 8, 11, 14, 17; the same haystacks, queries and functions as
benchmarks/bench_quality.py; no BM25 / MiniLM rows, which do not depend on the router).

Run from the repository root after ``bench_quality.py --layers 1,2,5,8,11,14,17 --cache .bench/quality_q200
--sizes 16384,131072,1048576 --encode-only``; ``V`` is the varied-names run's candidates adapter
(``$OUT/adapter/candidates`` of device_train.py gpu, kept at .bench/v5/adapter/candidates; not committed),
``S`` the varied-names shallow run's (.bench/shv/adapter/candidates, when present):

    python benchmarks/results/router_trials_2026-12-02c/screen.py NAME=SPEC ...
    # SPEC: parts joined by '+', each a shipped name or folder, V or S, optionally ':layers'
"""
import sys, json, warnings
from pathlib import Path
sys.path.insert(0, "benchmarks"); sys.path.insert(0, ".")  # run from the repository root
warnings.simplefilter("ignore")
import bench_quality as bq
from msa_memory.encode import RouterAdapter, load_model
from msa_memory.train.features import extract_queries
cand = (1, 2, 5, 8, 11, 14, 17)
sizes = [16384, 131072, 1048576]
passages, sources, queries, n_q = bq.build_eval(100, 100)
loaded = load_model("default", router_layers=cand)
import numpy as np
n_tokens = np.array([len(loaded.wrap_ids(p, 0)) for p in passages])
plans = {S: bq.haystacks(n_tokens, queries, n_q, S, 10 if S <= 16384 else None) for S in sizes}
n_needed = max(max(d) for S in sizes for d, _ in plans[S]) + 1
x, chunk_doc = bq.pool_features(loaded, passages, n_needed, Path(".bench/quality_q200") / f"L{'-'.join(map(str, cand))}")
qx, qoff = extract_queries(loaded, [q.text for q in queries])
V = RouterAdapter.load(".bench/v5/adapter/candidates")
S = RouterAdapter.load(".bench/shv/adapter/candidates") if Path(".bench/shv/adapter/candidates").is_dir() else None
ads = {"default": RouterAdapter.load("default")}
for name, spec in [a.split("=", 1) for a in sys.argv[1:]]:
    parts = []
    for p in spec.split("+"):
        src, _, layers = p.partition(":")
        ad = V if src == "V" else S if src == "S" else RouterAdapter.load(src)
        parts.append(ad.subset(tuple(int(l) for l in layers.split(","))) if layers else ad)
    ads[name] = parts[0] if len(parts) == 1 else RouterAdapter.merge(parts)
out = {}
for name, ad in ads.items():
    row = {}
    for S in sizes:
        acc = {"fact": [], "ict": []}
        for docs, qidx in plans[S]:
            pos_local = [[docs.index(p) for p in queries[i].positives] for i in qidx]
            s = bq.routing_scores(ad, list(cand), x, chunk_doc, qx, qoff, docs, qidx, ad.config)
            for kind in acc:
                m = [j for j, i in enumerate(qidx) if queries[i].kind == kind]
                if m:
                    acc[kind].append((len(m), bq.recall(s[m], [pos_local[j] for j in m])))
        row[S] = {k: {kk: sum(n * r[kk] for n, r in v) / sum(n for n, _ in v) for kk in (1, 16)} for k, v in acc.items()}
    out[name] = row
    print(f"{name:<28} {list(ad.config.router_layers)!s:<24} needles " + " / ".join(f"{row[S]['fact'][16]:.2f}" for S in sizes)
          + "   cloze " + " / ".join(f"{row[S]['ict'][16]:.2f}" for S in sizes)
          + "   r@1 1M " + f"{row[sizes[-1]]['fact'][1]:.2f}/{row[sizes[-1]]['ict'][1]:.2f}", flush=True)
json.dump({k: {"router_id": ads[k].fingerprint(), "router_layers": list(ads[k].config.router_layers),
               "recall": {str(S): v for S, v in r.items()}} for k, r in out.items()},
          open(".bench/screen.json", "w"), indent=1)
