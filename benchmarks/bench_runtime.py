"""Benchmark of the MSA runtime: routing vs the memory-bandwidth floor, K̄V̄ fetch, time to first token.

Regimes and ceilings (every baseline is measured in the same run, on the same device):

1. routing — one router layer's scoring + chunk→doc reduce + top-16 over C chunks of Gemma-3-270M
   shaped router keys (H=1 kv-head × D=256, bf16; 512 B/chunk), for a T-token query. Routing must
   read every key once, so the floor is ``key bytes ÷ copy bandwidth`` where copy bandwidth is
   measured here with a large tensor copy and counts bytes read + written (the convention of the
   H100 figure 3.0 TB/s in targets.md): the fastest of 7 copies before the routes and 7 after, so
   the floor is the tightest the run saw. Target: within 2× of the floor. Beside it the compute
   floor ``2·T·C·H·D ÷ matmul FLOP/s`` (the fastest of a few large square matmuls in the keys'
   resident dtype, measured here): on a CPU without bf16 units the fp32 score GEMM is compute-bound from T ≈ 4 on, so
   ``× bound`` (route ÷ the larger floor) is what the code controls. On CUDA a third floor, the
   round trip (one CUDA-graph replay of a one-element kernel + its result copied to pinned host
   memory + a sync, measured here), is what any route pays however few keys it reads: below ~1M
   chunks it is larger than both others, and ``× rt`` divides by the largest of the three. On CUDA each row also times the
   eager path (op by op, all torch), the CUDA-graph path around the same torch ops, and the graph with
   the fused Triton score kernel but the torch document max + top-k; ``route`` is the default (what
   ``Memory`` uses: fused scores + the Triton document max / top-k, ``routing_triton.doc_max_topk``).
   On a CPU with bf16 units (keys resident in bf16) each row also times the same keys resident in
   fp32 (``fp32_resident``: ``RoutingConfig(compute_dtype="float32")``, what CPUs without them keep).
   On a CPU with AVX512-BF16 ``route`` is the default path there: blocked bf16 keys scored by the
   AVX512-BF16 kernel (``routing_cpu``; ``layout`` says which layout the row ran on), and ``torch`` times
   the previous path in the same run: the same bf16 keys chunk-minor, scored with torch GEMMs
   (``RoutingConfig(cpu_kernel=False)``, what runs where the kernel is off or cannot be built).
2. fetch — K̄V̄ of the top-16 documents (all router layers) from host memory to the device. Ours:
   one gather into a (pinned) staging buffer + ONE copy (``ContentMemory``). Baseline: the reference
   pattern, one small copy per document per layer per K/V tensor. Target on GPU: ≤ 2 ms.
3. ttft — time to first token in pooled mode (routing + fetch + prefill of the question against
   the pooled K̄V̄ of k documents) vs plain prefill of the same k documents' text + the question
   with the same model (what text-mode RAG pays). Random weights of the real Gemma-3-270M shape
   (the compute does not depend on the values), or ``--model default`` for the real GGUF model.
   Also the decoding cost after the pooled prefill (32 greedy tokens, ms per token; on CUDA the
   default path, a CUDA graph of the fixed-shape step captured per request, its capture included;
   ``marginal`` = tokens 33-64 of a 64-token decode), beside the engine's dynamic path and HF's own
   forward with its KV cache decoding the same count from the question alone (each token brought to
   the host before the next step in all). H200, 2026-12-02 (benchmarks/results/bench_runtime_h200.json):
   pooled TTFT 30.7 ms vs plain prefill of 8,225 tokens 57.5 ms; decoding 5.89 ms/token (marginal
   3.87) vs dynamic 21.2 and HF 17.7 ms/token. On a CPU where the engine runs one-row linears through
   the AVX512-BF16 kernel (``cpu_gemv``) it also times the same engine's decoding with torch's own
   (``dynamic_decode_no_gemv_ms_per_token``): 2-core AVX512-BF16 VM, 2026-12-02
   (benchmarks/results/bench_runtime_cpu.json), 34.5 vs 67.1 ms/token (HF 80.4); pooled TTFT 89.2 ms vs
   plain prefill 51.6 s.

``--gpu-check`` (CUDA only) also runs the GPU-vs-CPU equality check: a tiny random MSA checkpoint
in fp32, pooled prefill logits and chosen documents per layer and greedy tokens on CPU vs GPU, and
bf16 routing over 200k chunks on CPU vs GPU, and the routing paths (``routing_paths``): CUDA-graph
route == eager route, fused Triton chunk scores == eager, GPU == CPU, for six reducer combinations
× T in 1, 5, 16, 100, 256 over a plain layer (8 chunks a document), a layer with the shifted 64-token grid
(15 rows a document) and one with the default's 32-token windows (40 rows a document), ``Memory``'s check
that router keys fit the device's free memory (``router_room_*``), and the decoding step's CUDA graph against the dynamic path (greedy and
seeded sampled tokens, logits of a dynamic forward after the graph's steps). ``--triton-sweep`` times
fused-kernel tile configs at 1.56M chunks × T in 1, 16, 256 and prints torch.profiler tables of
graph routes at 10k and 1.56M chunks (the fixed cost and the kernels' shares).

Usage::

    python benchmarks/bench_runtime.py --quick             # CPU, small sizes (CI smoke)
    python benchmarks/bench_runtime.py                     # CPU: 10k / 100k / 1M chunks
    python benchmarks/bench_runtime.py --device cuda --chunks 10000,100000,1000000,1562500 --q-tokens 1,16,256 \
        --gpu-check --triton-sweep --skip ttft

Prints a table, then one JSON line (device, commit, config, results).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from msa_memory.runtime.engine import MsaEngine  # noqa: E402
from msa_memory.runtime.memory_tier import ContentMemory  # noqa: E402
from msa_memory.routing import RouterIndex, RoutingConfig  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
# copy_bandwidth and round_trip_floor are also read from this module by bench_msa4b
from _common import copy_bandwidth, gemm_flops, git_commit, round_trip_floor, timeit  # noqa: E402,F401

GEMMA = dict(L=9, H=1, D=256, Hq=4)
QWEN = dict(L=18, H=8, D=128, Hq=32)


# ----------------------------------------------------------------------------- 1. routing
def _variants(dev: torch.device, T: int) -> dict[str, dict]:
    """Routing paths timed per row: RoutingConfig overrides + route() path, default path first."""
    if dev.type != "cuda":
        return {"route": dict(cfg={}, path="auto")}
    return {"route": dict(cfg={}, path="auto"),                                   # what Memory uses
            "eager": dict(cfg=dict(cuda_graphs=False, fused_scores=False, fused_topk=False), path="eager"),
            "graph": dict(cfg=dict(fused_scores=False, fused_topk=False), path="graph"),
            "graph_triton": dict(cfg=dict(fused_scores=True, fused_min_rows=1, fused_topk=False), path="graph")}


def bench_routing(dev: torch.device, chunks: list[int], q_tokens: list[int], tile: int) -> list[dict]:
    g = GEMMA
    bw_bytes = min(1 << 30, max(chunks) * g["H"] * g["D"] * 2)
    bw = copy_bandwidth(dev, bw_bytes)
    out = []
    gen = torch.Generator(device="cpu").manual_seed(0)
    lat = round_trip_floor(dev)
    flops = None
    for C in chunks:
        keys = torch.randn(C, g["H"], g["D"], generator=gen).to(dev, torch.bfloat16)
        n_docs = max(1, C // 8)                                         # ~8 chunks (512 tokens) per document
        chunk_doc = np.sort(np.random.default_rng(0).integers(0, n_docs, C))
        chunk_doc[:n_docs] = np.arange(n_docs)                          # every doc owns a chunk
        chunk_doc.sort()
        base = RoutingConfig(score="dot", top_k=16, tile_chunks=tile)
        index = RouterIndex([keys], chunk_doc, np.arange(n_docs), base, device=dev)
        del keys
        if flops is None:
            flops = gemm_flops(dev, index.key_dtype)
        key_bytes = index.nbytes()
        floor = key_bytes / bw
        queries = []
        # medians of many calls where one is short (a CPU route at 10k chunks is ~0.1-0.5 ms: 5 calls gave
        # medians up to 2x apart between runs); every path of a row is timed with the same counts
        rounds, warmup = (25, 5) if dev.type == "cuda" else ((50, 5) if C <= 10**4 else (20, 3) if C <= 10**5 else (3, 2))
        for T in q_tokens:
            q = torch.randn(T, g["Hq"], g["D"], generator=gen).to(dev)
            cfloor = 2 * T * C * g["H"] * g["D"] / flops               # head-mean folds Hq into H: T rows × H·D
            row = {"chunks": C, "q_tokens": T, "floor_ms": floor * 1e3, "compute_floor_ms": cfloor * 1e3,
                   "latency_floor_ms": lat * 1e3,
                   "key_MB": key_bytes / 1e6, "gemm_GFLOPs": flops / 1e9,
                   "resident_dtype": str(index.key_dtype), "layout": index.layout}
            for name, v in _variants(dev, T).items():
                index.config = dataclasses.replace(base, **v["cfg"])
                t = timeit(lambda v=v, ix=index, q=q: ix.route(0, q, path=v["path"]), dev, rounds=rounds, warmup=warmup)
                row[f"{name}_ms"] = t * 1e3
            index.config = base
            out.append(row)
            queries.append(q)
        if dev.type == "cpu" and index.layout == "blocked":
            # baseline: the previous torch path on the same bf16 keys (chunk-minor, torch GEMMs), timed after the
            # blocked index is freed (two resident copies slowed both by up to 1.5x on this VM)
            kb = index.keys[0]
            del index
            index = RouterIndex([kb], chunk_doc, np.arange(n_docs), dataclasses.replace(base, cpu_kernel=False),
                                device=dev)
            del kb
            for row, q in zip(out[-len(queries):], queries):
                t = timeit(lambda ix=index, q=q: ix.route(0, q), dev, rounds=rounds, warmup=warmup)
                row.update(torch_ms=t * 1e3, torch_x_bound=t * 1e3 / max(row["floor_ms"], row["compute_floor_ms"]))
        if dev.type == "cpu" and index.key_dtype != torch.float32:
            # baseline: the same keys resident in fp32 (what a CPU without bf16 units keeps), timed after
            # the bf16 index is freed (two resident copies slowed both by up to 1.5x on this VM)
            k32 = index.keys[0].float()
            del index
            index = RouterIndex([k32], chunk_doc, np.arange(n_docs), dataclasses.replace(base, compute_dtype="float32"),
                                device=dev)
            del k32
            for row, q in zip(out[-len(queries):], queries):
                row["fp32_resident_ms"] = timeit(lambda ix=index, q=q: ix.route(0, q), dev,
                                                 rounds=rounds, warmup=warmup) * 1e3
        del index
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    # the bandwidth floor: the faster of the copies measured before and after the routes
    bw = max(bw, copy_bandwidth(dev, bw_bytes))
    for row in out:
        t, floor, cfloor = row["route_ms"] / 1e3, row["key_MB"] * 1e6 / bw, row["compute_floor_ms"] / 1e3
        row.update(copy_GBps=bw / 1e9, floor_ms=floor * 1e3, x_floor=t / floor, x_compute_floor=t / cfloor,
                   x_bound=t / max(floor, cfloor), x_bound_latency=t / max(floor, cfloor, lat),
                   achieved_GBps=row["key_MB"] * 1e6 / t / 1e9)
        if "torch_ms" in row:
            row["torch_x_bound"] = row["torch_ms"] / max(row["floor_ms"], row["compute_floor_ms"])
    return out


_SWEEP = {16: [(128, 16, 64, 4, 3), (256, 16, 64, 4, 4), (256, 16, 64, 8, 3), (512, 16, 64, 8, 3), (128, 16, 128, 4, 3),
               (256, 16, 128, 8, 2), (64, 16, 256, 4, 2)],
          256: [(128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (128, 256, 32, 8, 4), (128, 128, 64, 8, 4), (256, 128, 64, 8, 4),
                (64, 128, 64, 4, 3), (256, 256, 64, 8, 2), (256, 128, 64, 8, 3), (128, 128, 128, 8, 2), (64, 256, 64, 4, 3),
                (128, 64, 64, 4, 4), (256, 64, 64, 8, 3), (128, 128, 64, 4, 3), (128, 128, 32, 8, 5), (128, 128, 64, 8, 3, 0),
                (64, 256, 64, 8, 3)]}
"""(BLOCK_C, BLOCK_R, BLOCK_D, num_warps, num_stages[, CHUNKS_M]) tried by --triton-sweep; CHUNKS_M defaults to the
row count's CONFIGS entry."""


def triton_sweep(dev: torch.device, C: int = 1_562_500) -> list[dict]:
    """Fused-kernel tile configs vs torch (mv / mm + amax) at C chunks, T = 1, 16, 256 rows, Gemma shape, bf16."""
    from msa_memory.routing.kernels import fused_triton as routing_triton

    if dev.type != "cuda" or not routing_triton.available():
        return []
    gen = torch.Generator().manual_seed(2)
    keys = torch.randn(C, 1, 256, generator=gen).to(dev, torch.bfloat16)
    k2 = keys.view(C, 256)
    out = torch.empty(C, device=dev)
    rows = []
    for T in (1, 16, 256):
        lhs = (torch.randn(1, T, 256, generator=gen) / 16).to(dev, torch.bfloat16)
        ref = (k2 @ lhs[0].T).float().amax(1)
        base = (lambda: torch.mv(k2, lhs[0, 0])) if T == 1 else (lambda: (k2 @ lhs[0].T).amax(1))
        rows.append({"T": T, "config": "torch mv" if T == 1 else "torch mm + amax", "ms": timeit(base, dev) * 1e3})
        rows.append({"T": T, "config": "default " + str(routing_triton.config_for(T)),
                     "ms": timeit(lambda: routing_triton.fused_max_scores(lhs, keys, out), dev) * 1e3})
        for bc, br, bd, w, s, *cm in _SWEEP[16 if T <= 16 else 256]:
            cfg = dict(BLOCK_C=bc, BLOCK_R=br, BLOCK_D=bd, num_warps=w, num_stages=s, **({"CHUNKS_M": cm[0]} if cm else {}))
            try:
                t = timeit(lambda cfg=cfg: routing_triton.fused_max_scores(lhs, keys, out, **cfg), dev)
                rows.append({"T": T, "config": str(cfg), "ms": t * 1e3, "max_abs_diff": float((out - ref).abs().max()),
                             "TFLOPs": 2 * T * C * 256 / t / 1e12, "GBps": C * 512 / t / 1e9})
            except Exception as e:  # noqa: BLE001  (a config that does not fit shared memory)
                rows.append({"T": T, "config": str(cfg), "error": f"{type(e).__name__}: {str(e)[:160]}"})
    return rows


def profile_route(dev: torch.device, C: int = 10_000, T: int = 16) -> str:
    """torch.profiler table of 20 graph routes at C chunks, T query rows (10k: where the fixed cost shows)."""
    if dev.type != "cuda":
        return ""
    from torch.profiler import ProfilerActivity, profile

    index = RouterIndex([torch.randn(C, 1, 256).to(dev, torch.bfloat16)], np.arange(C) // 8,
                        np.arange(-(-C // 8)), RoutingConfig(score="dot", top_k=16), device=dev)
    q = torch.randn(T, 4, 256, device=dev)
    for _ in range(3):
        index.route(0, q)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            index.route(0, q)
    entry = next(iter(index._graphs._graphs.values()))

    def replay_only():
        entry.graph.replay()
        torch.cuda.current_stream().synchronize()

    def replay_copy():
        entry.q_in.copy_(q, non_blocking=True)
        entry.graph.replay()
        entry.host.copy_(entry.out, non_blocking=True)
        torch.cuda.current_stream().synchronize()

    parts = {name: timeit(fn, dev, rounds=50) * 1e6 for name, fn in
             (("replay+sync", replay_only), ("q copy+replay+D2H+sync", replay_copy),
              ("route()", lambda: index.route(0, q)), ("sync alone", torch.cuda.current_stream().synchronize))}
    return (" ".join(f"{k}: {v:.1f} us;" for k, v in parts.items()) + "\n"
            + prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=14, max_name_column_width=50))


# ----------------------------------------------------------------------------- 2. fetch
def bench_fetch(dev: torch.device, shape: dict, docs: int = 4096, chunks_per_doc: int = 8, k: int = 16) -> dict:
    L, H, D = shape["L"], shape["H"], shape["D"]
    counts = np.full(docs, chunks_per_doc)
    host = torch.randn(int(counts.sum()), L, 2, H, D).to(torch.bfloat16)
    cm = ContentMemory(counts, (L, H, D), torch.bfloat16, dev, host_kv=host, cache_bytes=0)
    rng = np.random.default_rng(0)
    picks = [rng.choice(docs, k, replace=False) for _ in range(16)]
    it = iter(range(10**9))

    def ours():
        return cm.fetch(picks[next(it) % len(picks)])

    t_ours = timeit(ours, dev, rounds=9)
    # baseline: the reference pattern — per document, per layer, K and V copied separately
    offs = np.concatenate([[0], np.cumsum(counts)])
    src = cm.host_kv
    it2 = iter(range(10**9))

    def per_doc():
        out = []
        for d in picks[next(it2) % len(picks)]:
            for layer in range(L):
                for kv in range(2):
                    piece = src[offs[d]:offs[d + 1], layer, kv]
                    out.append(piece.to(dev, non_blocking=True) if dev.type == "cuda" else piece.clone())
        return out

    t_base = timeit(per_doc, dev, rounds=9)
    nbytes = k * chunks_per_doc * L * 2 * H * D * 2
    return {"shape": "gemma" if shape is GEMMA else "qwen", "docs": k, "chunks_per_doc": chunks_per_doc,
            "MiB": nbytes / 2**20, "ours_ms": t_ours * 1e3, "per_doc_copies_ms": t_base * 1e3,
            "n_small_copies": k * L * 2, "speedup": t_base / t_ours}


# ----------------------------------------------------------------------------- 3. ttft
def _gemma_model(dev: torch.device, which: str):
    if which == "default":
        from msa_memory.encode import load_model

        m = load_model("default", device=str(dev))
        return m.hf_model, lambda p, x, r=m.router, ls=m.router_layers: r.router_q(ls[p], x).flatten(-2), list(m.router_layers)
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from msa_memory.routing import cpu_has_native_bf16

    # bf16 on GPUs / CPUs with native bf16, fp32 where bf16 is emulated (as encode.default_dtype)
    dt = torch.bfloat16 if dev.type == "cuda" or cpu_has_native_bf16() else torch.float32

    cfg = Gemma3TextConfig(vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=512,
                           query_pre_attn_scalar=256, max_position_embeddings=32768)
    torch.manual_seed(0)
    with torch.device(dev):
        hf = Gemma3ForCausalLM(cfg).to(dt).eval()
    hf.config._attn_implementation = "sdpa"
    layers = list(range(9, 18))
    wq = [torch.randn(4 * 256, 640, device=dev, dtype=dt) * 0.05 for _ in layers]
    return hf, lambda p, x: (x.to(dt) @ wq[p].T), layers


def bench_ttft(dev: torch.device, which: str, k: int, doc_tokens: int, n_docs: int, q_len: int) -> dict:
    hf, router_q, layers = _gemma_model(dev, which)
    g = GEMMA
    cpd = -(-doc_tokens // 64)
    C = n_docs * cpd
    keys = [torch.randn(C, g["H"], g["D"]).to(dev, torch.bfloat16) for _ in layers]
    chunk_doc = np.repeat(np.arange(n_docs), cpd)
    index = RouterIndex(keys, chunk_doc, np.arange(n_docs), RoutingConfig(score="dot", top_k=k), device=dev)
    kv = torch.randn(C, len(layers), 2, g["H"], g["D"]).to(torch.bfloat16)
    content = ContentMemory(np.full(n_docs, cpd), (len(layers), g["H"], g["D"]), torch.bfloat16, dev, host_kv=kv,
                            cache_bytes=0)
    eng = MsaEngine(hf, layers, router_q, index, content)
    prefix = eng.compute_prefix([2])
    rng = np.random.default_rng(0)
    q = rng.integers(1000, 200000, q_len).tolist()
    docs_text = rng.integers(1000, 200000, k * doc_tokens).tolist()

    def pooled():
        st = eng.new_state(q_len + 2, prefix, top_k=k)
        return eng.forward(st, q, list(range(1 + k, 1 + k + q_len)), route_rows=[True] * q_len)

    def plain():
        ids = [2] + docs_text + q
        st = eng.new_state(len(ids) + 1)
        return eng.forward(st, ids, list(range(len(ids))))

    n_new = 32

    def decode(n=n_new, path="auto"):  # greedy, after a pooled prefill; "auto" = a CUDA graph per request on CUDA
        st = eng.new_state(q_len + 2 * n_new + 2, prefix, top_k=k)
        lg = eng.forward(st, q, list(range(1 + k, 1 + k + q_len)), route_rows=[True] * q_len)
        for _ in eng.decode(st, lg, 1 + k + q_len, max_new_tokens=n, path=path):
            pass

    def hf_decode():  # baseline: HF's own forward with its KV cache, same question, same count (no memory);
        # each token comes back to the host before the next step, as in the engine (streaming, stop checks)
        out = hf(input_ids=torch.tensor([q], device=dev), use_cache=True)
        for _ in range(n_new - 1):
            tok = int(out.logits[0, -1].argmax())
            out = hf(input_ids=torch.tensor([[tok]], device=dev), past_key_values=out.past_key_values, use_cache=True)
        int(out.logits[0, -1].argmax())

    def hf_prefill_only():
        hf(input_ids=torch.tensor([q], device=dev), use_cache=True)

    t_pooled = timeit(pooled, dev, rounds=3, warmup=1)
    t_plain = timeit(plain, dev, rounds=3, warmup=1)
    t_dec = timeit(decode, dev, rounds=3, warmup=1)
    t_decode = (t_dec - t_pooled) / (n_new - 1)                 # per token, the graph's capture included
    t_marginal = (timeit(lambda: decode(2 * n_new), dev, rounds=3, warmup=1) - t_dec) / n_new
    t_dynamic = (timeit(lambda: decode(path="dynamic"), dev, rounds=3, warmup=1) - t_pooled) / (n_new - 1)
    gemv = {}
    if eng.gemv is not None:   # baseline: the same engine's decoding with torch's own one-row linears
        fast = eng.gemv
        eng.gemv = None
        t_no = (timeit(lambda: decode(path="dynamic"), dev, rounds=3, warmup=1) - timeit(pooled, dev, rounds=3, warmup=1))
        eng.gemv = fast
        gemv = {"cpu_gemv": True, "dynamic_decode_no_gemv_ms_per_token": t_no / (n_new - 1) * 1e3}
    with torch.inference_mode():
        t_hf = (timeit(hf_decode, dev, rounds=3, warmup=1) - timeit(hf_prefill_only, dev, rounds=3, warmup=1)) / (n_new - 1)
    st = eng.new_state(q_len + 2, prefix, top_k=k)
    eng.forward(st, q, list(range(1 + k, 1 + k + q_len)), route_rows=[True] * q_len)
    return {"model": which, "k": k, "doc_tokens": doc_tokens, "store_docs": n_docs, "q_tokens": q_len,
            "pooled_ttft_ms": t_pooled * 1e3, "plain_prefill_ms": t_plain * 1e3, "speedup": t_plain / t_pooled,
            "pooled_routing_ms": st.timings["routing_s"] * 1e3, "pooled_fetch_ms": st.timings["fetch_s"] * 1e3,
            "plain_tokens": 1 + k * doc_tokens + q_len, "decode_ms_per_token": t_decode * 1e3,
            "decode_marginal_ms_per_token": t_marginal * 1e3, "decode_path": "graph" if dev.type == "cuda" else "dynamic",
            "dynamic_decode_ms_per_token": t_dynamic * 1e3, "hf_cache_decode_ms_per_token": t_hf * 1e3, **gemv}


def gpu_check(other: str = "cuda") -> dict:
    import tempfile

    sys.path.insert(0, str(ROOT / "tests" / "equivalence"))
    from msa_reference import ROUTER_LAYERS, TINY, build_tiny_msa_checkpoint, load_weights
    from transformers import Qwen3Config, Qwen3ForCausalLM

    path = build_tiny_msa_checkpoint(Path(tempfile.mkdtemp()) / "ckpt")
    sd, cfg = load_weights(path)
    rng = np.random.default_rng(0)
    counts = rng.integers(1, 4, 9)
    chunk_doc = np.repeat(np.arange(9), counts)
    C, H, D = int(counts.sum()), TINY["num_key_value_heads"], TINY["head_dim"]
    keys = [torch.from_numpy(rng.standard_normal((C, H, D)).astype(np.float32)) for _ in ROUTER_LAYERS]
    kv = torch.from_numpy(rng.standard_normal((C, len(ROUTER_LAYERS), 2, H, D)).astype(np.float32))
    res = {}
    for role, name in (("ref", "cpu"), ("dev", other)):
        dev = torch.device(name)
        model = Qwen3ForCausalLM(Qwen3Config(**TINY)).eval()
        model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
        model.tie_weights()
        model.to(dev)
        index = RouterIndex(keys, chunk_doc, np.arange(9), RoutingConfig(score="dot", top_k=2), device=dev)
        content = ContentMemory(counts, (len(ROUTER_LAYERS), H, D), torch.float32, dev, host_kv=kv)
        wq = [sd[f"model.layers.{li}.self_attn.router_q_proj.0.weight"].float().to(dev) for li in ROUTER_LAYERS]
        eng = MsaEngine(model, ROUTER_LAYERS, lambda p, x, wq=wq: x.float() @ wq[p].T, index, content)
        st = eng.new_state(24, eng.compute_prefix([1, 2, 3]), top_k=2)
        query = list(range(10, 19))
        lg = eng.forward(st, query, list(range(5, 14)), route_rows=[True] * 6 + [False] * 3)
        toks = list(eng.decode(st, lg, 14, max_new_tokens=6, path="dynamic"))
        res[role] = (lg.cpu(), {p: sorted(r.doc_index.tolist()) for p, r in st.routes.items()}, toks)
        if role == "dev":   # the same request decoded by the CUDA graph of the fixed-shape step
            res["graph"] = _graph_decode_check(eng, dev, query)
    dmax = float((res["ref"][0] - res["dev"][0]).abs().max())
    # bf16 routing at scale: same top-16 scores on CPU and GPU
    gen = torch.Generator().manual_seed(1)
    big = torch.randn(200_000, 1, 256, generator=gen).to(torch.bfloat16)
    cd = np.repeat(np.arange(25_000), 8)
    qq = torch.randn(8, 4, 256, generator=gen)
    r_cpu = RouterIndex([big], cd, np.arange(25_000), RoutingConfig(score="dot", top_k=16)).route(0, qq)
    r_gpu = RouterIndex([big], cd, np.arange(25_000), RoutingConfig(score="dot", top_k=16), device=other).route(0, qq)
    overlap = len(set(r_cpu.doc_ids.tolist()) & set(r_gpu.doc_ids.tolist()))
    return {**_router_room_check(other), "tiny_msa_logits_max_abs_diff": dmax, "tiny_msa_logits_ok": dmax < 1e-4,
            "chosen_docs_equal": res["ref"][1] == res["dev"][1], "greedy_tokens_equal": res["ref"][2] == res["dev"][2],
            "greedy_tokens": res["dev"][2], "check_device": other,
            "graph_decode_tokens_equal": res["graph"].pop("greedy") == res["ref"][2], **res["graph"],
            "bf16_route_top16_overlap": overlap,
            "bf16_route_max_score_diff": float(np.abs(np.sort(r_cpu.scores) - np.sort(r_gpu.scores)).max())}


def _router_room_check(other: str) -> dict:
    """``Memory``'s check that a store's router keys fit, on ``other``: ``free_bytes`` reads the device's free
    memory, and a store whose keys exceed it (the host given room) is refused naming the device, one that
    fits is not."""
    import types

    import msa_memory.routing.resident as mm
    from msa_memory.errors import RuntimeMemoryError

    free = mm.free_bytes(other)
    total = torch.cuda.get_device_properties(torch.device(other)).total_memory if other.startswith("cuda") else None
    ident = types.SimpleNamespace(n_layers=7, shifted_layers=(1, 5), shifted_window=32, chunk_tokens=64)

    def fake(need: int):
        return types.SimpleNamespace(identity=ident, root="fake.msa", router_key_bytes=lambda: need)

    orig = mm.free_bytes
    mm.free_bytes = lambda d: (1 << 50) if torch.device(d).type == "cpu" else orig(d)   # the host has room
    try:
        try:
            mm.check_router_key_room(fake(free + (1 << 30)), [other])
            refused = ""
        except RuntimeMemoryError as e:
            refused = str(e)
        fits = mm.check_router_key_room(fake(free // 2), [other]) == free // 2
    finally:
        mm.free_bytes = orig
    ok = bool(free and total and 0 < free <= total and other in refused and "--adapter aligned" in refused and fits)
    return {"router_room_free_bytes": free, "router_room_total_bytes": total, "router_room_refused": refused[:200],
            "router_room_ok": ok}


def _graph_decode_check(eng: MsaEngine, dev: torch.device, query: list[int]) -> dict:
    """The decoding step's CUDA graph ("static" off CUDA) against the dynamic path on ``dev``: greedy
    tokens, seeded sampled tokens, and the logits of one dynamic forward after 12 graph steps (the k/v
    the replays wrote)."""
    path = "graph" if dev.type == "cuda" else "static"

    def run(p, n, **kw):
        st = eng.new_state(32, eng.compute_prefix([1, 2, 3]), top_k=2)
        lg = eng.forward(st, query, list(range(5, 14)), route_rows=[True] * 6 + [False] * 3)
        return st, list(eng.decode(st, lg, 14, max_new_tokens=n, path=p, **kw))

    greedy = run(path, 6)[1]
    samp = {p: run(p, 12, temperature=1.0, generator=torch.Generator(device=dev).manual_seed(7))[1]
            for p in (path, "dynamic")}
    after = {}
    for p in (path, "dynamic"):
        st, toks = run(p, 12)
        after[p] = (toks, eng.forward(st, [toks[-1]], [14 + len(toks) - 1]).cpu())
    return {"greedy": greedy, "graph_decode_path": path, "graph_sampled_tokens_equal": samp[path] == samp["dynamic"],
            "graph_sampled_tokens": samp[path], "graph_then_dynamic_tokens_equal": after[path][0] == after["dynamic"][0],
            "graph_then_dynamic_logits_max_abs_diff": float((after[path][1] - after["dynamic"][1]).abs().max())}


def routing_paths_check(other: str = "cuda") -> list[dict]:
    """On the GPU: CUDA-graph route == eager route, fused Triton scores == eager scores, GPU == CPU.

    bf16 keys (200k chunks, Gemma shape), several reducer combinations and query lengths. "same"
    means the same top-16 documents up to ties (every chosen document scores, in the eager reference,
    at least the reference's 16th score - tol) and sorted top-16 scores within bf16 tolerance (the
    eager GEMM rounds its output to bf16, the fused kernel keeps fp32, the CPU widens keys to fp32).
    """
    gen = torch.Generator().manual_seed(3)
    C, N = 200_000, 25_000
    big = torch.randn(C, 1, 256, generator=gen).to(torch.bfloat16)
    cd = np.repeat(np.arange(N), 8)
    # layer 1: a layer with the shifted grid (each document's 8 aligned chunks, then its 7 shifted ones: 15 rows
    # per document, a chunk → document map of its own, as runtime.Memory builds it)
    big_s = torch.randn(N * 15, 1, 256, generator=gen).to(torch.bfloat16)
    cd_s = np.repeat(np.arange(N), 15)
    # layer 2: a layer of the default adapter's fine grid (each document's 8 aligned chunks, then its 32 windows
    # of 32 tokens at a stride of 16: 40 rows per document)
    big_f = torch.randn(N * 40, 1, 256, generator=gen).to(torch.bfloat16)
    cd_f = np.repeat(np.arange(N), 40)
    rows = []
    combos = [dict(), dict(score="cosine"), dict(head_reduce="max"), dict(query_reduce="mean"),
              dict(query_reduce="last"), dict(head_reduce="max", query_reduce="mean", chunk_reduce="mean")]
    for combo in combos:
        cfg = RoutingConfig(**{"score": "dot", "top_k": 16, **combo})
        gpu = RouterIndex([big, big_s, big_f], [cd, cd_s, cd_f], np.arange(N), cfg, device=other)
        cpu = RouterIndex([big, big_s, big_f], [cd, cd_s, cd_f], np.arange(N), cfg)
        for layer, T in ((0, 1), (0, 5), (0, 16), (0, 100), (0, 256), (1, 1), (1, 16), (1, 100), (2, 1), (2, 16),
                         (2, 100)):
            q = torch.randn(T, 4, 256, generator=gen)
            eager_cfg = dataclasses.replace(cfg, cuda_graphs=False, fused_scores=False, fused_topk=False)
            gpu.config = eager_cfg
            r_eager = gpu.route(layer, q, path="eager")
            r_graph_nofuse = gpu.route(layer, q, path="graph")                # graph around the same eager maths
            gpu.config = dataclasses.replace(cfg, fused_topk=False)
            r_torch_topk = gpu.route(layer, q)                                # default scores, torch doc max + top-k
            gpu.config = cfg
            r_auto = gpu.route(layer, q)                                      # default: graph (+ Triton where it applies)
            r_cpu = cpu.route(layer, q)
            ref = gpu.doc_scores(layer, q, kernel="torch").cpu().numpy()       # eager doc scores: the reference
            kth = np.sort(ref)[::-1][15]
            tol = 0.02 * (float(np.abs(r_eager.scores).max()) + 1.0)

            def cmp(a, b, ref=ref, kth=kth):
                # bf16 scores tie often: "same top-16" = every chosen doc scores ≥ the reference's 16th - tol
                return {"top16_overlap": len(set(a.doc_index.tolist()) & set(b.doc_index.tolist())),
                        "max_score_diff": float(np.abs(np.sort(a.scores) - np.sort(b.scores)).max()),
                        "worst_ref_margin": float((ref[a.doc_index] - kth).min())}

            row = {"combo": combo or "msa-default", "T": T, "tol": tol,
                   "layer": layer, "fused_used": gpu.kernel_for("scores", layer, q) == "triton",
                   "graph_vs_eager": cmp(r_graph_nofuse, r_eager), "auto_vs_eager": cmp(r_auto, r_eager),
                   "gpu_vs_cpu": cmp(r_auto, r_cpu),
                   "topk_kernel_used": gpu.kernel_for("doc_topk", layer, k=16) == "triton_doc_topk",
                   "topk_kernel_vs_torch": cmp(r_auto, r_torch_topk)}
            if row["fused_used"]:
                fs = gpu.chunk_scores(layer, q, kernel="triton")
                es = gpu.chunk_scores(layer, q, kernel="torch")
                row["triton_vs_eager_chunk_max_diff"] = float((fs - es).abs().max())
            # the graph runs the eager maths; only a padded row count (max reduce, T not a power of two) may let
            # the GEMM round differently, so exact equality is required elsewhere
            exact = T & (T - 1) == 0 or cfg.query_reduce != "max"
            ge = row["graph_vs_eager"]
            row["ok"] = ((ge["top16_overlap"] == 16 and ge["max_score_diff"] <= 1e-6) if exact else
                         (ge["worst_ref_margin"] >= -tol and ge["max_score_diff"] <= tol)) and all(
                row[n]["worst_ref_margin"] >= -tol and row[n]["max_score_diff"] <= tol
                for n in ("auto_vs_eager", "gpu_vs_cpu")) and row.get("triton_vs_eager_chunk_max_diff", 0.0) <= tol and (
                # same chunk scores: same top-k values; chunk-reduce mean sums a document's chunks with float atomics
                # (index_add_) on CUDA, in an order that differs between calls (H200, 15 chunks a document: 1-2e-7)
                row["topk_kernel_vs_torch"]["max_score_diff"] <= (0.0 if cfg.chunk_reduce == "max" else 1e-6))
            rows.append(row)
        del gpu
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--chunks", default="10000,100000,1000000")
    ap.add_argument("--q-tokens", default="1,16,256")
    ap.add_argument("--tile", type=int, default=262_144)
    ap.add_argument("--model", default="random", help="random (Gemma-3-270M shape, random weights) or default (GGUF)")
    ap.add_argument("--ttft-docs", type=int, default=16, help="k documents in the TTFT comparison")
    ap.add_argument("--doc-tokens", type=int, default=512)
    ap.add_argument("--quick", action="store_true", help="small sizes for a CI smoke run")
    ap.add_argument("--gpu-check", action="store_true")
    ap.add_argument("--triton-sweep", action="store_true",
                    help="CUDA: time fused-kernel tile configs at 1.56M chunks × T in 1, 16, 256; profile a small route")
    ap.add_argument("--check-device", default="cuda", help="device compared with the CPU by --gpu-check")
    ap.add_argument("--skip", default="", help="comma list of sections to skip: routing,fetch,ttft")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default); 1 is faster on a busy shared CPU")
    a = ap.parse_args()
    dev = torch.device(a.device)
    torch.set_grad_enabled(False)
    if a.threads:
        torch.set_num_threads(a.threads)
    chunks = [int(x) for x in a.chunks.split(",")]
    qt = [int(x) for x in a.q_tokens.split(",")]
    k, doc_tokens = a.ttft_docs, a.doc_tokens
    if a.quick:
        chunks, qt, k, doc_tokens = [10_000, 100_000], [16], 4, 128
    skip = set(filter(None, a.skip.split(",")))
    results: dict = {}
    sections = {"routing": lambda: bench_routing(dev, chunks, qt, a.tile),
                "fetch": lambda: [bench_fetch(dev, s) for s in ([GEMMA] if a.quick else [GEMMA, QWEN])],
                "ttft": lambda: bench_ttft(dev, a.model, k, doc_tokens, n_docs=max(64, 4 * k), q_len=32),
                "gpu_check": lambda: gpu_check(a.check_device),
                "routing_paths": lambda: routing_paths_check(a.check_device),
                "triton_sweep": lambda: triton_sweep(dev),
                "profile": lambda: "\n".join(f"## {c} chunks, T={t}\n" + profile_route(dev, c, t)
                                              for c, t in ((10_000, 16), (1_562_500, 16), (1_562_500, 256)))}
    for name, fn in sections.items():     # one failing section must not lose the others' figures
        if name in skip or (name in ("gpu_check", "routing_paths") and not a.gpu_check) or (
                name in ("triton_sweep", "profile") and not a.triton_sweep):
            continue
        try:
            results[name] = fn()
        except Exception as e:  # noqa: BLE001
            import traceback

            traceback.print_exc()
            results[name + "_error"] = f"{type(e).__name__}: {e}"
    if "routing" in results:
        rr = results["routing"]
        rd = rr[0]["resident_dtype"].removeprefix("torch.")
        print(f"\n# routing, one router layer, Gemma shape (1×256 keys, stored bf16, resident {rd}), top-16, device {dev}")
        print(f"# floors: bandwidth = key bytes ÷ copy {rr[0]['copy_GBps']:.1f} GB/s; compute = 2·T·C·H·D ÷ "
              f"{rr[0]['gemm_GFLOPs']:.0f} GFLOP/s ({rd} matmul); × bound = route ÷ the larger floor; "
              f"round trip = {rr[0]['latency_floor_ms'] * 1e3:.1f} µs (one graph replay + 128 B to pinned host + "
              "sync), × rt = route ÷ the largest of the three")
        extra = [n for n in ("eager", "graph", "graph_triton", "torch", "fp32_resident") if any(f"{n}_ms" in r for r in rr)]
        if any("torch_ms" in r for r in rr):
            print(f"# route = {rr[0]['layout']} bf16 keys, AVX512-BF16 kernel; torch = the previous path in this run "
                  "(chunk-minor bf16 keys, torch GEMMs: RoutingConfig(cpu_kernel=False)); torch × = torch ÷ the larger floor")
        print(f"{'chunks':>10} {'T':>4} {'route ms':>10} {'bw floor':>9} {'× bw':>7} {'cmp floor':>9} {'× cmp':>7} "
              f"{'× bound':>8} {'× rt':>6} {'GB/s':>8}" + "".join(f" {n + ' ms':>15}" for n in extra)
              + (f" {'torch ×':>8}" if "torch" in extra else ""))
        for r in rr:
            print(f"{r['chunks']:>10} {r['q_tokens']:>4} {r['route_ms']:>10.3f} {r['floor_ms']:>9.3f} {r['x_floor']:>7.2f} "
                  f"{r['compute_floor_ms']:>9.3f} {r['x_compute_floor']:>7.2f} {r['x_bound']:>8.2f} "
                  f"{r['x_bound_latency']:>6.2f} {r['achieved_GBps']:>8.1f}"
                  + "".join(f" {r[n + '_ms']:>15.3f}" if n + "_ms" in r else f" {'-':>15}" for n in extra)
                  + (f" {r['torch_x_bound']:>8.2f}" if "torch_x_bound" in r else ""))
    if results.get("triton_sweep"):
        print("\n# fused Triton kernel configs at 1.56M chunks × T rows (bf16) vs torch")
        for r in results["triton_sweep"]:
            print(f"  T={r['T']:<4} {r['config']:<92} {r.get('ms', float('nan')):8.3f} ms {r.get('TFLOPs', 0):6.1f} TFLOP/s "
                  f"{r.get('GBps', 0):7.0f} GB/s {r.get('max_abs_diff', '')} {r.get('error', '')}")
    if results.get("profile"):
        print("\n# profile: 20 graph routes\n" + results["profile"])
    if "routing_paths" in results:
        bad = [r for r in results["routing_paths"] if not r["ok"]]
        print(f"\n# routing paths on {a.check_device}: graph == eager, Triton == eager, GPU == CPU: "
              f"{len(results['routing_paths']) - len(bad)}/{len(results['routing_paths'])} ok")
        for r in bad:
            print("  NOT OK:", json.dumps(r))
    if "fetch" in results:
        print(f"\n# fetch of top-16 documents' K̄V̄ (all router layers) from host memory to {dev}")
        print(f"{'shape':>6} {'MiB':>7} {'ours ms':>9} {'per-doc copies ms':>18} {'copies':>7} {'speedup':>8}")
        for r in results["fetch"]:
            print(f"{r['shape']:>6} {r['MiB']:>7.2f} {r['ours_ms']:>9.3f} {r['per_doc_copies_ms']:>18.3f} "
                  f"{r['n_small_copies']:>7} {r['speedup']:>8.1f}")
    if "ttft" in results:
        r = results["ttft"]
        print(f"\n# time to first token, {a.model} Gemma-3-270M shape, k={k} docs × {doc_tokens} tokens, 32-token question")
        print(f"pooled (route+fetch+prefill vs pooled K̄V̄): {r['pooled_ttft_ms']:.1f} ms "
              f"(routing {r['pooled_routing_ms']:.1f}, fetch {r['pooled_fetch_ms']:.1f})")
        print(f"plain prefill of the same {r['plain_tokens']} tokens of text: {r['plain_prefill_ms']:.1f} ms "
              f"→ pooled is {r['speedup']:.1f}× faster")
        print(f"decoding after the pooled prefill ({r['decode_path']} path, 32 tokens): {r['decode_ms_per_token']:.2f} ms/token"
              f" (marginal, tokens 33-64: {r['decode_marginal_ms_per_token']:.2f}); dynamic path "
              f"{r['dynamic_decode_ms_per_token']:.2f}; HF's own forward with its KV cache, no memory: "
              f"{r['hf_cache_decode_ms_per_token']:.2f} ms/token")
        if "dynamic_decode_no_gemv_ms_per_token" in r:
            print(f"  CPU one-row linears through the AVX512-BF16 kernel (cpu_gemv): {r['dynamic_decode_ms_per_token']:.2f} "
                  f"ms/token vs {r['dynamic_decode_no_gemv_ms_per_token']:.2f} with torch's own")
    if "gpu_check" in results:
        print("\n# GPU vs CPU equality:", json.dumps(results["gpu_check"]))
    try:
        commit = git_commit()
    except OSError:
        commit = ""
    device = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"
    print(json.dumps({"bench": "runtime", "device": device, "torch": torch.__version__, "commit": commit,
                      "config": vars(a), "results": results}))


if __name__ == "__main__":
    main()
