"""Encoder throughput (tokens/s) against plain Hugging Face forwards, measured in the same run.

Regime: offline prefill of many independent passages -- compute-bound matmuls on a GPU, and on
a small CPU mostly the backbone's GEMMs. Our encoder runs decoder layers 0..last router layer
only, with all passages packed in one row (no padding, block-diagonal causal attention), pools
K/V/x inside the attention calls and never runs the LM head. Its ceiling is the backbone-only
forward of the same tokens; the LM head alone costs more than the rest of Gemma 3 270M (262k
vocabulary).

Two regimes, selected by ``--model``:

* ``default`` (CPU; the real Gemma 3 270M from its PyPI package) on real passages (stdlib
  module text split at 480 tokens), against (a) the naive baseline: ``AutoModelForCausalLM``
  forward per passage in fp32 (full logits), and (b) the best plain batched HF forward:
  ``model.model`` (backbone only) over right-padded batches, in bf16 and in fp32 (the better one is
  the baseline; on CPUs without AMX/AVX512-BF16 bf16 is the slower).
* ``random-gemma3-270m`` / ``random-qwen3-4b`` (GPU; random weights of the real shapes) on
  B x L random-token passages, against plain prefill with the LM head (``logits_to_keep=1`` as
  generate does, and full logits) and the backbone-only forward, with peak GPU memory.

Method: one warm-up, then ``--rounds`` timed rounds (median); methods interleaved per round so a
noisy shared machine hits all alike; ``torch.cuda.synchronize()`` around GPU timings. ``--fresh``
gives every call of every method passages of new random lengths (its own seed), so no kernel sees a
shape twice, as in a real encode job, and adds ``ours_cudnn_allowed``: the same encoder with
PyTorch's own SDPA kernel choice (cuDNN first on Hopper) instead of ``forward.CUDA_SDPA_BACKENDS``.
Without ``--fresh`` every round repeats one set of passages, which hides per-shape costs. Prints a
table, then one JSON line (device, commit, config, results, ratios).

Measured (2026-12-01, H200, torch 2.11 / transformers 5.17, bf16 random weights, ``--fresh``, 3
rounds; benchmarks/results/bench_encode_h200.json), tok/s of ours vs ours with cuDNN allowed / HF
backbone only (padded) / prefill with the last logit:

* Gemma 3 270M shape (all 18 blocks run, 9..17 pooled): mix260:40-320 423k vs 80k / 305k / 291k;
  128x512 (equal lengths: the same shape every call) 556k vs 566k / 527k / 503k; mix32:512-2048 315k
  vs 66k / 194k / 175k.
* Qwen3-4B shape (36 blocks, 18..35 pooled): mix64:64-512 42.9k vs 23.9k / 23.9k / 26.9k.
* With cuDNN allowed, a mixed-length batch paid ~40 ms per new attention shape (~0.45 s for its
  ~11 length buckets). The 100M-token quality haystack (``bench_quality_scale.py``) now encodes at
  626k tok/s through block 17 and 1.66M through block 5, against 110k / 132k with cuDNN's attention.

Earlier (2026-11-22, after commit 25bfd34, shapes repeated every round: pooling without index_add_,
GQA-native SDPA, storage cast on the device; results in benchmarks/results/bench_encode_{h100,cpu}.json):

* H100 80GB, bf16, random weights, torch 2.11 / transformers 5.17, tok/s (median), ours vs
  prefill(last logit) / backbone (ratios ours/prefill, ours/backbone); tree of 101e242, where the last
  router layer stops after its attention call (``kv_only_last``). Gemma-3-270M shape (layers 9..17
  pooled, 3 rounds): 64x512 464k vs 419k / 442k (1.11 / 1.05); 16x2048 399k vs 362k / 376k (1.10 /
  1.06); 4x8192 330k vs 222k / 229k (1.48 / 1.44). Qwen3-4B shape (layers 18..35 pooled, 5 rounds):
  32x512 49.2k vs 48.0k / 49.2k (1.03 / 1.00); 8x2048 46.7k vs 46.5k / 47.3k (1.005 / 0.99); 2x8192
  41.4k vs 40.7k / 41.0k (1.02 / 1.01). Peak GiB: Gemma 64x512 ours 1.13, prefill(last) 1.65,
  backbone 1.09; Qwen 32x512 ours 9.67, prefill(last) 11.91, backbone 9.66. Mixed lengths (an earlier
  run the same day, before kv_only_last): Gemma mix128:64-512 355k vs 240k (1.48), Qwen
  mix64:64-512 41.5k vs 26.0k (1.60).
  History on Qwen 32x512: 07e25c2 43.0k (0.88 / 0.86); index_add_ pooling -> reshape-sum 44.2k;
  + SDPA enable_gqa instead of repeated K/V 45.2k; + casting/transposing the result on the GPU before
  the host copy and no per-passage CPU work at batch start 48.1k (0.98 / 0.97); + ``kv_only_last``
  (no attention output, o_proj or MLP in layer 35) 49.2k (1.03 / 1.00).
* 2-core AMD EPYC (AVX2, no bf16 units), fp32, 2,270 tokens in 5 passages, idle machine, 3 rounds,
  tree of 101e242 (``kv_only_last``). Shipped router adapter (layers 1,3,4,5,7,8: layers 0..7 run
  whole, layer 8 up to its attention call): ours 732 tok/s, naive 112 (6.53x, target 5x), plain fp32
  batched backbone 329 (2.22x, target 0.9x). Upper half (9..17: 17 layers whole + layer 17's q/k/v):
  ours 317, naive 110 (2.89x), plain fp32 263 (1.20x). FLOPs per token (analytic,
  ``flops_per_token``): naive 553M (the 262k-vocab LM head alone is 336M), plain backbone 227M
  (padding included), ours 99M with the shipped layers / 207M with the upper half, so the arithmetic
  bound vs naive is 5.6x / 2.7x; ours beats it because the naive forward is less efficient per FLOP
  (it writes 262k-wide fp32 logits for every token). The 5x target cannot be met when all 18
  layers are run. (Earlier the same day, before ``kv_only_last``: 4.70x / 1.80x and 2.43x / 1.05x.)

Examples::

    python benchmarks/bench_encode.py --model default --tokens 4096
    python benchmarks/bench_encode.py --model random-gemma3-270m --device cuda --shapes 64x512,16x2048,4x8192
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from msa_memory.encode import Encoder, UntrainedRouterWarning, load_model, split_passages  # noqa: E402
from msa_memory.encode.encoder import _to_storage  # noqa: E402
from _common import git_commit, sync  # noqa: E402
from msa_memory.schemas.records import Passage  # noqa: E402

warnings.simplefilter("ignore", UntrainedRouterWarning)


def _time(fn, dev: torch.device) -> float:
    sync(dev)
    t0 = time.perf_counter()
    fn()
    sync(dev)
    return time.perf_counter() - t0


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    model = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "")
    return f"{model or platform.processor()} x{torch.get_num_threads()} threads"


def run_methods(methods: dict, rounds: int, dev: torch.device) -> dict:
    """Warm-up once, then ``rounds`` interleaved rounds; median seconds and peak memory per method."""
    secs: dict[str, list[float]] = {k: [] for k in methods}
    peak: dict[str, int] = {}
    for name, fn in methods.items():  # warm-up (and peak memory, measured alone)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
        _time(fn, dev)
        if dev.type == "cuda":
            peak[name] = int(torch.cuda.max_memory_allocated(dev))
        print(f"  warm-up {name}: done", file=sys.stderr, flush=True)
    for i in range(rounds):
        for name, fn in methods.items():
            secs[name].append(_time(fn, dev))
            print(f"  round {i + 1} {name}: {secs[name][-1]:.3f} s", file=sys.stderr, flush=True)
    return {k: {"seconds": statistics.median(v), "rounds": v, "peak_bytes": peak.get(k)} for k, v in secs.items()}


# ----------------------------------------------------------------------------- CPU, default model


def flops_per_token(hf, rows: list[tuple[int, int]], n_layers: int, lm_head: bool,
                    kv_only_last: bool = False) -> float:
    """Analytic forward FLOPs per real token. ``rows``: (computed length, real length) per passage
    (computed > real for a right-padded batch row). Counts 2 x the linear weights of the first
    ``n_layers`` decoder layers per computed token, causal attention (QK^T and PV: 4 * Hq * D per
    key seen, keys capped by a layer's sliding window), and the LM head at every computed position
    when ``lm_head`` (the naive baseline's full logits). ``kv_only_last``: the last layer counts only
    its q/k/v projections (ours: ``Backbone.run(kv_only_last=True)`` stops after its attention call)."""
    cfg = hf.model.config
    full = n_layers - 1 if kv_only_last else n_layers
    lin = sum(m.weight.numel() for layer in hf.model.layers[:full] for m in layer.modules()
              if isinstance(m, torch.nn.Linear))
    if kv_only_last:
        att_mod = hf.model.layers[n_layers - 1].self_attn
        lin += sum(getattr(att_mod, n).weight.numel() for n in ("q_proj", "k_proj", "v_proj"))
    hq = cfg.num_attention_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // hq
    types = list(getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers)[:full]
    win = getattr(cfg, "sliding_window", None)
    keys = lambda m, w: sum(min(i + 1, w) if w else i + 1 for i in range(m))  # keys seen, all queries
    computed = sum(m for m, _ in rows)
    att = sum(4 * hq * d * keys(m, win if (t == "sliding_attention" and win) else None) for t in types for m, _ in rows)
    per_tok = 2 * lin + (2 * hf.lm_head.weight.numel() if lm_head else 0)
    return (per_tok * computed + att) / sum(n for _, n in rows)


def cpu_default(args) -> dict:
    dev = torch.device("cpu")
    t0 = time.perf_counter()
    model = load_model("default", dtype=getattr(torch, args.dtype) if args.dtype else None,
                       router_layers=args.router_layers)
    load_s = time.perf_counter() - t0
    import difflib
    import argparse as ap_mod
    import textwrap

    passages: list[Passage] = []
    for mod in (ap_mod, difflib, textwrap, inspect):
        passages += split_passages(inspect.getsource(mod), mod.__name__, model.tokenizer, max_tokens=480)
    ids = np.arange(len(passages))
    seqs = Encoder(model).tokenize(ids, passages)
    keep, n = [], 0
    for i, s in enumerate(seqs):
        if n >= args.tokens:
            break
        keep.append(i)
        n += len(s)
    passages, ids, seqs = [passages[i] for i in keep], ids[keep], [seqs[i] for i in keep]
    n_tok = sum(len(s) for s in seqs)
    enc = Encoder(model, max_batch_tokens=args.max_batch_tokens)
    hf32 = model.hf_model if model.dtype == torch.float32 else copy.deepcopy(model.hf_model).float()
    hf16 = None
    if not args.skip_bf16:
        hf16 = model.hf_model if model.dtype == torch.bfloat16 else copy.deepcopy(model.hf_model).to(torch.bfloat16)

    def padded_batches():
        rows = max(1, args.max_batch_tokens // max(len(s) for s in seqs))
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        out = []
        for b in range(0, len(order), rows):
            grp = [seqs[i] for i in order[b:b + rows]]
            ln = max(len(s) for s in grp)
            x = torch.zeros(len(grp), ln, dtype=torch.long)
            mask = torch.zeros(len(grp), ln, dtype=torch.long)
            for r, s in enumerate(grp):
                x[r, :len(s)] = torch.tensor(s)
                mask[r, :len(s)] = 1
            out.append((x, mask))
        return out

    batches = padded_batches()
    tensors = [torch.tensor([s]) for s in seqs]

    @torch.inference_mode()
    def ours():
        enc.encode(ids, passages)

    @torch.inference_mode()
    def naive_fp32():
        for t in tensors:
            hf32(input_ids=t)

    def plain(hf):
        @torch.inference_mode()
        def f():
            for x, m in batches:
                hf.model(input_ids=x, attention_mask=m, use_cache=False)
        return f

    methods = {"ours": ours, "naive_causal_lm_fp32_per_passage": naive_fp32,
               "plain_backbone_fp32_batched": plain(hf32)}
    if not args.skip_bf16:
        methods["plain_backbone_bf16_batched"] = plain(hf16)
    res = run_methods(methods, args.rounds, dev)
    for r in res.values():
        r["tok_s"] = n_tok / r["seconds"]
    best_plain = max((k for k in res if k.startswith("plain_")), key=lambda k: res[k]["tok_s"])
    ratios = {"vs_naive": res["ours"]["tok_s"] / res["naive_causal_lm_fp32_per_passage"]["tok_s"],
              "vs_best_plain": res["ours"]["tok_s"] / res[best_plain]["tok_s"], "best_plain": best_plain,
              "targets": {"vs_naive": 5.0, "vs_best_plain": 0.9}}
    n_run = max(model.router_layers) + 1
    own = [(len(s), len(s)) for s in seqs]
    padded = [(int(x.shape[1]), int(r)) for x, m in batches for r in m.sum(1).tolist()]
    fl = {"ours": flops_per_token(hf32, own, n_run, lm_head=False, kv_only_last=True),
          "naive_causal_lm_fp32_per_passage": flops_per_token(hf32, own, hf32.config.num_hidden_layers, lm_head=True),
          "plain_backbone_batched": flops_per_token(hf32, padded, hf32.config.num_hidden_layers, lm_head=False)}
    ratios["flops_bound"] = {"vs_naive": fl["naive_causal_lm_fp32_per_passage"] / fl["ours"],
                             "vs_plain": fl["plain_backbone_batched"] / fl["ours"]}
    cfg = {"model": model.name, "compute_dtype": str(model.dtype), "n_passages": len(seqs), "n_tokens": n_tok,
           "layers_run": n_run, "flops_per_token": fl,
           "max_batch_tokens": args.max_batch_tokens, "router_layers": list(model.router_layers),
           "load_seconds": load_s, "rounds": args.rounds}
    return {"device": _device_name(dev), "config": cfg, "results": res, "ratios": ratios}


# ----------------------------------------------------------------------------- GPU, random shapes

SHAPES = {
    "random-gemma3-270m": dict(family="gemma3", cfg=dict(
        vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=512,
        max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True,
        layer_types=[("full_attention" if (i + 1) % 6 == 0 else "sliding_attention") for i in range(18)],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}})),
    "random-qwen3-4b": dict(family="qwen3", cfg=dict(
        vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=262144, rms_norm_eps=1e-6,
        rope_theta=5000000.0, tie_word_embeddings=True)),
}


@torch.inference_mode()
def _check_against_hf(model, enc, seqs) -> dict:
    """Relative max error of our pooled K̄ and V̄ (last router layer) vs the plain HF forward of the
    same passages batched (HF's own masks/attention; V recomputed from hidden states, K through the
    layer's own projections, k_norm and RoPE), as a correctness check on the device."""
    from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb

    pb = enc.encode_tokens(seqs)
    bb, layer = model.backbone, model.router_layers[-1]
    ids = torch.tensor(seqs, device=model.device)
    hs = model.hf_model(input_ids=ids, output_hidden_states=True).hidden_states[layer]  # (B, L, E)
    att = bb.layers[layer].self_attn
    x = bb.layers[layer].input_layernorm(hs)
    b, ln = ids.shape
    v = att.v_proj(x).view(b, ln, -1, bb.head_dim).transpose(1, 2)
    k = att.k_proj(x).view(b, ln, -1, bb.head_dim)
    k = (att.k_norm(k) if hasattr(att, "k_norm") else k).transpose(1, 2)
    pos = torch.arange(ln, device=ids.device)[None].expand(b, -1)
    cos, sin = bb.rope(x, pos, layer)
    _, k = apply_rotary_pos_emb(k, k, cos, sin)
    p = model.chunk_tokens
    pool = lambda t: t.float().transpose(1, 2).reshape(b * (ln // p), p, *t.shape[1:2], t.shape[-1]).mean(1)
    out = {}
    for name, ref, got in (("k", pool(k), pb.k[-1]), ("v", pool(v), pb.v[-1])):
        out[f"{name}_rel_max_err"] = float((got - ref).abs().max() / ref.abs().max())
    return out


def _shape_lens(shape: str, seed: int) -> list[int]:
    """Passage lengths of a shape: ``BxL`` (B of L tokens) or ``mixN:A-B`` (N of random length A..B)."""
    if shape.startswith("mix"):
        n, rng = shape[3:].split(":")
        lo, hi = (int(x) for x in rng.split("-"))
        return torch.randint(lo, hi + 1, (int(n),), generator=torch.Generator().manual_seed(seed)).tolist()
    b, ln = (int(x) for x in shape.lower().split("x"))
    return [ln] * b


def gpu_random(args) -> dict:
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, Qwen3Config

    from msa_memory.encode import forward
    from msa_memory.encode.tiny import tiny_tokenizer

    dev = torch.device(args.device)
    spec = SHAPES[args.model]
    cfg = (Gemma3TextConfig if spec["family"] == "gemma3" else Qwen3Config)(**spec["cfg"])
    cfg._attn_implementation = "sdpa"
    with torch.device(dev):
        hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    model = load_model(hf, tokenizer=tiny_tokenizer(), device=dev, dtype=torch.bfloat16, fingerprint="random",
                       name=args.model)
    rows = []
    for si, shape in enumerate(args.shapes.split(",")):
        def inputs(seed: int) -> dict:
            lens = _shape_lens(shape, seed)
            b, ln = len(lens), max(lens)
            ids = torch.randint(10, cfg.vocab_size, (b, ln), generator=torch.Generator().manual_seed(seed))
            mask = (torch.arange(ln)[None] < torch.tensor(lens)[:, None]).long()
            return {"lens": lens, "seqs": [row[:n] for row, n in zip(ids.tolist(), lens)], "ids": ids.to(dev),
                    "mask": mask.to(dev) if len(set(lens)) > 1 else None}

        base = inputs(0)
        n_real = sum(base["lens"])
        enc = Encoder(model, max_batch_tokens=10 * n_real, attention_strategy=args.attention)
        # --fresh: every call of every method gets passages of new random lengths (its own seed), so
        # no kernel sees a shape twice, as in a real encode job; otherwise one set is reused
        n_calls = args.rounds + 1
        feeds: dict[str, list[dict]] = {}

        def feed(name: str):
            if not args.fresh:
                return lambda: base
            k = len(feeds)
            feeds[name] = [inputs(1000 * (si + 1) + 100 * k + r) for r in range(n_calls)]
            it = iter(feeds[name])
            return lambda: next(it)

        def encoder(name: str, backends):
            get = feed(name)

            @torch.inference_mode()
            def run():
                x = get()
                old, forward.CUDA_SDPA_BACKENDS = forward.CUDA_SDPA_BACKENDS, backends
                try:
                    pb = enc.encode_tokens(x["seqs"])
                    _to_storage(torch.stack([pb.k, pb.v], dim=2).transpose(0, 1), "bfloat16")
                    _to_storage(pb.k_router, "bfloat16")
                finally:
                    forward.CUDA_SDPA_BACKENDS = old
            return run

        def hf_call(name: str, **kw):
            get = feed(name)

            @torch.inference_mode()
            def run():
                x = get()
                (hf.model if name == "backbone_only" else hf)(input_ids=x["ids"], attention_mask=x["mask"], **kw)
            return run

        check = _check_against_hf(model, enc, base["seqs"][:2]) if not rows and len(set(base["lens"])) == 1 else None
        methods = {"ours": encoder("ours", forward.CUDA_SDPA_BACKENDS)}
        if args.fresh:  # the encoder before CUDA_SDPA_BACKENDS: PyTorch's own kernel choice (cuDNN first)
            methods["ours_cudnn_allowed"] = encoder("ours_cudnn_allowed", None)
        methods["prefill_lm_head_last"] = hf_call("prefill_lm_head_last", logits_to_keep=1)
        methods["backbone_only"] = hf_call("backbone_only", use_cache=False)
        if not args.skip_full_logits:
            methods["prefill_lm_head_all"] = hf_call("prefill_lm_head_all")
        res = run_methods(methods, args.rounds, dev)
        for name, r in res.items():
            toks = [sum(f["lens"]) for f in feeds[name][1:]] if args.fresh else [n_real] * args.rounds
            r["tok_s"] = statistics.median(t / s for t, s in zip(toks, r["rounds"]))  # real (unpadded) tokens
        ratios = {"vs_prefill_last": res["ours"]["tok_s"] / res["prefill_lm_head_last"]["tok_s"],
                  "vs_backbone": res["ours"]["tok_s"] / res["backbone_only"]["tok_s"]}
        if "prefill_lm_head_all" in res:
            ratios["vs_prefill_all"] = res["ours"]["tok_s"] / res["prefill_lm_head_all"]["tok_s"]
        if "ours_cudnn_allowed" in res:
            ratios["vs_cudnn_allowed"] = res["ours"]["tok_s"] / res["ours_cudnn_allowed"]["tok_s"]
        rows.append({"shape": shape, "n_tokens": n_real, "padded_tokens": len(base["lens"]) * max(base["lens"]),
                     "fresh": bool(args.fresh), "results": res, "check": check,
                     "ratios": ratios | {"targets": {"vs_prefill": 1.0, "vs_backbone": 0.8}}})
        del enc, feeds
        torch.cuda.empty_cache()
    cfg_out = {"model": args.model, "dtype": "bfloat16", "router_layers": list(model.router_layers),
               "rounds": args.rounds, "attention": args.attention, "torch": torch.__version__,
               "sdpa_backends": [str(b) for b in (forward.CUDA_SDPA_BACKENDS or ())] or "pytorch default"}
    return {"device": _device_name(dev), "config": cfg_out, "shapes": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default", choices=["default", *SHAPES])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="compute dtype for --model default (default: auto)")
    ap.add_argument("--tokens", type=int, default=4096, help="CPU corpus size in tokens")
    ap.add_argument("--max-batch-tokens", type=int, default=8192)
    ap.add_argument("--shapes", default="64x512,16x2048,4x8192",
                    help="GPU passages: BxL (B of L tokens) or mixN:A-B (N of random length A..B), comma-separated")
    ap.add_argument("--attention", default="auto", choices=["auto", "loop", "bucket"])
    ap.add_argument("--fresh", action="store_true",
                    help="GPU: new passage lengths in every call (as a real job sees), and the encoder with "
                         "cuDNN attention allowed as a second baseline")
    ap.add_argument("--quick", action="store_true", help="CPU smoke run: 1,024 tokens, 1 round, no bf16 baseline")
    ap.add_argument("--skip-full-logits", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--router-layers", default=None,
                    help="CPU default model: e.g. 'upper-half' (9..17, all 18 layers run); default: the shipped adapter's")
    ap.add_argument("--skip-bf16", action="store_true", help="CPU: skip the bf16 plain baseline (slow without AMX)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.quick:
        args.tokens, args.rounds, args.skip_bf16 = 1024, 1, True
    if args.threads:
        torch.set_num_threads(args.threads)
    out = cpu_default(args) if args.model == "default" else gpu_random(args)
    out["commit"] = git_commit() or "unknown"
    if args.model == "default":
        print(f"{'method':40s} {'tok/s':>10s} {'median s':>10s}")
        for k, r in out["results"].items():
            print(f"{k:40s} {r['tok_s']:10.1f} {r['seconds']:10.2f}")
        print("ratios:", {k: (round(v, 2) if isinstance(v, float) else v) for k, v in out["ratios"].items()})
    else:
        print(f"{'shape':10s} {'method':24s} {'tok/s':>12s} {'peak GiB':>9s}")
        for row in out["shapes"]:
            for k, r in row["results"].items():
                pk = (r["peak_bytes"] or 0) / 2**30
                print(f"{row['shape']:10s} {k:24s} {r['tok_s']:12.0f} {pk:9.2f}")
            print(f"{'':10s} ratios {json.dumps({k: round(v, 3) for k, v in row['ratios'].items() if k != 'targets'})}")
    print(json.dumps(out, default=str))


if __name__ == "__main__":
    main()
