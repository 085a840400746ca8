"""Cheap corpus adaptation probe: no passage re-encoded except the 100 needle passages reverted to their
text before the eval fact (so no eval fact is seen). Queries: inverse-cloze sentences left in their passage
(p_remove 0, no facts), so the corpus's kept pooled inputs serve as the passages' features."""
import sys, warnings, json, random, time
sys.path.insert(0, "benchmarks"); sys.path.insert(0, ".")
warnings.simplefilter("ignore")
import numpy as np, torch
from pathlib import Path
import bench_quality as bq
from msa_memory.encode import RouterAdapter, load_model
from msa_memory.train.corpus import pydoc_topics, pack_paragraphs
from msa_memory.train.features import extract_queries, extract_passages
from msa_memory.train.pairs import build_pairs
from msa_memory.train.recipe import bm25_hard_negatives, adapter_from_projections
from msa_memory.train.trainer import Features, RouterProjections, TrainConfig, train_router
epochs = int(sys.argv[1]); lr = float(sys.argv[2]); reps = int(sys.argv[3]); tag = sys.argv[4]
cand = (1, 2, 5, 8, 11, 14, 17)
passages, sources, queries, n_q = bq.build_eval(100, 100)
rng = random.Random("bench-quality-0")
py = [(s, p) for s, t in pydoc_topics() for p in pack_paragraphs(t, max_chars=1200)]
rng.shuffle(py)
orig = list(passages)
for j in range(100):
    orig[j] = py[j][1]
loaded = load_model("default", router_layers=cand)
n_tokens = np.array([len(loaded.wrap_ids(p, 0)) for p in passages])
docs, qidx = bq.haystacks(n_tokens, queries, n_q, 1048576, None)[0]
x, chunk_doc = bq.pool_features(loaded, passages, max(docs) + 1, Path(".bench/quality_q200") / f"L{'-'.join(map(str, cand))}")
def sel_feats(xall, cd, doclist):
    local = torch.full((int(cd.max()) + 1,), -1, dtype=torch.long); local[torch.as_tensor(doclist)] = torch.arange(len(doclist))
    sel = local[cd] >= 0; c = local[cd[sel]]; o = torch.argsort(c, stable=True)
    return torch.stack([xall[i][sel][o] for i in range(len(cand))]), c[o]
qx, qoff = extract_queries(loaded, [q.text for q in queries])
bx, bcd = sel_feats(x, chunk_doc, docs)
bench = Features(cand, bx, bcd, len(docs), qx, qoff, [(docs.index(q.positives[0]),) for q in queries], [q.kind for q in queries])
# training passages: haystack features, the 100 needle passages re-encoded from their original text
t0 = time.time()
nx, ncd = extract_passages(loaded, [orig[j] for j in range(100)])
keep = [d for d in docs if d >= 100]
kx, kcd = sel_feats(x, chunk_doc, keep)
tx = torch.cat([nx.to(kx.dtype), kx], dim=1); tcd = torch.cat([ncd, kcd + 100])
order_docs = list(range(100)) + keep           # training passage i = haystack passage order_docs[i]
texts = [orig[d] for d in order_docs]
qs = []
for r in range(reps):
    ps = build_pairs([(sources[d], t) for d, t in zip(order_docs, texts)], split="train", seed=r, p_fact=0.0, p_remove=0.0)
    assert ps.passages == texts
    qs += ps.queries
negs = bm25_hard_negatives(texts, qs, 4)
tqx, tqoff = extract_queries(loaded, [q.text for q in qs])
train = Features(cand, tx, tcd, len(texts), tqx, tqoff, [tuple(q.positives) for q in qs], [q.kind for q in qs], negs)
print("train", train.counts(), f"{time.time() - t0:.0f}s", flush=True)
ad = RouterAdapter.load("default")
proj = RouterProjections.from_adapter(ad)
cfg = TrainConfig(epochs=epochs, batch_size=64, lr=lr, n_random=256, n_hard=4, bf16=True, ks=(1, 5, 16))
hist = train_router(proj, train, bench, cfg, log=lambda r: print(r["epoch"], round(r["loss"], 3), r["seconds"],
    {k: {kk: round(v, 2) for kk, v in r[k].items()} for k in r if k.startswith("recall_")}, flush=True))
adapter_from_projections(proj, ad.config, train_config=cfg, extra={"note": "cheap corpus-adaptation probe"}).save(f".bench/s8/adapted_{tag}")
json.dump([{k: v for k, v in h.items() if k != "per_layer"} for h in hist], open(f".bench/s8/adapt_{tag}.json", "w"), indent=1)
