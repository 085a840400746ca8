"""Routing recall@1/5/16 of several adapters on bench_quality's haystacks from its cached pooled inputs
(bench_quality.routing_scores, the benchmark's own scorer; no BM25 / dense: those are in the same-run
bench_quality JSONs). Usage: score_adapters.py NAME=SPEC ...; SPEC is an adapter folder or shipped name,
or parts joined by '+' (merged with RouterAdapter.merge), a part optionally cut to layers as PATH@2,14,17."""
import os, sys, json
from pathlib import Path
import numpy as np, torch
sys.path.insert(0, "benchmarks")
import bench_quality as bq
from msa_memory.encode import RouterAdapter, load_model
from msa_memory.train.features import extract_queries

CACHES = [(1, 2, 5, 8, 11, 14, 17)] + ([(13, 16)] if os.environ.get("WITH1316") else [])
layers_all = [l for c in CACHES for l in c]
passages, sources, queries, n_q = bq.build_eval(100, 100)
loaded = load_model("default", router_layers=tuple(layers_all))
n_tokens = np.array([len(loaded.wrap_ids(p, 0)) for p in passages])
sizes = [16384, 131072, 1048576]
plans = {S: bq.haystacks(n_tokens, queries, n_q, S, 10 if S <= 16384 else None) for S in sizes}
n_needed = max(max(d) for S in sizes for d, _ in plans[S]) + 1
xs = []
for c in CACHES:
    loaded.router_layers  # noqa
    sub = load_model("default", router_layers=c)
    x, chunk_doc = bq.pool_features(sub, passages, n_needed, Path(".bench/quality_q200") / ("L" + "-".join(map(str, c))))
    xs.append(x)
# load_model sorts router layers, and extract_queries keeps that order: put the cached x̄ rows in it too
order = [l for c in CACHES for l in c]
x = torch.cat(xs, 0)[[order.index(l) for l in sorted(order)]]
layers_all = sorted(order)
assert list(loaded.router_layers) == layers_all, (loaded.router_layers, layers_all)
qx, qoff = extract_queries(loaded, [q.text for q in queries])


def build(spec):
    parts = []
    for p in spec.split("+"):
        path, _, lay = p.partition("@")
        a = RouterAdapter.load(path)
        parts.append(a.subset(tuple(int(v) for v in lay.split(","))) if lay else a)
    return parts[0] if len(parts) == 1 else RouterAdapter.merge(parts)


out = {}
for arg in sys.argv[1:]:
    name, spec = arg.split("=", 1)
    ad = build(spec)
    row = {}
    for S in sizes:
        acc = {"fact": [], "ict": []}
        for docs, qidx in plans[S]:
            sc = bq.routing_scores(ad, layers_all, x, chunk_doc, qx, qoff, docs, qidx, ad.config)
            for j, i in enumerate(qidx):
                acc[queries[i].kind].append(int((sc[j] > sc[j, docs.index(queries[i].positives[0])]).sum()))
        row[S] = {k: [round(float(np.mean(np.array(r) < kk)), 2) for kk in (1, 5, 16)] for k, r in acc.items()}
    out[name] = {"spec": spec, "layers": list(ad.config.router_layers), "router_id": ad.fingerprint(), "recall": row}
    print(f"{name:24s} {list(ad.config.router_layers)}  " + "  ".join(
        f"{S // 1024}K n{row[S]['fact']} c{row[S]['ict']}" for S in sizes), flush=True)
Path(os.environ.get("OUTJSON", ".bench/s9/score_adapters.json")).write_text(json.dumps(out, indent=1))
