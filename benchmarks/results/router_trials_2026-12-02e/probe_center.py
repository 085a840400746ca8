"""Probe: hubness corrections of the default adapter's routing on bench_quality's haystacks (cached x̄).

Variants (all cosine, head mean, query max, chunk max, summed over layers):
  base      the shipped formula
  kc        keys centred: k - mean over the haystack's chunks (raw keys), then cosine
  kcn       normalised keys centred: n(k) - mean n(k)
  qc        queries centred with the mean router-q of the haystack's chunk means (store-computable)
  kc+qc
  csls_c a  s - a * r_d, r_d = mean score of doc d over 256 pseudo-queries (router-q of random chunk means)
  csls_q a  the same with the 200 eval queries as pseudo-queries (transductive upper bound)
"""
import sys, time, json
from pathlib import Path
import numpy as np, torch
sys.path.insert(0, "benchmarks")
import bench_quality as bq
from msa_memory.encode import RouterAdapter, load_model
from msa_memory.train.features import extract_queries
from msa_memory.train.scores import chunk_scores, doc_scores

torch.manual_seed(0)
ad_path = sys.argv[1] if len(sys.argv) > 1 else "msa_memory/data/gemma3-270m-router"
cache_layers = (1, 2, 5, 8, 11, 14, 17)
ad = RouterAdapter.load(ad_path)
cfg = ad.config
passages, sources, queries, n_q = bq.build_eval(100, 100)
loaded = load_model("default", router_layers=cache_layers)
n_tokens = np.array([len(loaded.wrap_ids(p, 0)) for p in passages])
import os
sizes = [int(v) for v in os.environ.get('SIZES', '16384,131072,1048576').split(',')]
plans = {S: bq.haystacks(n_tokens, queries, n_q, S, 10 if S <= 16384 else None) for S in sizes}
n_needed = max(max(d) for S in sizes for d, _ in plans[S]) + 1
x, chunk_doc = bq.pool_features(loaded, passages, n_needed, Path(".bench/quality_q200") / ("L" + "-".join(map(str, cache_layers))))
qx, qoff = extract_queries(loaded, [q.text for q in queries])
print("features ready", x.shape, flush=True)

# per layer: raw keys of all chunks, router-q of all query tokens, router-q of chunk means
K, QT, QC = {}, {}, {}
with torch.no_grad():
    for l in cfg.router_layers:
        li = cache_layers.index(l)
        K[l] = ad.router_k(l, x[li].float())                     # (C, Hk, D)
        QT[l] = ad.router_q(l, qx[:, li].float())                # (Tq, Hq, D)
        QC[l] = ad.router_q(l, x[li].float())                    # (C, Hq, D)
nrm = torch.nn.functional.normalize


def layer_doc_scores(q_tok, qo, qidx, k, cdoc, n_docs):
    """(len(qidx), n_docs) at one layer; q_tok flat tokens with offsets qo."""
    out = []
    for s in range(0, len(qidx), 16):
        qs = qidx[s:s + 16]
        lens = [int(qo[i + 1] - qo[i]) for i in qs]
        T = max(lens)
        q = torch.zeros(len(qs), T, *q_tok.shape[1:])
        m = torch.zeros(len(qs), T, dtype=torch.bool)
        for j, i in enumerate(qs):
            q[j, :lens[j]] = q_tok[qo[i]:qo[i + 1]]
            m[j, :lens[j]] = True
        cs = chunk_scores(q, m, k, score="cosine", head_reduce=cfg.head_reduce, query_reduce=cfg.query_reduce)
        out.append(doc_scores(cs, cdoc, n_docs, chunk_reduce=cfg.chunk_reduce))
    return torch.cat(out)


def late_doc_scores(q_tok, qo, qidx, k, cdoc, n_docs, how, alpha):
    """late interaction: per token, max over each doc's chunks; then reduce over tokens."""
    Hq, D = q_tok.shape[1:]
    Hk = k.shape[1]
    kn = nrm(k.float(), dim=-1).reshape(len(k), Hk * D)
    out = torch.empty(len(qidx), n_docs)
    idx = cdoc.to(torch.int64)
    for j, i in enumerate(qidx):
        q = nrm(q_tok[qo[i]:qo[i + 1]].float(), dim=-1)
        qg = q.reshape(len(q), Hk, Hq // Hk, D).sum(2).reshape(len(q), Hk * D) / Hq
        s = qg @ kn.T                                                     # (T, C)
        d = torch.full((len(q), n_docs), -1e9).scatter_reduce(1, idx[None].expand(len(q), -1), s, "amax", include_self=False)
        if how == "mean":
            out[j] = d.mean(0)
        elif how == "maxmean":
            out[j] = d.max(0).values + alpha * d.mean(0)
        elif how == "top":
            out[j] = d.topk(min(int(alpha), len(q)), dim=0).values.mean(0)
        elif how == "lse":
            out[j] = torch.logsumexp(d / alpha, 0) * alpha
    return out


def scores(variant, alpha, docs, qidx):
    docs_t = torch.as_tensor(docs)
    local = torch.full((int(chunk_doc.max()) + 1,), -1, dtype=torch.long)
    local[docs_t] = torch.arange(len(docs))
    sel = local[chunk_doc] >= 0
    cdoc = local[chunk_doc[sel]]
    total = torch.zeros(len(qidx), len(docs))
    g = torch.Generator().manual_seed(0)
    for l in cfg.router_layers:
        k = K[l][sel]
        qt = QT[l]
        if variant in ("kc", "kc+qc"):
            k = k - k.mean(0, keepdim=True)
        if variant == "kcn":
            k = nrm(k, dim=-1)
            k = k - k.mean(0, keepdim=True)
        if variant in ("qc", "kc+qc"):
            qt = nrm(qt, dim=-1) - nrm(QC[l][sel], dim=-1).mean(0, keepdim=True)
        if variant.startswith("late_"):
            s = late_doc_scores(qt, qoff, qidx, k, cdoc, len(docs), variant[5:], alpha)
        else:
            s = layer_doc_scores(qt, qoff, qidx, k, cdoc, len(docs))
        if variant.startswith("csls"):
            if variant == "csls_c":
                pick = torch.randperm(int(sel.sum()), generator=g)[:256]
                pq = QC[l][sel][pick][:, None]                      # (P, 1, Hq, D) single-token pseudo-queries
                po = torch.arange(len(pick) + 1)
                r = layer_doc_scores(pq.reshape(len(pick), *pq.shape[2:]), po, list(range(len(pick))), k, cdoc, len(docs))
            else:
                r = layer_doc_scores(qt, qoff, list(range(len(queries))), k, cdoc, len(docs))
            s = s - alpha * r.mean(0, keepdim=True)
        total += s
    return total


variants = [("base", 0), ("kc", 0), ("kcn", 0), ("qc", 0), ("kc+qc", 0), ("csls_c", 0.5), ("csls_c", 1.0),
            ("csls_q", 0.5), ("csls_q", 1.0), ("late_mean", 0), ("late_maxmean", 1.0), ("late_maxmean", 3.0),
            ("late_top", 3), ("late_top", 6), ("late_lse", 0.05), ("late_lse", 0.1)]
only = sys.argv[2].split(",") if len(sys.argv) > 2 else None
res = {}
for v, a in variants:
    name = f"{v}{'' if not a else ' ' + str(a)}"
    if only and name.split()[0] not in only:
        continue
    t = time.time()
    row = {}
    for S in sizes:
        acc = {"fact": [], "ict": []}
        for docs, qidx in plans[S]:
            sc = scores(v, a, docs, qidx)
            for j, i in enumerate(qidx):
                pos = docs.index(queries[i].positives[0])
                rank = int((sc[j] > sc[j, pos]).sum())
                acc[queries[i].kind].append(rank)
        row[S] = {kind: [float(np.mean(np.array(r) < kk)) for kk in (1, 5, 16)] for kind, r in acc.items()}
    res[name] = row
    print(f"{name:12s} " + "  ".join(f"{S//1024}K f{row[S]['fact']} c{row[S]['ict']}" for S in sizes), f"({time.time()-t:.0f}s)", flush=True)
json.dump(res, open(".bench/s9/probe_center.json", "w"), indent=1)
