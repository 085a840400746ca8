"""Fused Triton kernel: max-over-rows router scores without materialising the rows × chunks matrix.

Design note. For a long query (T ≥ 64 routing tokens) the eager path writes a T × C score matrix
(bf16) to memory and reads it back for the max over query tokens — at T = 256 that is as many bytes
as the keys themselves, twice. This kernel computes, for every chunk c,

    out[c] = max_{g, r} Σ_d lhs[g, r, d] · keys[c, g, d]          (fp32 accumulation)

with ``lhs`` (G, R, Dk) the left operand of ``routing.prepare_lhs`` (G = 1 for head-mean, G = H for
head-max; R rows = query tokens × heads) and ``keys`` (C, G, Dk) the resident router keys: each
program loads a BLOCK_C × BLOCK_D tile of keys, multiplies it with BLOCK_R × BLOCK_D tiles of the
query on the tensor cores (``tl.dot``), and keeps the running max of its BLOCK_C chunks in
registers; only the (C,) fp32 result is written. ``CHUNKS_M`` puts the chunks on the MMA's M side
(the max then runs along accumulator rows, inside a warp) instead of the query rows (a max down
columns, across warps): 26% faster at 256 rows, slower for a single row (:data:`CONFIGS`). This is exactly query-reduce ``max`` (head-max
included, as a max over all rows); the mean reducers stay on the eager path. fp32 keys use
``input_precision="ieee"`` (no TF32), so fp32 results match the eager GEMM to rounding.

What it does not do: chunk→doc reduce or top-k (cheap, done by torch after it, inside the same CUDA
graph). Invariant: it runs only where ``available()`` (triton imports; on CPU only under
``TRITON_INTERPRET=1``, which the tests use).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from msa_memory.routing.kernels import base

if TYPE_CHECKING:
    import torch

__all__ = ["CONFIGS", "KERNELS", "FusedDocTopk", "FusedMaxScores", "available", "config_for", "doc_max_topk",
           "doc_max_topk_plan", "fused_max_scores"]

_jit: Any = None        # the _triton_jit module once imported; False when triton does not import here

CONFIGS = [  # (max rows R, launch config); measured on an H100 (bench_runtime.py --triton-sweep), and the
    # CHUNKS_M choice at 1.56M chunks: R=1 0.339 ms (rows on M) vs 0.389 (chunks on M); R=16 0.338 vs 0.298;
    # R=256 best rows-on-M 0.617 ms vs chunks-on-M 0.492 ms (416 TFLOP/s, this tile)
    (1, {"BLOCK_C": 256, "BLOCK_R": 16, "BLOCK_D": 64, "num_warps": 4, "num_stages": 4, "CHUNKS_M": 0}),
    (16, {"BLOCK_C": 256, "BLOCK_R": 16, "BLOCK_D": 64, "num_warps": 4, "num_stages": 4, "CHUNKS_M": 1}),
    (64, {"BLOCK_C": 128, "BLOCK_R": 64, "BLOCK_D": 64, "num_warps": 4, "num_stages": 3, "CHUNKS_M": 0}),
    (1 << 30, {"BLOCK_C": 128, "BLOCK_R": 128, "BLOCK_D": 64, "num_warps": 8, "num_stages": 3, "CHUNKS_M": 1}),
]
"""Tile sizes and launch options by row count; BLOCK_R shrinks to the padded row count when R is smaller."""


def config_for(R: int) -> dict:
    """Launch config of the first :data:`CONFIGS` entry whose row bound is ≥ R."""
    return dict(next(c for r, c in CONFIGS if R <= r))


def _device_code() -> Any:
    """The :mod:`._triton_jit` module (triton imported on the first call), or None where triton does not import."""
    global _jit
    if _jit is None:
        try:  # pragma: no cover - depends on the install
            from msa_memory.routing.kernels import _triton_jit

            _jit = _triton_jit
        except Exception:  # noqa: BLE001  (ImportError, or a broken triton/driver combination)
            _jit = False
    return _jit or None


def available() -> bool:
    """True when triton imports (the kernel can be launched); imports it on the first call."""
    return _device_code() is not None


MERGE_MAX = 8192
"""Most candidates the one-program merge of :func:`doc_max_topk` takes (documents per block grow to fit)."""
TOPK_MAX = 64
"""Largest k :func:`doc_max_topk` unrolls."""


def doc_max_topk_plan(n_docs: int, k: int) -> tuple[int, int] | None:
    """(documents per block, blocks) of :func:`doc_max_topk`, or None where it does not apply (k too
    large, or more documents than 16384-document blocks merge in one program)."""
    if not 1 <= k <= TOPK_MAX or n_docs < 1:
        return None
    block = 256
    while -(-n_docs // block) * k > MERGE_MAX:
        block *= 2
        if block > 16384:
            return None
    return block, -(-n_docs // block)


def doc_max_topk(cs: torch.Tensor, starts: torch.Tensor, counts: torch.Tensor, max_count: int, k: int) -> torch.Tensor:
    """(2, k) float64: the top-k documents by max chunk score — row 0 scores (descending), row 1 dense
    document indices — with documents as contiguous chunk runs ``starts`` / ``counts`` (int32, N each).

    Two launches instead of the gather + amax + two-stage top-k + packing of the torch path (about ten
    kernels): blocks of documents reduce their chunks and keep their own top k, then one program merges
    the candidates. Same values as ``torch.topk``; among exact ties the lowest document index comes first.
    """
    import torch
    import triton

    jit = _device_code()
    if jit is None:
        raise RuntimeError("triton is not importable here; use the eager routing path.")
    n = int(starts.shape[0])
    plan = doc_max_topk_plan(n, k)
    if plan is None or k > n:
        raise ValueError(f"doc_max_topk: k={k} over {n} documents is outside what it handles.")
    block, n_blocks = plan
    m = n_blocks * k
    vals = torch.empty(m, dtype=torch.float32, device=cs.device)
    idx = torch.empty(m, dtype=torch.int32, device=cs.device)
    out = torch.empty((2, k), dtype=torch.float64, device=cs.device)
    jit.doc_max_topk_kernel[(n_blocks,)](cs, starts, counts, n, int(max_count), vals, idx, K=k, BLOCK_N=block,
                                      num_warps=4 if block <= 1024 else 8)
    jit.topk_merge_kernel[(1,)](vals, idx, m, out, K=k, BLOCK=triton.next_power_of_2(m),
                             num_warps=4 if m <= 2048 else 8)
    return out


def fused_max_scores(lhs: torch.Tensor, keys: torch.Tensor, out: torch.Tensor, **config: int) -> torch.Tensor:
    """``out`` (C,) fp32 ← max over (g, r) of lhs[g, r] · keys[c, g]; lhs (G, R, Dk), keys (C, G, Dk).

    ``config`` overrides :func:`config_for` (BLOCK_C, BLOCK_R, BLOCK_D, CHUNKS_M, num_warps, num_stages).
    """
    jit = _device_code()
    if jit is None:
        raise RuntimeError("triton is not importable here; use the eager routing path.")
    import triton

    G, R, DK = lhs.shape
    C = keys.shape[0]
    if keys.shape[1:] != (G, DK) or keys.stride(2) != 1 or lhs.dtype != keys.dtype:
        raise ValueError(f"fused_max_scores: keys {tuple(keys.shape)} {keys.dtype} do not match lhs "
                         f"{tuple(lhs.shape)} {lhs.dtype} (need (C, G, Dk), last dim contiguous, same dtype).")
    lhs = lhs.contiguous()
    cfg = dict(config_for(R), **config)
    block_r = max(16, min(cfg["BLOCK_R"], triton.next_power_of_2(R)))
    block_d = max(16, min(cfg["BLOCK_D"], triton.next_power_of_2(DK)))
    grid = (triton.cdiv(C, cfg["BLOCK_C"]),)
    if C:
        jit.max_scores_kernel[grid](lhs, keys, out, C, R, DK, G, lhs.stride(0), lhs.stride(1), keys.stride(0),
                                 keys.stride(1), BLOCK_C=cfg["BLOCK_C"], BLOCK_R=block_r, BLOCK_D=block_d,
                                 IEEE=keys.dtype == _f32(), CHUNKS_M=bool(cfg.get("CHUNKS_M", 0)),
                                 num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


def _f32() -> torch.dtype:
    import torch

    return torch.float32


class _Triton(base.RoutingKernel):
    """Where a Triton kernel runs: CUDA, or CPU tensors under ``TRITON_INTERPRET=1`` (the tests)."""

    devices = ("cuda",)
    priority = 20

    def device_types(self) -> tuple[str, ...]:
        return ("cuda", "cpu") if os.environ.get("TRITON_INTERPRET", "") == "1" else self.devices

    def unavailable_reason(self) -> str | None:
        return None if available() else "triton does not import here"


class FusedMaxScores(_Triton):
    """Query-reduce-max chunk scores of row-major keys (C, G, Dk): :func:`fused_max_scores`."""

    name = "triton"
    stage = "scores"
    query_reduces = ("max",)
    switch = "fused_scores"

    def extra_why_not(self, need: base.Need) -> str | None:
        if need.rows < need.config.fused_min_rows:
            return f"needs at least fused_min_rows={need.config.fused_min_rows} query rows, got {need.rows}"
        return None

    def score(self, lhs: torch.Tensor, keys: torch.Tensor, plan: Any, out: torch.Tensor) -> None:
        fused_max_scores(lhs, keys, out)


class FusedDocTopk(_Triton):
    """Document max and top-k over sorted chunk runs in two launches: :func:`doc_max_topk`."""

    name = "triton_doc_topk"
    stage = "doc_topk"
    chunk_reduces = ("max",)
    needs_sorted_map = True
    switch = "fused_topk"

    def extra_why_not(self, need: base.Need) -> str | None:
        if doc_max_topk_plan(need.n_docs, need.k) is None or need.k > need.n_docs:
            return f"k={need.k} over {need.n_docs} documents is outside what it handles (k <= {TOPK_MAX})"
        return None

    def topk(self, cs: torch.Tensor, chunk_map: Any, k: int) -> torch.Tensor:
        return doc_max_topk(cs, *chunk_map.runs, k)


KERNELS = (FusedMaxScores(), FusedDocTopk())
"""The kernels of this module (found by :func:`msa_memory.routing.kernels.all_kernels`)."""
