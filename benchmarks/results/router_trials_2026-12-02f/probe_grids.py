"""Routing with extra router-key grids beside MSA's aligned 64-token chunks, chosen per router layer,
at bench_quality's haystacks, with the shipped default's trained weights (no retraining). Grids:
A  aligned 64-token chunks (MSA);  S  chunks shifted by 32 tokens, no head (probe_shifted_chunks.py's
cache);  W2  the mean x̄ of two adjacent aligned chunks of one document (a 128-token window, stride 64);
W4 four (256 tokens, stride 64);  D  the mean x̄ of all of a document's chunks. A window's x̄ is the
plain mean of its chunks' x̄ (a partial last chunk counts as a whole one). With chunk_reduce max, a
layer routing over the union of grids scores a document by the max of its per-grid scores, so each
grid is scored once per layer and the combinations are elementwise maxima, summed over layers.
Usage: probe_grids.py CACHE OUT.json. Prints a table and one JSON line."""
import itertools, json, sys, time
from pathlib import Path
import torch
HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
sys.path.insert(0, str(ROOT / "benchmarks")); sys.path.insert(0, str(HERE))
import bench_quality as bq
from probe_shifted_chunks import shifted_features
from msa_memory.encode import RouterAdapter, load_model
from msa_memory.train.features import extract_queries
from msa_memory.train.scores import chunk_scores, doc_scores


def windows(x, cd, w):
    """(L, C', H) means of w consecutive aligned chunks of one document (stride 1 chunk)."""
    C = cd.shape[0]
    if w == 0:   # whole document
        docs, inv = torch.unique_consecutive(cd, return_inverse=True)
        s = torch.zeros(x.shape[0], len(docs), x.shape[2]).index_add_(1, inv, x.float())
        n = torch.bincount(inv).float()
        return (s / n[None, :, None]).to(torch.bfloat16), docs
    start = torch.arange(C - w + 1)
    ok = cd[start] == cd[start + w - 1]
    start = start[ok]
    acc = sum(x[:, start + j].float() for j in range(w)) / w
    return acc.to(torch.bfloat16), cd[start]


def layer_doc_scores(adapter, l, li, x, cd, qx, qoff, docs, qidx, cfg):
    docs_t = torch.as_tensor(docs)
    local = torch.full((int(cd.max()) + 1,), -1, dtype=torch.long)
    local[docs_t[docs_t <= cd.max()]] = torch.arange(len(docs))[docs_t <= cd.max()]
    sel = local[cd.clamp_max(local.shape[0] - 1)] >= 0
    cdoc = local[cd[sel]]
    out = torch.zeros(len(qidx), len(docs))
    with torch.no_grad():
        k = adapter.router_k(l, x[li][sel].float())
        for s in range(0, len(qidx), 16):
            qs = qidx[s:s + 16]
            lens = [int(qoff[i + 1] - qoff[i]) for i in qs]
            q = torch.zeros(len(qs), max(lens), qx.shape[-1]); m = torch.zeros(len(qs), max(lens), dtype=torch.bool)
            for j, i in enumerate(qs):
                q[j, :lens[j]] = qx[qoff[i]:qoff[i + 1], li].float(); m[j, :lens[j]] = True
            cs = chunk_scores(adapter.router_q(l, q), m, k, score=cfg.score, head_reduce=cfg.head_reduce, query_reduce=cfg.query_reduce)
            out[s:s + len(qs)] = doc_scores(cs, cdoc, len(docs), chunk_reduce=cfg.chunk_reduce)
    return out


def main():
    cache, out = Path(sys.argv[1]), Path(sys.argv[2])
    adapter = RouterAdapter.load("default"); cfg = adapter.config
    layers = list(cfg.router_layers)
    tag = "L" + "-".join(map(str, layers))
    passages, _, queries, n_q = bq.build_eval(100, 100)
    loaded = load_model("default", router_layers=tuple(layers))
    sizes = [16384, 131072, 1048576]
    _, plans, n_needed = bq.plan_haystacks(loaded, passages, queries, n_q, sizes, 10)
    xa, cda = bq.pool_features(loaded, passages, n_needed, cache / tag)
    xs, cds = shifted_features(loaded, passages, n_needed, cache / f"shifted-{tag}")
    qx, qoff = extract_queries(loaded, [q.text for q in queries])
    first = torch.ones_like(cds, dtype=torch.bool); first[1:] = cds[1:] != cds[:-1]
    grids = {"A": (xa, cda), "S": (xs[:, ~first], cds[~first]), "W2": windows(xa, cda, 2),
             "W4": windows(xa, cda, 4), "D": windows(xa, cda, 0)}
    print({g: int(v[1].shape[0]) for g, v in grids.items()}, file=sys.stderr)
    t0 = time.perf_counter()
    # per[S][plan][grid][layer] -> (Q, N) scores
    per = {S: [{g: {l: layer_doc_scores(adapter, l, li, x, cd, qx, qoff, docs, qidx, cfg)
                    for li, l in enumerate(layers)} for g, (x, cd) in grids.items()}
               for docs, qidx in plans[S]] for S in sizes}
    print(f"scored in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    deep, shallow = {13, 16, 17}, {1, 5, 8, 11}
    combos = {"A (MSA)": {l: ["A"] for l in layers},
              "A+S all": {l: ["A", "S"] for l in layers},
              "A+S deep": {l: ["A", "S"] if l in deep else ["A"] for l in layers},
              "A+S shallow+mid": {l: ["A", "S"] if l in shallow else ["A"] for l in layers}}
    for g in ("W2", "W4", "D"):
        combos[f"A+{g} all"] = {l: ["A", g] for l in layers}
        combos[f"A+{g} shallow+mid"] = {l: ["A", g] if l in shallow else ["A"] for l in layers}
        combos[f"A+{g} deep"] = {l: ["A", g] if l in deep else ["A"] for l in layers}
        combos[f"A+S deep, A+{g} shallow+mid"] = {l: ["A", "S"] if l in deep else ["A", g] for l in layers}
    for l in layers:
        combos[f"A+S at L{l} only"] = {m: ["A", "S"] if m == l else ["A"] for m in layers}
    res = {}
    for S in sizes:
        for name, spec in combos.items():
            acc = {}
            for (docs, qidx), sc in zip(plans[S], per[S]):
                s = sum(torch.stack([sc[g][l] for g in spec[l]]).amax(0) for l in layers)
                for kind in ("fact", "ict"):
                    m = [j for j, i in enumerate(qidx) if queries[i].kind == kind]
                    if m:
                        r = bq.recall(s[m], [[docs.index(p) for p in queries[qidx[j]].positives] for j in m])
                        acc.setdefault(kind, []).append((len(m), r))
            res.setdefault(str(S), {})[name] = {k: {kk: sum(n * r[kk] for n, r in v) / sum(n for n, _ in v)
                                                    for kk in bq.KS} for k, v in acc.items()}
    f = lambda d: "/".join(f"{d[k]:.2f}" for k in bq.KS)  # noqa: E731
    print(f"{'grids':<34} " + " ".join(f"{'needles ' + S:>16} {'cloze ' + S:>16}" for S in map(str, sizes)))
    for name in combos:
        print(f"{name:<34} " + " ".join(f"{f(res[str(S)][name]['fact']):>16} {f(res[str(S)][name]['ict']):>16}" for S in sizes))
    summary = {"probe": "grids", "router_id": adapter.fingerprint(),
               "rows": {g: int(v[1].shape[0]) for g, v in grids.items()}, "combos": combos, "results": res}
    out.write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
