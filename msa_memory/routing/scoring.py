"""The eager score path of one router layer, shared by :class:`~msa_memory.routing.index.RouterIndex`
and the kernels: the query's left operand (:func:`prepare_lhs`), one tile of chunk scores with the
head/query reduce fused (:func:`score_tile`, :func:`score_tile_cm`), and the helpers of the document
reduce and top-k. See the design note of :mod:`msa_memory.routing.index` for the folds and layouts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

    from msa_memory.routing.config import RoutingConfig

__all__ = ["ScorePlan", "cpu_has_native_bf16", "doc_gather_index", "pad_query_rows", "prepare_lhs", "resident_dtype",
           "score_tile", "score_tile_cm", "topk_blocked", "torch_dtype_of"]

_CM_TALL_MIN_ROWS = 16   # score_tile_cm: from this many query rows on, the GEMM writes (t, R)


def cpu_has_native_bf16() -> bool:
    """True when the CPU has AMX-BF16 or AVX512-BF16 (bf16 GEMMs run natively)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resident_dtype(stored: torch.dtype, device: Any, compute_dtype: str = "auto") -> torch.dtype:
    """The dtype router keys are kept in on ``device`` (see ``RoutingConfig.compute_dtype``)."""
    import torch

    if compute_dtype != "auto":
        return torch_dtype_of(compute_dtype)
    if torch.device(device).type == "cpu" and stored != torch.float32 and not cpu_has_native_bf16():
        return torch.float32
    return stored


def torch_dtype_of(logical: str) -> torch.dtype:
    """torch dtype of a store's logical dtype name."""
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[logical]


@dataclass(frozen=True)
class ScorePlan:
    """How the rows of a left operand reduce: T query tokens × ``rep`` heads of a group (head-max)."""

    T: int
    rep: int
    query_reduce: str


def prepare_lhs(q: torch.Tensor, cfg: RoutingConfig, H: int, dtype: torch.dtype) -> tuple[torch.Tensor, ScorePlan]:
    """Left operand (G, R, Dk) of the score GEMM for router queries ``q`` (T, Hq, D), and its plan.

    ``q`` must already be float32 on the keys' device. See the module note for the folds.
    """
    import torch

    T, Hq, D = q.shape
    rep = Hq // H
    if cfg.score == "cosine":
        q = torch.nn.functional.normalize(q, dim=-1)
        scale = 1.0
    else:
        scale = D ** -0.5
    if cfg.query_reduce == "last":  # only the last token matters; drop the others up front
        q = q[-1:]
        T = 1
    if cfg.head_reduce == "mean":
        lhs = q.view(T, H, rep, D).sum(2).reshape(T, H * D) * (scale / Hq)   # (T, H·D)
        if cfg.query_reduce == "mean" and T > 1:                               # linear: fold the T mean too
            lhs = lhs.mean(0, keepdim=True)
            T = 1
        return lhs.unsqueeze(0).to(dtype), ScorePlan(T, 1, "max" if T == 1 else cfg.query_reduce)
    lhs = (q * scale).view(T, H, rep, D).permute(1, 0, 2, 3).reshape(H, T * rep, D)         # (H, T·rep, D)
    return lhs.to(dtype), ScorePlan(T, rep, "max" if T == 1 else cfg.query_reduce)


def score_tile(lhs: torch.Tensor, kt: torch.Tensor, plan: ScorePlan, out: torch.Tensor,
               scratch: torch.Tensor | None = None) -> None:
    """Chunk scores of one tile of keys ``kt`` (t, G, Dk) into ``out`` (t,) float32.

    One GEMM (a GEMV when G = R = 1) into ``scratch`` (at least G·t·R elements of the keys' dtype;
    allocated when None), then the head and query reduces of the tile, written into ``out``.
    """
    import torch

    t, G, Dk = kt.shape
    R = lhs.shape[1]
    if G == 1 and R == 1:                                                   # GEMV: memory-bound
        if out.dtype == kt.dtype:
            torch.mv(kt.view(t, Dk), lhs[0, 0], out=out)
        else:
            out.copy_(torch.mv(kt.view(t, Dk), lhs[0, 0]))
        return
    n = G * t * R
    buf = scratch[:n] if scratch is not None and scratch.numel() >= n else torch.empty(n, dtype=kt.dtype,
                                                                                        device=kt.device)
    if G == 1:
        s = torch.mm(kt.view(t, Dk), lhs[0].T, out=buf.view(t, R)).T[None]    # (1, R, t) view of (t, R)
    else:
        s = torch.bmm(kt.transpose(0, 1), lhs.transpose(1, 2), out=buf.view(G, t, R)).transpose(1, 2)
    _reduce_rows(s, plan, out)


def _reduce_rows(s: torch.Tensor, plan: ScorePlan, out: torch.Tensor) -> None:
    """``out`` (t,) ← the head and query reduce of one tile's scores ``s`` (G, R, t) (any strides)."""
    import torch

    if plan.query_reduce == "max":                                            # max over all rows = head & query max
        if out.dtype == s.dtype:
            torch.amax(s, dim=(0, 1), out=out)
        else:
            out.copy_(s.amax(dim=(0, 1)))
        return
    m = s.unflatten(1, (plan.T, plan.rep)).amax(dim=(0, 2))                   # (T, t): max over groups and heads
    out.copy_(m.float().mean(0))


def score_tile_cm(lhs: torch.Tensor, kt: torch.Tensor, plan: ScorePlan, out: torch.Tensor,
                  scratch: torch.Tensor | None = None) -> None:
    """:func:`score_tile` for chunk-minor keys ``kt`` (G, Dk, t) (the CPU layout), into ``out`` (t,) float32.

    In this layout the fp32 GEMV reads the keys as a column-major (t, Dk) operand, which MKL streams
    with both cores (1M × 256 fp32 keys on the 2-core dev box: 44 ms vs 118 ms for the row-major GEMV,
    which runs on one core). A bf16 ``torch.mv`` of a strided tile falls off oneDNN's fast path (1M ×
    256 bf16 keys in 262k-chunk tiles on an AVX512-BF16 2-core box: 299 ms), so half-precision GEMVs
    run as a (1, Dk) × (Dk, t) GEMM into the scratch (37 ms; 53 ms with a fresh output per tile).
    Multi-row queries: below ``_CM_TALL_MIN_ROWS`` rows the GEMM writes (R, t) (the query max is then
    an elementwise max of rows), from it on (t, R) (measured at 1M chunks: R = 2 82 vs 328 ms, R = 16
    122 vs 174 ms, R = 256 1039 vs 1121 ms, the better one chosen).

    On CPUs with AVX512-BF16, bf16 keys do not come here: :class:`RouterIndex` stores them blocked and
    scores them with ``cpu_avx512.score_blocked``, since oneDNN's one-row bf16 GEMM reads only ~9–14 GB/s
    of 25–29 GB/s copy bandwidth and its skinny GEMMs reach ~85 of ~400 GFLOP/s (``bench_runtime.py``,
    1M × 256 keys, whole route on the 2-core AVX512-BF16 VM, three quiet runs: T = 1 / 16 / 256 in
    23.6–25.2 / 30.9–34.9 / 326–355 ms with the kernel against 39.6–59.1 / 77.2–103 / 450–507 ms with
    the GEMMs here). This remains the path of fp32 / fp16 keys, and of bf16 keys where the kernel is off
    (``RoutingConfig.cpu_kernel``, ``MSA_CPU_KERNEL=0``) or cannot be built.
    """
    import torch

    G, Dk, t = kt.shape
    R = lhs.shape[1]
    if G == 1 and R == 1 and kt.dtype == torch.float32:                     # GEMV: memory-bound
        torch.mv(kt[0].T, lhs[0, 0], out=out)
        return
    n = G * t * R
    buf = scratch[:n] if scratch is not None and scratch.numel() >= n else torch.empty(n, dtype=kt.dtype,
                                                                                        device=kt.device)
    if G == 1 and R == 1:   # bf16/fp16 GEMV as a one-row GEMM into the scratch (see the note above)
        torch.mm(lhs[0], kt[0], out=buf.view(1, t))
        out.copy_(buf[:t])
        return
    if G == 1:
        if R >= _CM_TALL_MIN_ROWS:   # (t, R) output, keys as the transposed A operand: MKL's faster kernel here
            s = torch.mm(kt[0].T, lhs[0].T, out=buf.view(t, R)).T            # (R, t) view
        else:
            s = torch.mm(lhs[0], kt[0], out=buf.view(R, t))                 # (R, t)
        s = s[None]
    else:
        s = torch.bmm(lhs, kt, out=buf.view(G, R, t))                       # (G, R, t)
    _reduce_rows(s, plan, out)


def doc_gather_index(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(N, max count) int64 chunk index of each document's chunks (contiguous runs from ``starts``),
    short documents repeating their last chunk: ``scores[idx].amax(1)`` is the per-document max."""
    j = np.minimum(np.arange(int(counts.max()))[None, :], np.asarray(counts)[:, None] - 1)
    return np.asarray(starts, dtype=np.int64)[:, None] + j


def topk_blocked(x: torch.Tensor, k: int, block: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk(x, k)`` of a 1-D tensor in two stages: top-k of each ``block``-sized slice
    (−inf padded), then top-k of those candidates. The same values (the global top-k lies among the
    per-block top-k's); among exact ties the indices may differ. Plain ``torch.topk`` for short inputs
    or k > block. Used on CUDA (at 125k documents on an H100: 55 µs vs 72 µs in a CUDA graph).
    """
    import torch

    n = x.shape[0]
    if k > block or n <= 4 * block:
        return torch.topk(x, k)
    xb = torch.nn.functional.pad(x, (0, (-n) % block), value=float("-inf")).view(-1, block)
    v, i = torch.topk(xb, k, dim=1)                                           # (n_blocks, k)
    i = i + torch.arange(0, xb.shape[0] * block, block, device=x.device)[:, None]
    vals, j = torch.topk(v.flatten(), k)
    return vals, i.flatten()[j]


def pad_query_rows(q: torch.Tensor, cfg: RoutingConfig) -> torch.Tensor:
    """``q`` (T, Hq, D) with rows repeated up to a power of two where that changes no score.

    Query-reduce max: repeating the last token leaves every max unchanged, so a graph captured for
    the padded length serves every T up to it. Query "last": only the last row. Mean: unchanged.
    """
    T = q.shape[0]
    if cfg.query_reduce == "last":
        return q[-1:]
    if cfg.query_reduce != "max" or T & (T - 1) == 0:
        return q
    import torch

    P = 1 << (T - 1).bit_length()
    return torch.cat([q, q[-1:].expand(P - T, *q.shape[1:])])
