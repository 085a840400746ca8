"""bench_quality_scale's gpu step scoring, from one forward per batch, every router layer over MSA's
aligned 64-token chunks (A) and over chunks shifted by 32 tokens with each document's first 32 tokens
left out (S, probe_shifted_chunks' "no head" grid), kept apart per layer, so that any per-layer choice
of grids (A alone, or the max over A and S: chunk_reduce max over their union) is scored afterwards
from the same encode. The step's own results are A alone (MSA; they must repeat its committed figures).
Unlike probe_shifted_scale.py (a second forward per batch) the shifted x̄ are pooled from the same
layer inputs. Usage: the gpu step's own arguments, e.g.
probe_grids_scale.py --step gpu --carry /tmp/scale --adapter default --sizes 1048576,10485760,104857600
Writes $OUT/scale_gpu.json (the step's) and $OUT/grids_scale.json (the combinations)."""
import dataclasses, json, os, sys, time
from pathlib import Path
import numpy as np
import torch
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[2]), str(HERE.parents[2] / "benchmarks")]
import msa_memory.encode.encoder as E
import msa_memory.encode.forward as F
import msa_memory.train.scores as SC
from msa_memory.encode.pooling import chunk_mean_pool
import probe_shifted_chunks as P
import bench_quality_scale

G = {"lens": None, "side": {}, "mask": None, "calls": 0, "scores": {}}
_run, _encode, _doc_scores = F.Backbone.run, E.Encoder.encode_tokens, SC.doc_scores


def run(self, ids, pos, attention, *a, on_layer_input=None, **kw):
    if G["lens"] is None:   # not an encode_tokens forward (the router queries)
        return _run(self, ids, pos, attention, *a, on_layer_input=on_layer_input, **kw)
    lay = P.shifted_layout(G["lens"], 64, device=pos.device)

    def oi(layer, x):
        on_layer_input(layer, x)
        G["side"][layer] = chunk_mean_pool(x[0], lay)
    return _run(self, ids, pos, attention, *a, on_layer_input=oi, **kw)


def encode_tokens(self, seqs):
    lens = G["lens"] = [len(s) for s in seqs]
    G["side"] = {}
    try:
        a = _encode(self, seqs)
    finally:
        G["lens"] = None
    layers = self.model.router_layers
    lay = P.shifted_layout(lens, 64)
    xs = torch.stack([G["side"][l] for l in layers])
    na, ns = list(a.n_chunks), list(lay.n_chunks)
    ca, idx, mask, oa, os_, nb = sum(na), [], [], 0, 0, []
    for j in range(len(seqs)):
        h, r = ns[2 * j], ns[2 * j + 1]
        idx += list(range(oa, oa + na[j])) + list(range(ca + os_ + h, ca + os_ + h + r))
        mask += [False] * na[j] + [True] * r
        oa, os_ = oa + na[j], os_ + h + r
        nb.append(na[j] + r)
    idx = torch.as_tensor(idx, device=a.x.device)
    x = torch.cat([a.x, xs], 1).index_select(1, idx)
    kr = torch.stack([self.model.router.keys_from_pooled(l, x[i]) for i, l in enumerate(layers)])
    G["mask"] = torch.as_tensor(mask, device=a.x.device)
    G["L"] = len(layers)
    return dataclasses.replace(a, n_chunks=nb, x=x, k_router=kr)   # k, v: aligned only (unused here)


def doc_scores(cs, cd, n, chunk_reduce="max"):
    m = G["mask"]
    A = _doc_scores(cs[:, ~m], cd[~m], n, chunk_reduce=chunk_reduce)
    S = _doc_scores(cs[:, m], cd[m], n, chunk_reduce=chunk_reduce)
    j = G["calls"] % G["L"]
    G["calls"] += 1
    G["scores"].setdefault(j, {"A": [], "S": []})
    G["scores"][j]["A"].append(A)
    G["scores"][j]["S"].append(S)
    return A


def main():
    assert chunk_reduce_is_max()
    F.Backbone.run, E.Encoder.encode_tokens, SC.doc_scores = run, encode_tokens, doc_scores
    t0 = time.perf_counter()
    bench_quality_scale.main()
    wall = time.perf_counter() - t0
    out = Path(os.environ.get("OUT", "."))
    step = json.loads((out / "scale_gpu.json").read_text())
    layers = step["router_layers"]
    carry = Path(sys.argv[sys.argv.index("--carry") + 1])
    d = np.load(carry / "data.npz")
    kinds, pos = [str(x) for x in d["kinds"]], torch.as_tensor(d["positives"].astype(np.int64))
    sc = {j: {g: torch.cat(v[g], 1) for g in ("A", "S")} for j, v in G["scores"].items()}
    deep = {13, 16, 17}
    combos = {"A (MSA)": set(), "A+S all": set(layers), "A+S deep": deep & set(layers),
              "A+S shallow+mid": set(layers) - deep} | {f"A+S at L{l} only": {l} for l in layers}
    res = {}
    for name, shift in combos.items():
        summed = sum(torch.maximum(sc[j]["A"], sc[j]["S"]) if l in shift else sc[j]["A"] for j, l in enumerate(layers))
        for S, row in recall_rows(summed, step, kinds, pos).items():
            res.setdefault(S, {})[name] = row
    for S in step["results"]:   # the step's own (A alone) results, scored by it: the check of this sum
        assert res[S]["A (MSA)"] == step["results"][S]["routing"], (S, res[S]["A (MSA)"], step["results"][S]["routing"])
    f = lambda d: "/".join(f"{d[k]:.2f}" for k in ("1", "5", "16"))  # noqa: E731
    print(f"{'grids':<22} " + " ".join(f"{'needles ' + S:>18} {'cloze ' + S:>18}" for S in res))
    for name in combos:
        print(f"{name:<22} " + " ".join(f"{f(res[S][name]['fact']):>18} {f(res[S][name]['ict']):>18}" for S in res))
    summary = {"probe": "grids_scale", "device": step["device"], "digest": step["digest"], "router_id": step["router_id"],
               "encode_seconds_incl_shifted_pooling": step["encode_seconds"],
               "score_seconds_both_grids": step["score_seconds_all_queries_all_layers"], "wall_seconds": round(wall, 1),
               "combos": {k: sorted(v) for k, v in combos.items()}, "results": res}
    (out / "grids_scale.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))


def recall_rows(summed, step, kinds, pos):
    """Per prepared size of the step: recall@1/5/16 per query kind of (Q, docs) summed scores."""
    res = {}
    for S, r in step["results"].items():
        top = summed[:, : r["docs"]].topk(16, dim=1).indices.cpu()
        row = {}
        for kind in ("fact", "ict"):
            ii = [i for i in range(len(kinds)) if kinds[i] == kind]
            row[kind] = {str(k): float(np.mean([int(pos[i]) in top[i, :k].tolist() for i in ii])) for k in (1, 5, 16)}
        res[S] = row
    return res


def chunk_reduce_is_max():
    from msa_memory.encode import RouterAdapter
    a = sys.argv[sys.argv.index("--adapter") + 1] if "--adapter" in sys.argv else "default"
    return RouterAdapter.load(a).config.chunk_reduce == "max"


if __name__ == "__main__":
    main()
