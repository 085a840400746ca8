"""Capacity probe: train the router on the benchmark's own queries (1M CPU haystack).
mode=oracle: train and test on all 200 queries (an upper bound of what these linear projections can fit);
mode=cv: 2-fold, train on half the queries of each kind, test on the other half (in-domain generalisation)."""
import sys, warnings, json
sys.path.insert(0, "benchmarks"); sys.path.insert(0, ".")
warnings.simplefilter("ignore")
import numpy as np, torch
from pathlib import Path
import bench_quality as bq
from msa_memory.encode import RouterAdapter, load_model
from msa_memory.train.features import extract_queries
from msa_memory.train.trainer import Features, RouterProjections, TrainConfig, train_router, evaluate
torch.manual_seed(0)
mode = sys.argv[1]; epochs = int(sys.argv[2]) if len(sys.argv) > 2 else 20
cand = (1, 2, 5, 8, 11, 14, 17)
passages, sources, queries, n_q = bq.build_eval(100, 100)
loaded = load_model("default", router_layers=cand)
n_tokens = np.array([len(loaded.wrap_ids(p, 0)) for p in passages])
docs, qidx = bq.haystacks(n_tokens, queries, n_q, 1048576, None)[0]
n_needed = max(docs) + 1
x, chunk_doc = bq.pool_features(loaded, passages, n_needed, Path(".bench/quality_q200") / f"L{'-'.join(map(str, cand))}")
qx, qoff = extract_queries(loaded, [q.text for q in queries])
docs_t = torch.as_tensor(docs)
local = torch.full((int(chunk_doc.max()) + 1,), -1, dtype=torch.long); local[docs_t] = torch.arange(len(docs))
sel = local[chunk_doc] >= 0
cdoc = local[chunk_doc[sel]]
order = torch.argsort(cdoc, stable=True)
xs = torch.stack([x[i][sel][order] for i in range(len(cand))]); cdoc = cdoc[order]
def feats(qs):
    rows = torch.cat([qx[qoff[i]:qoff[i + 1]] for i in qs]); offs = torch.tensor([0] + list(np.cumsum([int(qoff[i + 1] - qoff[i]) for i in qs])))
    return Features(cand, xs, cdoc, len(docs), rows, offs, [(docs.index(queries[i].positives[0]),) for i in qs], [queries[i].kind for i in qs])
ad = RouterAdapter.load("default")
cfg = TrainConfig(epochs=epochs, batch_size=32, lr=0.002, n_random=512, n_hard=0, ks=(1, 5, 16))
allq = list(range(len(queries)))
if mode == "oracle":
    folds = [(allq, allq)]
else:
    a = [i for i in allq if i % 2 == 0]; b = [i for i in allq if i % 2 == 1]
    folds = [(a, b), (b, a)]
res = []
for tr, te in folds:
    proj = RouterProjections.from_adapter(ad)
    e0 = evaluate(proj, feats(te), cfg)
    hist = train_router(proj, feats(tr), feats(te), cfg, log=lambda r: print(r["epoch"], round(r["loss"], 3), {k: v for k, v in r.items() if k.startswith("recall_")}, flush=True))
    res.append(hist[-1])
for kind in ("recall_fact", "recall_ict"):
    print(mode, kind, {k: np.mean([r[kind][k] for r in res]) for k in res[0][kind]})
