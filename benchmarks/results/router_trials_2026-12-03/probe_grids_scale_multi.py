"""probe_grids_scale.py for several adapters from one encode: bench_quality_scale's gpu step with
--adapter and --also-adapter (own weights: keys projected from the pooled x̄ of both grids), every
router layer of every scorer scored over MSA's aligned chunks (A) and the chunks shifted by 32 tokens
("no head", S), kept apart, so each adapter is reported with A alone, A+S at its layers 1-11 (shallow +
mid) and A+S at every layer. The A rows must repeat the step's own results (asserted).
Usage: the gpu step's arguments, e.g.
probe_grids_scale_multi.py --step gpu --carry /tmp/scale --adapter default --also-adapter DIR ... --sizes ...
Writes $OUT/scale_gpu.json (the step's) and $OUT/grids_scale_multi.json."""
import json, os, sys, time
from pathlib import Path
import numpy as np
import torch
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "router_trials_2026-12-02f"), str(HERE.parents[2]), str(HERE.parents[2] / "benchmarks")]
import probe_grids_scale as PG  # noqa: E402
import msa_memory.encode.encoder as E  # noqa: E402
import msa_memory.encode.forward as F  # noqa: E402
import msa_memory.train.scores as SC  # noqa: E402
import bench_quality_scale  # noqa: E402
from msa_memory.encode import RouterAdapter  # noqa: E402

SLOTS: list[tuple[int, int]] = []   # the (scorer, layer) of the i-th doc_scores call of a batch
SCORES: dict[tuple[int, int], dict[str, list]] = {}
N = {"calls": 0}


def doc_scores(cs, cd, n, chunk_reduce="max"):
    m = PG.G["mask"]
    A = PG._doc_scores(cs[:, ~m], cd[~m], n, chunk_reduce=chunk_reduce)
    S = PG._doc_scores(cs[:, m], cd[m], n, chunk_reduce=chunk_reduce)
    slot = SLOTS[N["calls"] % len(SLOTS)]
    N["calls"] += 1
    d = SCORES.setdefault(slot, {"A": [], "S": []})
    d["A"].append(A)
    d["S"].append(S)
    return A


def arg(name, many=False):
    vals = [sys.argv[i + 1] for i, a in enumerate(sys.argv) if a == name]
    return vals if many else (vals[0] if vals else None)


def main():
    base = RouterAdapter.load(arg("--adapter") or "default")
    assert base.config.chunk_reduce == "max"
    layers = list(base.config.router_layers)
    scorers = [("--adapter " + (arg("--adapter") or "default"), layers)]
    for name in arg("--also-adapter", many=True):   # as bench_quality_scale builds its scorers
        other = RouterAdapter.load(name)
        assert other.config.chunk_reduce == "max"
        sub = list(other.config.router_layers)
        if base.subset(sub).fingerprint() != other.fingerprint():
            scorers.append((name, sub))
    SLOTS[:] = [(si, l) for si, (_, sub) in enumerate(scorers) for l in sub]
    F.Backbone.run, E.Encoder.encode_tokens, SC.doc_scores = PG.run, PG.encode_tokens, doc_scores
    t0 = time.perf_counter()
    bench_quality_scale.main()
    wall = time.perf_counter() - t0
    out = Path(os.environ.get("OUT", "."))
    step = json.loads((out / "scale_gpu.json").read_text())
    d = np.load(Path(arg("--carry")) / "data.npz")
    kinds, pos = [str(x) for x in d["kinds"]], torch.as_tensor(d["positives"].astype(np.int64))
    sc = {k: {g: torch.cat(v[g], 1) for g in ("A", "S")} for k, v in SCORES.items()}
    deep = {13, 16, 17}
    res = {}
    for si, (name, sub) in enumerate(scorers):
        combos = {"A": set(), "A+S shallow+mid": set(sub) - deep, "A+S all": set(sub)}
        for cname, shift in combos.items():
            summed = sum(torch.maximum(sc[si, l]["A"], sc[si, l]["S"]) if l in shift else sc[si, l]["A"] for l in sub)
            for S, row in PG.recall_rows(summed, step, kinds, pos).items():
                res.setdefault(name, {}).setdefault(S, {})[cname] = row
    for S in step["results"]:   # the A rows against the step's own scoring
        assert res[scorers[0][0]][S]["A"] == step["results"][S]["routing"], S
        for name, o in step["also"].items():
            if name in res:
                assert res[name][S]["A"] == o["results"][S]["routing"], (name, S)
    f = lambda d: "/".join(f"{d[k]:.2f}" for k in ("1", "5", "16"))  # noqa: E731
    sizes = list(step["results"])
    print(f"{'adapter, grids':<48} " + " ".join(f"{'needles ' + S:>18} {'cloze ' + S:>18}" for S in sizes))
    for name in res:
        for cname in res[name][sizes[0]]:
            print(f"{Path(name).name[-24:] + ', ' + cname:<48} "
                  + " ".join(f"{f(res[name][S][cname]['fact']):>18} {f(res[name][S][cname]['ict']):>18}" for S in sizes))
    summary = {"probe": "grids_scale_multi", "device": step["device"], "digest": step["digest"],
               "scorers": {name: {"router_layers": sub, "router_id": RouterAdapter.load(name.split(" ")[-1]).fingerprint()}
                           for name, sub in scorers},
               "encode_seconds_incl_shifted_pooling": step["encode_seconds"],
               "score_seconds": step["score_seconds_all_queries_all_layers"], "wall_seconds": round(wall, 1),
               "results": res}
    (out / "grids_scale_multi.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
