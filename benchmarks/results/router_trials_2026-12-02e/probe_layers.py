"""Per-layer doc scores of the default adapter on bench_quality's haystacks; recall of each layer alone, of
the sum, of z-scored sums and of oracle-weighted sums (upper bound, tuned on the eval itself)."""
import os, sys, itertools
import numpy as np, torch
sys.argv = sys.argv[:2]
exec(open(__file__.replace("probe_layers", "probe_center")).read().split("variants = [")[0])

def per_layer(docs, qidx):
    docs_t = torch.as_tensor(docs)
    local = torch.full((int(chunk_doc.max()) + 1,), -1, dtype=torch.long)
    local[docs_t] = torch.arange(len(docs))
    sel = local[chunk_doc] >= 0
    cdoc = local[chunk_doc[sel]]
    return torch.stack([layer_doc_scores(QT[l], qoff, qidx, K[l][sel], cdoc, len(docs)) for l in cfg.router_layers])

def rec(scs, w):
    acc = {"fact": [], "ict": []}
    for (docs, qidx), sc in scs:
        tot = (sc * torch.as_tensor(w, dtype=torch.float32)[:, None, None]).sum(0)
        for j, i in enumerate(qidx):
            pos = docs.index(queries[i].positives[0])
            acc[queries[i].kind].append(int((tot[j] > tot[j, pos]).sum()))
    return {k: [round(float(np.mean(np.array(r) < kk)), 2) for kk in (1, 5, 16)] for k, r in acc.items()}

L = list(cfg.router_layers)
for S in sizes:
    scs = [((d, q), per_layer(d, q)) for d, q in plans[S]]
    print(S, "sum", rec(scs, [1] * len(L)))
    for i, l in enumerate(L):
        print(S, f"L{l} alone", rec(scs, [1 if j == i else 0 for j in range(len(L))]))
    # std of each layer's scores over docs (scale differences)
    sd = torch.stack([sc.std(dim=2).mean(1) for _, sc in scs]).mean(0)
    print(S, "per-layer score std", [round(float(v), 4) for v in sd])
    print(S, "z-weighted (1/std)", rec(scs, (1 / sd).tolist()))
    for drop in range(len(L)):
        print(S, f"without L{L[drop]}", rec(scs, [0 if j == drop else 1 for j in range(len(L))]))
