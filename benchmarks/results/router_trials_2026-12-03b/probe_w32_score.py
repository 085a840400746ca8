"""Probe (fourteenth session): route bench_quality's queries over 32- and 64-token windows, per layer.

Reads the W32 / W32s cache of ``probe_w32_extract.py``; builds A64 (MSA's aligned chunks), S64 (the shipped
shifted grid), A32 and S32 per passage; scores every (layer, grid) pair once per haystack with the shipped
default adapter's weights (no training), then combines: a layer with several grids scores a passage by its
best window over them (chunk max), the layers are summed (as runtime.Memory routes). Recall@1/5/16 at every
bench_quality size for needles and cloze. The row "A64 + S64@1,5,8,11" is the shipped default and must
repeat bench_quality's figures (up to bf16 rounding of its cache).
"""
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
import bench_quality as bq  # noqa: E402
from msa_memory.encode import RouterAdapter, load_model  # noqa: E402
from msa_memory.train.features import extract_queries  # noqa: E402
from msa_memory.train.scores import chunk_scores, doc_scores  # noqa: E402

torch.set_num_threads(2)
SIZES = [16384, 131072, 1048576]
cache = ROOT / ".bench" / "w32"
loaded = load_model("default")
adapter = RouterAdapter.load(ROOT / "msa_memory" / "data" / "gemma3-270m-router")
cfg = adapter.config
layers = list(cfg.router_layers)
passages, sources, queries, n_q = bq.build_eval(100, 100)
n_tokens, plans, n_needed = bq.plan_haystacks(loaded, passages, queries, n_q, SIZES, 10)
qf = cache / "queries.pt"
if qf.is_file():
    qx, qoff = torch.load(qf)
else:
    qx, qoff = extract_queries(loaded, [q.text for q in queries])
    torch.save((qx, qoff), qf)

xs, cds, xss, cdss = [], [], [], []
for b0 in range(0, n_needed, 256):
    d = torch.load(cache / f"w32_{b0:06d}.pt", weights_only=True)
    assert d["layers"] == layers
    xs.append(d["x"]); cds.append(d["cd"]); xss.append(d["xs"]); cdss.append(d["cds"])
w32, cd32, w32s, cd32s = torch.cat(xs, 1), torch.cat(cds), torch.cat(xss, 1), torch.cat(cdss)
lens = n_tokens[:n_needed]


def combine(pairs_fn):
    """Pool 64-token windows as count-weighted means of W32 windows: pairs_fn(n) -> list of lists of W32
    window indices (within the passage) per output window."""
    rows, outs, wts, cd = [], [], [], []
    start, o = 0, 0
    for p, n in enumerate(lens):
        m = -(-int(n) // 32)
        cnt = [min(32, int(n) - 32 * i) for i in range(m)]
        for grp in pairs_fn(int(n), m):
            for i in grp:
                rows.append(start + i); outs.append(o); wts.append(cnt[i])
            cd.append(p); o += 1
        start += m
    assert start == w32.shape[1]
    rows, outs, wts = torch.tensor(rows), torch.tensor(outs), torch.tensor(wts, dtype=torch.float32)
    x = torch.zeros(w32.shape[0], o, w32.shape[2])
    x.index_add_(1, outs, w32[:, rows] * wts[None, :, None])
    tot = torch.zeros(o).index_add_(0, outs, wts)
    return x / tot[None, :, None], torch.tensor(cd)


a64 = combine(lambda n, m: [list(range(i, min(i + 2, m))) for i in range(0, m, 2)])
s64 = combine(lambda n, m: [[0]] if n <= 32 else [list(range(i, min(i + 2, m))) for i in range(1, m, 2)])
grids = {"A64": a64, "S64": s64, "A32": (w32, cd32), "S32": (w32s, cd32s)}
for g, (x, cd) in grids.items():
    print(g, tuple(x.shape), flush=True)


def grid_doc_scores(li, l, x, cd, docs, qidx):
    local = torch.full((n_needed,), -1, dtype=torch.long)
    local[torch.as_tensor(docs)] = torch.arange(len(docs))
    sel = local[cd] >= 0
    with torch.no_grad():
        k = adapter.router_k(l, x[li][sel])
        out = torch.zeros(len(qidx), len(docs))
        for s in range(0, len(qidx), 16):
            qs = qidx[s:s + 16]
            ln = [int(qoff[i + 1] - qoff[i]) for i in qs]
            q = torch.zeros(len(qs), max(ln), qx.shape[-1])
            msk = torch.zeros(len(qs), max(ln), dtype=torch.bool)
            for j, i in enumerate(qs):
                q[j, :ln[j]] = qx[qoff[i]:qoff[i + 1], li].float()
                msk[j, :ln[j]] = True
            cs = chunk_scores(adapter.router_q(l, q), msk, k, score=cfg.score, head_reduce=cfg.head_reduce,
                              query_reduce=cfg.query_reduce)
            out[s:s + len(qs)] = doc_scores(cs, local[cd[sel]], len(docs), chunk_reduce=cfg.chunk_reduce)
    return out


ALL = set(layers)
SH = {1, 5, 8, 11}
DEEP = {13, 16, 17}
combos = {
    "A64 (aligned only)": {"A64": ALL},
    "A64 + S64@1,5,8,11 (shipped default)": {"A64": ALL, "S64": SH},
    "A64 + S64@all": {"A64": ALL, "S64": ALL},
    "A32 + S32 @all (32-token windows only)": {"A32": ALL, "S32": ALL},
    "A32 @all": {"A32": ALL},
    "default + A32@all": {"A64": ALL, "S64": SH, "A32": ALL},
    "default + A32,S32@all": {"A64": ALL, "S64": SH, "A32": ALL, "S32": ALL},
    "default + A32,S32@1,5,8,11": {"A64": ALL, "S64": SH, "A32": SH, "S32": SH},
    "default + A32,S32@13,16,17": {"A64": ALL, "S64": SH, "A32": DEEP, "S32": DEEP},
    "default + A32@1,5,8,11": {"A64": ALL, "S64": SH, "A32": SH},
    "default + A32@13,16,17": {"A64": ALL, "S64": SH, "A32": DEEP},
    "A64 + S64 + A32 + S32 @all": {"A64": ALL, "S64": ALL, "A32": ALL, "S32": ALL},
}
for l in layers:   # one layer at a time with 32-token windows added
    combos[f"default + A32,S32@{l}"] = {"A64": ALL, "S64": SH, "A32": {l}, "S32": {l}}

t0 = time.perf_counter()
results = {}
per_query = {}
for S in SIZES:
    acc = {c: {"fact": [], "ict": []} for c in combos}
    for docs, qidx in plans[S]:
        sc = {(g, l): grid_doc_scores(li, l, *grids[g], docs, qidx) for g in grids for li, l in enumerate(layers)}
        pos_local = [[docs.index(p) for p in queries[i].positives] for i in qidx]
        for c, spec in combos.items():
            tot = torch.zeros(len(qidx), len(docs))
            for l in layers:
                gs = [g for g, ls in spec.items() if l in ls]
                if gs:
                    tot += torch.stack([sc[(g, l)] for g in gs]).amax(0)
            for kind in ("fact", "ict"):
                m = [j for j, i in enumerate(qidx) if queries[i].kind == kind]
                r = bq.recall(tot[m], [pos_local[j] for j in m])
                acc[c][kind].append((len(m), r))
                ranks = [(tot[j] > tot[j, pos_local[j][0]]).sum().item() for j in m]
                per_query.setdefault(c, {}).setdefault(str(S), {}).setdefault(kind, []).extend(ranks)
    results[S] = {c: {k: {kk: sum(n * r[kk] for n, r in v) / sum(n for n, _ in v) for kk in bq.KS}
                      for k, v in kinds.items()} for c, kinds in acc.items()}
    print(f"size {S} scored ({time.perf_counter() - t0:.0f}s)", flush=True)

print(f"\n{'grids':<42} {'kind':<6} " + " ".join(f"{S // 1024:>5}K r@1/5/16   " for S in SIZES))
for c in combos:
    for kind in ("fact", "ict"):
        cells = [f"{results[S][c][kind][1]:.2f}/{results[S][c][kind][5]:.2f}/{results[S][c][kind][16]:.2f}" for S in SIZES]
        print(f"{c:<42} {('needle' if kind == 'fact' else 'cloze'):<6} " + "   ".join(f"{x:>16}" for x in cells))
out = Path(__file__).with_name("probe_w32_cpu.json")
out.write_text(json.dumps({"results": {str(S): v for S, v in results.items()}, "ranks": per_query,
                           "combos": {c: {g: sorted(v) for g, v in s.items()} for c, s in combos.items()}}, indent=1))
print(json.dumps({c: [results[S][c]["fact"][16] for S in SIZES] + [results[S][c]["ict"][16] for S in SIZES]
                  for c in combos}))
