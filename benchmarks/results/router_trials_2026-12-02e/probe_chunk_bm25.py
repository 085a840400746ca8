"""Probe: is 64-token chunking with a max over chunks what costs cloze recall? BM25 (bm25s) over each
passage's 64-token chunks (the encoder's own tokens and chunk boundaries, decoded back to text), a
passage scored by its best chunk, against BM25 over whole passages; bench_quality's 1M haystack."""
import sys
import numpy as np, torch
sys.path.insert(0, "benchmarks")
import bench_quality as bq
import bm25s
from msa_memory.encode import load_model

passages, sources, queries, n_q = bq.build_eval(100, 100)
loaded = load_model("default", router_layers=(17,))
tok = loaded.tokenizer
n_tokens = np.array([len(loaded.wrap_ids(p, 0)) for p in passages])
plans = bq.haystacks(n_tokens, queries, n_q, 1048576, None)
docs, qidx = plans[0]
chunks, owner = [], []
for j, d in enumerate(docs):
    ids = loaded.wrap_ids(passages[d], 0)
    for s in range(0, len(ids), 64):
        chunks.append(tok.decode(ids[s:s + 64], skip_special_tokens=True))
        owner.append(j)
owner = torch.as_tensor(owner)
print(f"{len(docs)} passages, {len(chunks)} chunks", flush=True)
qtexts = [queries[i].text for i in qidx]


def bm25_full(texts):
    r = bm25s.BM25()
    r.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
    return r


def rec(sc):
    out = {}
    for kind in ("fact", "ict"):
        ranks = [int((sc[j] > sc[j, docs.index(queries[i].positives[0])]).sum()) for j, i in enumerate(qidx)
                 if queries[i].kind == kind]
        out[kind] = [round(float(np.mean(np.array(ranks) < k)), 2) for k in (1, 5, 16)]
    return out


qt = bm25s.tokenize(qtexts, stopwords="en", show_progress=False)
r = bm25_full([passages[d] for d in docs])
ids, sc = r.retrieve(qt, k=len(docs), show_progress=False)
full = torch.full((len(qidx), len(docs)), -1e9)
for j in range(len(qidx)):
    full[j, torch.as_tensor(ids[j].astype(np.int64))] = torch.as_tensor(sc[j], dtype=torch.float32)
print("BM25 whole passages  ", rec(full), flush=True)
rc = bm25_full(chunks)
ids, sc = rc.retrieve(qt, k=len(chunks), show_progress=False)
for how in ("max", "sum"):
    out = torch.zeros((len(qidx), len(docs))) if how == "sum" else torch.full((len(qidx), len(docs)), -1e9)
    for j in range(len(qidx)):
        cs = torch.zeros(len(chunks))
        cs[torch.as_tensor(ids[j].astype(np.int64))] = torch.as_tensor(sc[j], dtype=torch.float32)
        if how == "max":
            out[j] = torch.full((len(docs),), -1e9).scatter_reduce(0, owner, cs, "amax", include_self=False)
        else:
            out[j] = torch.zeros(len(docs)).scatter_add(0, owner, cs)
    print(f"BM25 64-token chunks, passage = {how} over its chunks", rec(out), flush=True)
