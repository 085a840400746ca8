"""Memory Parallel: routing with router keys sharded over several devices or processes, against one device.

What runs (every figure beside its baseline from the same run, on the machine named in the JSON):

- Router keys of the MSA-4B shape (``--shape msa4b``: 18 router layers × 8 KV heads × 128 dims, bf16, a
  32-head query of ``--q-tokens`` tokens, MSA's dot/√d routing, head mean, query max, chunk max, top-16;
  msa-reference.md §1.2) or of the default model (``--shape gemma``: 6 layers × 1 × 256), random values,
  ~7 chunks (450 tokens) a document, for each memory size in ``--tokens``.
- For each device set in ``--devices`` (``|`` between sets, ``,`` inside one; default: 1, 2 and 4 GPUs as
  far as the host has them, or 1 and 2 CPU shards): ``ShardedRouterIndex.route`` of one router layer,
  median over ``--rounds`` calls per layer on every layer (the same shards), against the single-device
  ``RouterIndex`` (where the keys fit one device) and the HBM floor of the set (the largest shard's key
  bytes ÷ that device's copy bandwidth, read + write bytes counted, the fastest of 7 copies).
- ``--procs N``: the same over N processes joined by torch.distributed (NCCL on GPUs, one GPU a rank;
  gloo on CPU), ``DistributedRouterIndex.route``, the median of the slowest rank's calls.
- The routing part of a pooled answer's time to first token: the sum of the per-layer medians over all
  router layers (one merge per layer: the next layer's query depends on this layer's routed K̄V̄, so a
  prefill makes exactly ``n_layers`` synchronisations; a search makes one). The model's own prefill is
  the same whatever the sharding (``bench_msa4b.py`` measures it on one GPU).
- Every sharded route is checked against the single-device one (same documents, same scores) where both ran.

Status: the multi-GPU rows need a host with several GPUs, which this project has not been lent yet. The
command for one, with the wheels ``bench_msa4b.py`` names carried in ``.whl``::

    python3 benchmarks/bench_parallel.py --tokens 10M,100M --devices "cuda:0|cuda:0,cuda:1|cuda:0,cuda:1,cuda:2,cuda:3" \
        --procs 2,4 --out $OUT

Usage::

    python benchmarks/bench_parallel.py --tokens 1M --shape gemma --devices "cpu|cpu,cpu" --procs 2   # CPU

Prints a table, then one JSON line (device, commit, config, rows); ``--out`` gets the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import copy_bandwidth, git_commit  # noqa: E402

from msa_memory.routing.parallel import DistributedRouterIndex, ShardedRouterIndex  # noqa: E402
from msa_memory.routing import RouterIndex, RoutingConfig  # noqa: E402

SHAPES = {"msa4b": dict(L=18, H=8, Hq=32, D=128), "gemma": dict(L=6, H=1, Hq=4, D=256)}
CHUNK_TOKENS, CHUNKS_PER_DOC = 64, 7


def parse_tokens(s: str) -> int:
    s = s.strip().upper()
    mult = {"K": 10**3, "M": 10**6, "G": 10**9}.get(s[-1], 1)
    return int(float(s[:-1] if s[-1] in "KMG" else s) * mult)


def synth(tokens: int, shape: dict, seed: int = 0) -> tuple[list[torch.Tensor], np.ndarray, np.ndarray]:
    """Random bf16 router keys of every layer (host), the chunk → document map and the document ids."""
    C = max(1, tokens // CHUNK_TOKENS)
    n_docs = max(1, C // CHUNKS_PER_DOC)
    chunk_doc = np.minimum(np.arange(C) // CHUNKS_PER_DOC, n_docs - 1)
    gen = torch.Generator().manual_seed(seed)
    keys = [torch.randn(C, shape["H"], shape["D"], generator=gen, dtype=torch.float32).to(torch.bfloat16)
            for _ in range(shape["L"])]
    return keys, chunk_doc, np.arange(n_docs, dtype=np.int64)


def sync(devs) -> None:
    for d in {str(d) for d in devs}:
        if torch.device(d).type == "cuda":
            torch.cuda.synchronize(torch.device(d))


def time_layers(route, devs, n_layers: int, rounds: int) -> list[float]:
    """Median seconds of ``route(layer)`` per layer (2 warm-up calls a layer)."""
    out = []
    for layer in range(n_layers):
        for _ in range(2):
            route(layer)
        ts = []
        for _ in range(rounds):
            sync(devs)
            t0 = time.perf_counter()
            route(layer)
            ts.append(time.perf_counter() - t0)
        out.append(statistics.median(ts))
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_main(rank: int, world: int, port: int, tokens: int, shape_name: str, q_tokens: int, rounds: int,
              out: str) -> None:
    """One rank of ``--procs``: its shard of the same synthetic keys, per-layer route medians to ``out``."""
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    dev = torch.device(f"cuda:{rank}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    shape = SHAPES[shape_name]
    keys, cmap, ids = synth(tokens, shape)
    idx = DistributedRouterIndex.build(keys, cmap, ids, RoutingConfig(score="dot", top_k=16), dev)
    del keys
    q = torch.randn(q_tokens, shape["Hq"], shape["D"], generator=torch.Generator().manual_seed(1)).to(dev)
    med = time_layers(lambda layer: idx.route(layer, q), [dev], shape["L"], rounds)
    res = [idx.route(layer, q) for layer in range(shape["L"])]
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"layer_s": med, "bytes": idx.nbytes(), "collectives": idx.collectives,
                   "routes": [r.doc_ids.tolist() for r in res], "scores": [r.scores.tolist() for r in res]}, f)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", default="1M", help="memory sizes, e.g. 10M,100M")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="msa4b")
    ap.add_argument("--devices", default=None, help="device sets, '|' between sets, e.g. 'cuda:0|cuda:0,cuda:1'")
    ap.add_argument("--procs", default="", help="process counts for the torch.distributed rows, e.g. 2,4")
    ap.add_argument("--q-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=None, help="timed calls per layer (default 25 GPU, 5 CPU)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    cuda = torch.cuda.is_available()
    if a.devices is None:
        n = torch.cuda.device_count() if cuda else 0
        sets = ([[f"cuda:{i}" for i in range(w)] for w in (1, 2, 4) if w <= n] if n else [["cpu"], ["cpu", "cpu"]])
    else:
        sets = [[d.strip() for d in s.split(",") if d.strip()] for s in a.devices.split("|")]
    rounds = a.rounds or (25 if cuda else 5)
    shape = SHAPES[a.shape]
    cfg = RoutingConfig(score="dot", top_k=16)
    bw = {d: copy_bandwidth(torch.device(d), 1 << 30 if torch.device(d).type == "cuda" else 1 << 28)
          for d in {d for s in sets for d in s}}
    rows = []
    for tok_s in a.tokens.split(","):
        tokens = parse_tokens(tok_s)
        keys, cmap, ids = synth(tokens, shape)
        gen = torch.Generator().manual_seed(1)
        q = torch.randn(a.q_tokens, shape["Hq"], shape["D"], generator=gen)
        single = None
        for devs in sets:
            row = {"tokens": tokens, "chunks": int(cmap.shape[0]), "docs": int(ids.shape[0]), "devices": devs,
                   "form": "single" if len(devs) == 1 else "sharded"}
            try:
                idx = (RouterIndex(keys, cmap, ids, cfg, device=devs[0]) if len(devs) == 1
                       else ShardedRouterIndex(keys, cmap, ids, cfg, devs))
            except (RuntimeError, torch.OutOfMemoryError) as e:           # the keys do not fit this set
                row["error"] = f"{type(e).__name__}: {str(e)[:120]}"
                rows.append(row)
                continue
            qd = q.to(devs[0])
            med = time_layers(lambda layer: idx.route(layer, qd), devs, shape["L"], rounds)
            routes = [idx.route(layer, qd) for layer in range(shape["L"])]
            shard_bytes = idx.shard_nbytes() if isinstance(idx, ShardedRouterIndex) else [idx.nbytes()]
            floor = max(b / bw[d] for b, d in zip(shard_bytes, devs))
            row.update(key_GB=sum(shard_bytes) / 1e9, layer_ms=statistics.median(med) * 1e3,
                       floor_ms=floor / shape["L"] * 1e3, routing_per_prefill_ms=sum(med) * 1e3,
                       syncs_per_prefill=shape["L"], syncs_per_search=1)
            if len(devs) == 1 and single is None:
                single = (row, routes)
            elif single is not None:
                row["speedup_vs_single"] = single[0]["layer_ms"] / row["layer_ms"]
                row["same_routes"] = all(a_.doc_ids.tolist() == b_.doc_ids.tolist() and
                                         np.array_equal(a_.scores, b_.scores) for a_, b_ in zip(single[1], routes))
            rows.append(row)
            del idx
            if cuda:
                torch.cuda.empty_cache()
        for w in [int(x) for x in a.procs.split(",") if x.strip()]:
            if cuda and w > torch.cuda.device_count():
                rows.append({"tokens": tokens, "form": f"procs={w}", "error": "fewer GPUs than ranks"})
                continue
            import torch.multiprocessing as mp

            with tempfile.TemporaryDirectory() as tmp:
                mp.start_processes(rank_main, args=(w, _free_port(), tokens, a.shape, a.q_tokens, rounds, tmp),
                                   nprocs=w, join=True, start_method="spawn")
                got = [json.load(open(os.path.join(tmp, f"rank{r}.json"))) for r in range(w)]
            per_layer = [max(g["layer_s"][layer] for g in got) for layer in range(shape["L"])]
            row = {"tokens": tokens, "form": f"procs={w}", "devices": [f"rank{r}" for r in range(w)],
                   "key_GB": sum(g["bytes"] for g in got) / 1e9, "layer_ms": statistics.median(per_layer) * 1e3,
                   "routing_per_prefill_ms": sum(per_layer) * 1e3, "syncs_per_prefill": shape["L"],
                   "collectives_per_layer": got[0]["collectives"] / (shape["L"] * (rounds + 3))}
            if single is not None:
                row["speedup_vs_single"] = single[0]["layer_ms"] / row["layer_ms"]
                row["same_routes"] = all(g["routes"][layer] == single[1][layer].doc_ids.tolist() and
                                         np.array_equal(np.float32(g["scores"][layer]), single[1][layer].scores)
                                         for g in got for layer in range(shape["L"]))
            rows.append(row)
        del keys
    device = torch.cuda.get_device_name(0) if cuda else platform.processor() or platform.machine()
    commit = git_commit()
    hdr = f"{'tokens':>11} {'form':>9} {'devices':>28} {'key GB':>7} {'layer ms':>9} {'floor ms':>9} {'prefill ms':>10} {'× single':>8} same"
    print(hdr)
    for r in rows:
        if "error" in r:
            print(f"{r['tokens']:>11,} {r['form']:>9} {','.join(r.get('devices', [])):>28}  {r['error']}")
            continue
        print(f"{r['tokens']:>11,} {r['form']:>9} {','.join(r['devices'])[:28]:>28} {r['key_GB']:>7.2f} "
              f"{r['layer_ms']:>9.3f} {r.get('floor_ms', float('nan')):>9.3f} {r['routing_per_prefill_ms']:>10.2f} "
              f"{r.get('speedup_vs_single', float('nan')):>8.2f} {r.get('same_routes', '')}")
    res = {"bench": "parallel", "device": device, "gpus": torch.cuda.device_count() if cuda else 0,
           "commit": commit, "shape": a.shape, "q_tokens": a.q_tokens, "rounds": rounds,
           "copy_GBps": {d: v / 1e9 for d, v in bw.items()}, "rows": rows}
    line = json.dumps(res)
    print(line)
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / f"bench_parallel_{'gpu' if cuda else 'cpu'}.json").write_text(line + "\n")


if __name__ == "__main__":
    main()
