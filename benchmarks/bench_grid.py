"""What the shifted router-key grids cost: encode time, store bytes and routing time, against the same
weights over MSA's aligned grid alone, measured side by side in one run.

Three grids of the shipped weights (store-format.md section 11): ``aligned`` (MSA's aligned chunks alone,
the shipped ``aligned``), ``shifted`` (also the shifted 64-token grid at layers 1, 5, 8, 11, built here with
``with_shifted_layers``) and ``fine`` (every layer also over 32-token windows at a stride of 16,
``shifted_window`` 32: the default's grid; its suffix query, which reads the same keys, is left out). Three
measurements, each grid against ``aligned``:

1. encode (the default model, this CPU): ``Encoder.encode`` of the same passages (the bundled example
   corpus, split as ``msa-encode`` splits it) with each adapter, alternating, ``--rounds`` rounds, median
   wall time; the shifted grid adds one pooling of x at its layers to the same forward;
2. bytes: ``shards.tensor_bytes`` of those passages' token counts under each identity (live tensors; with
   ``--keep-router-inputs`` semantics too), per token;
3. routing (random bf16 keys of Gemma 3 270M's router shape, 1 × 256, seven router layers; ``RouterIndex``
   as ``runtime.Memory`` builds it): one question's document scores summed over the seven layers
   (``doc_scores`` per layer, what ``Memory.route`` does), aligned keys only vs four layers holding the
   aligned and shifted keys of each document (as many shifted chunks as aligned ones less one per document),
   and (``fine``) all seven layers holding each document's 8 aligned + 32 fine windows (a 512-token
   document: 16 windows from token 0, 16 from token 16), median of ``--route-calls`` calls after a warm-up,
   at ``--chunks`` aligned chunks (8 chunks a document); ``fine`` only up to ``--fine-max-chunks`` (its keys
   at 1M chunks need ~17 GiB).

Prints a table and one JSON line. Usage: ``python benchmarks/bench_grid.py [--rounds 3] [--chunks 100000,1000000]``;
``--device cuda`` measures the routing part alone on a GPU (the eager per-layer ``doc_scores`` that
``Memory.route`` runs, the top-16 copied to the host).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHIFTED = (1, 5, 8, 11)
LAYERS = 7
GRIDS = ("aligned", "shifted", "fine")


def bench_encode(rounds: int) -> dict:
    from msa_memory.encode import Encoder, RouterAdapter, load_model, split_passages
    from msa_memory.store.shards import tensor_bytes

    aligned = RouterAdapter.load("aligned")
    shifted = aligned.with_shifted_layers(list(SHIFTED))
    fine = RouterAdapter.load("default").without_suffix_queries()
    assert shifted.config.shifted_layers == SHIFTED and aligned.config.shifted_layers == ()
    assert fine.config.shifted_layers == aligned.config.router_layers and fine.config.shifted_window == 32
    loaded = load_model("default", adapter=aligned)
    passages = []
    for f in sorted((ROOT / "examples" / "corpus").rglob("*.txt")) + sorted((ROOT / "examples" / "corpus").rglob("*.md")):
        passages += split_passages(f.read_text(), str(f.relative_to(ROOT)), loaded.tokenizer)
    ids = np.arange(len(passages))
    encoders = {"aligned": Encoder(loaded), "shifted": Encoder(loaded.with_router(shifted)),
                "fine": Encoder(loaded.with_router(fine))}
    times: dict[str, list[float]] = {k: [] for k in encoders}
    out = {}
    for name, enc in encoders.items():                       # warm-up (and the outputs, for the bytes)
        out[name] = enc.encode(ids, passages)
    for _ in range(rounds):
        for name, enc in encoders.items():
            t0 = time.perf_counter()
            enc.encode(ids, passages)
            times[name].append(time.perf_counter() - t0)
    n_tok = out["aligned"].n_tokens
    res = {"passages": len(passages), "tokens": int(n_tok.sum()), "compute_dtype": str(loaded.dtype)}
    for name, enc in encoders.items():
        med = statistics.median(times[name])
        ident = enc.identity()
        ident_x = enc.model.identity(keep_router_inputs=True)
        res[name] = {"encode_s": round(med, 3), "tok_per_s": round(res["tokens"] / med, 1), "rounds_s": times[name],
                     "bytes_per_token": tensor_bytes(ident, n_tok) / res["tokens"],
                     "bytes_per_token_with_router_inputs": tensor_bytes(ident_x, n_tok) / res["tokens"],
                     "shifted_chunks": 0 if out[name].k_router_s is None else int(out[name].k_router_s.shape[1]),
                     "aligned_chunks": int(out[name].kv.shape[0])}
    res["encode_ratio"] = res["shifted"]["encode_s"] / res["aligned"]["encode_s"]
    res["bytes_ratio"] = res["shifted"]["bytes_per_token"] / res["aligned"]["bytes_per_token"]
    res["fine_encode_ratio"] = res["fine"]["encode_s"] / res["aligned"]["encode_s"]
    res["fine_bytes_ratio"] = res["fine"]["bytes_per_token"] / res["aligned"]["bytes_per_token"]
    return res


def bench_route(chunks: int, calls: int, q_tokens: int = 16, device: str = "cpu", fine: bool = True) -> dict:
    from msa_memory.routing import RouterIndex, RoutingConfig

    per_doc = 8
    n_docs = chunks // per_doc
    g = torch.Generator().manual_seed(0)
    cd = np.repeat(np.arange(n_docs), per_doc)
    both = np.repeat(np.arange(n_docs), 2 * per_doc - 1)     # each document's 8 aligned + 7 shifted chunks
    keys = [torch.randn(chunks, 1, 256, generator=g).to(torch.bfloat16) for _ in range(LAYERS)]
    extra = [torch.randn(n_docs * (per_doc - 1), 1, 256, generator=g).to(torch.bfloat16) for _ in SHIFTED]
    cfg = RoutingConfig(score="cosine")
    shifted_pos = range(len(SHIFTED))                        # layers 1, 5, 8, 11 are positions 0..3 of seven
    keys_s = [torch.cat([keys[p].view(n_docs, per_doc, 1, 256), extra[p].view(n_docs, per_doc - 1, 1, 256)], 1)
              .reshape(-1, 1, 256) if p in shifted_pos else keys[p] for p in range(LAYERS)]
    indexes = {"aligned": RouterIndex(keys, cd, np.arange(n_docs), cfg, device=device),
               "shifted": RouterIndex(keys_s, [both if p in shifted_pos else cd for p in range(LAYERS)],
                                      np.arange(n_docs), cfg, device=device)}
    if fine:                                                 # every layer: 8 aligned + 32 fine windows a document
        per_f = 32
        both_f = np.repeat(np.arange(n_docs), per_doc + per_f)
        keys_f = [torch.cat([keys[p].view(n_docs, per_doc, 1, 256),
                             torch.randn(n_docs, per_f, 1, 256, generator=g).to(torch.bfloat16)], 1).reshape(-1, 1, 256)
                  for p in range(LAYERS)]
        indexes["fine"] = RouterIndex(keys_f, [both_f] * LAYERS, np.arange(n_docs), cfg, device=device)
        del keys_f
    q = torch.randn(q_tokens, 4, 256, generator=g)
    res = {"chunks": chunks, "docs": n_docs, "q_tokens": q_tokens, "layout": indexes["aligned"].layout,
           "device": device}
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times: dict[str, list[float]] = {k: [] for k in indexes}
    for name, idx in indexes.items():                        # warm-up
        sum(idx.doc_scores(p, q) for p in range(LAYERS))
    for _ in range(calls):
        for name, idx in indexes.items():
            sync()
            t0 = time.perf_counter()
            total = sum(idx.doc_scores(p, q) for p in range(LAYERS))
            torch.topk(total, 16)[1].cpu()                   # the top-16 on the host, as Memory.route has it
            times[name].append(time.perf_counter() - t0)
    for name, idx in indexes.items():
        res[name] = {"route_ms": round(1e3 * statistics.median(times[name]), 3),
                     "resident_MiB": round(idx.nbytes() / 2**20, 1)}
    res["route_ratio"] = res["shifted"]["route_ms"] / res["aligned"]["route_ms"]
    if fine:
        res["fine_route_ratio"] = res["fine"]["route_ms"] / res["aligned"]["route_ms"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--chunks", default="100000,1000000")
    ap.add_argument("--route-calls", type=int, default=11)
    ap.add_argument("--skip-encode", action="store_true")
    ap.add_argument("--fine-max-chunks", type=int, default=300000, help="route the fine grid only up to this many chunks")
    ap.add_argument("--device", default="cpu", help="routing: where the keys live (cuda: routing only, no encode)")
    a = ap.parse_args()
    warnings.simplefilter("ignore")
    torch.set_grad_enabled(False)
    enc = None if a.skip_encode or a.device != "cpu" else bench_encode(a.rounds)
    routes = [bench_route(int(c), a.route_calls, device=a.device, fine=int(c) <= a.fine_max_chunks)
              for c in a.chunks.split(",")]
    if enc:
        print(f"\n# encode: {enc['passages']} passages, {enc['tokens']} tokens (examples/corpus), default model "
              f"({enc['compute_dtype']}), median of {a.rounds} rounds")
        print(f"{'grid':<10} {'encode s':>9} {'tok/s':>8} {'B/token':>8} {'B/token +x':>11} {'chunks':>7} {'shifted':>8}")
        for name in GRIDS:
            r = enc[name]
            print(f"{name:<10} {r['encode_s']:>9.2f} {r['tok_per_s']:>8.0f} {r['bytes_per_token']:>8.1f} "
                  f"{r['bytes_per_token_with_router_inputs']:>11.1f} {r['aligned_chunks']:>7} {r['shifted_chunks']:>8}")
        print(f"shifted / aligned: encode {enc['encode_ratio']:.3f}x, bytes {enc['bytes_ratio']:.3f}x; "
              f"fine / aligned: encode {enc['fine_encode_ratio']:.3f}x, bytes {enc['fine_bytes_ratio']:.3f}x")
    print(f"\n# routing one question ({routes[0]['q_tokens']} tokens), 7 router layers summed + top-16, "
          f"{routes[0]['layout']} bf16 keys on {a.device}, median of {a.route_calls}")
    print(f"{'chunks':>9} {'grid':>8} {'route ms':>9} {'x aligned':>10} {'MiB':>9}")
    for r in routes:
        for name in GRIDS:
            if name in r:
                ratio = 1.0 if name == "aligned" else r["route_ratio" if name == "shifted" else "fine_route_ratio"]
                print(f"{r['chunks']:>9} {name:>8} {r[name]['route_ms']:>9.2f} {ratio:>10.2f} {r[name]['resident_MiB']:>9.1f}")
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = ""
    where = (torch.cuda.get_device_name(0) if a.device.startswith("cuda") else
             f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)")
    print(json.dumps({"bench": "grid", "device": where, "commit": commit, "torch_threads": torch.get_num_threads(),
                      "encode": enc, "routing": routes}))


if __name__ == "__main__":
    main()
