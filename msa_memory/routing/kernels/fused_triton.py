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

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["CONFIGS", "available", "config_for", "doc_max_topk", "doc_max_topk_plan", "fused_max_scores"]

try:  # pragma: no cover - depends on the install
    import triton
    import triton.language as tl

    _HAVE = True
except Exception:  # noqa: BLE001  (ImportError, or a broken triton/driver combination)
    _HAVE = False

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


def available() -> bool:
    """True when triton imported (the kernel can be launched)."""
    return _HAVE


if _HAVE:

    @triton.jit
    def _max_scores_kernel(Q, K, OUT, C, R, DK, G, s_qg, s_qr, s_kc, s_kg,
                           BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                           IEEE: tl.constexpr, CHUNKS_M: tl.constexpr):
        # CHUNKS_M: chunks are the MMA's M side (acc is BLOCK_C × BLOCK_R, max along each row); otherwise
        # query rows are (acc BLOCK_R × BLOCK_C, max down each column, across warps)
        pid = tl.program_id(0)
        offs_c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = offs_c < C
        best = tl.full((BLOCK_C,), float("-inf"), tl.float32)
        for g in range(G):
            for r0 in range(0, R, BLOCK_R):
                offs_r = r0 + tl.arange(0, BLOCK_R)
                rmask = offs_r < R
                if CHUNKS_M:
                    acc = tl.zeros((BLOCK_C, BLOCK_R), dtype=tl.float32)
                else:
                    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
                for d0 in range(0, DK, BLOCK_D):
                    offs_d = d0 + tl.arange(0, BLOCK_D)
                    dmask = offs_d < DK
                    q = tl.load(Q + g * s_qg + offs_r[:, None] * s_qr + offs_d[None, :],
                                mask=rmask[:, None] & dmask[None, :], other=0.0)
                    k = tl.load(K + offs_c[:, None] * s_kc + g * s_kg + offs_d[None, :],
                                mask=cmask[:, None] & dmask[None, :], other=0.0)
                    if CHUNKS_M:
                        if IEEE:
                            acc = tl.dot(k, tl.trans(q), acc, input_precision="ieee")
                        else:
                            acc = tl.dot(k, tl.trans(q), acc)
                    else:
                        if IEEE:
                            acc = tl.dot(q, tl.trans(k), acc, input_precision="ieee")
                        else:
                            acc = tl.dot(q, tl.trans(k), acc)
                if CHUNKS_M:
                    acc = tl.where(rmask[None, :], acc, float("-inf"))
                    best = tl.maximum(best, tl.max(acc, axis=1))
                else:
                    acc = tl.where(rmask[:, None], acc, float("-inf"))
                    best = tl.maximum(best, tl.max(acc, axis=0))
        tl.store(OUT + offs_c, best, mask=cmask)


    @triton.jit
    def _doc_max_topk_kernel(CS, STARTS, COUNTS, N, MAXC, OUT_V, OUT_I, K: tl.constexpr, BLOCK_N: tl.constexpr):
        # one program: BLOCK_N documents' max chunk score (chunks starts[n] .. starts[n] + counts[n] - 1),
        # then the block's top K by K rounds of max / argmax (ties: the lowest document first)
        pid = tl.program_id(0)
        lane = tl.arange(0, BLOCK_N)
        offs = pid * BLOCK_N + lane
        m = offs < N
        st = tl.load(STARTS + offs, mask=m, other=0)
        last = tl.load(COUNTS + offs, mask=m, other=1) - 1
        best = tl.full((BLOCK_N,), float("-inf"), tl.float32)
        for j in range(0, MAXC):
            v = tl.load(CS + st + tl.minimum(j, last), mask=m, other=float("-inf"))
            best = tl.maximum(best, v)
        for i in tl.static_range(K):
            mx, am = tl.max(best, axis=0, return_indices=True, return_indices_tie_break_left=True)
            tl.store(OUT_V + pid * K + i, mx)
            tl.store(OUT_I + pid * K + i, pid * BLOCK_N + am)
            best = tl.where(lane == am, float("-inf"), best)

    @triton.jit
    def _topk_merge_kernel(V, I, M, OUT, K: tl.constexpr, BLOCK: tl.constexpr):
        # one program: the top K of M candidates (value, document) → OUT (2, K) float64 (scores; indices)
        lane = tl.arange(0, BLOCK)
        m = lane < M
        v = tl.load(V + lane, mask=m, other=float("-inf"))
        for i in tl.static_range(K):
            mx, am = tl.max(v, axis=0, return_indices=True, return_indices_tie_break_left=True)
            tl.store(OUT + i, mx.to(tl.float64))
            tl.store(OUT + K + i, tl.load(I + am).to(tl.float64))
            v = tl.where(lane == am, float("-inf"), v)


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

    if not _HAVE:
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
    _doc_max_topk_kernel[(n_blocks,)](cs, starts, counts, n, int(max_count), vals, idx, K=k, BLOCK_N=block,
                                      num_warps=4 if block <= 1024 else 8)
    _topk_merge_kernel[(1,)](vals, idx, m, out, K=k, BLOCK=triton.next_power_of_2(m),
                             num_warps=4 if m <= 2048 else 8)
    return out


def fused_max_scores(lhs: torch.Tensor, keys: torch.Tensor, out: torch.Tensor, **config: int) -> torch.Tensor:
    """``out`` (C,) fp32 ← max over (g, r) of lhs[g, r] · keys[c, g]; lhs (G, R, Dk), keys (C, G, Dk).

    ``config`` overrides :func:`config_for` (BLOCK_C, BLOCK_R, BLOCK_D, CHUNKS_M, num_warps, num_stages).
    """
    if not _HAVE:
        raise RuntimeError("triton is not importable here; use the eager routing path.")
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
        _max_scores_kernel[grid](lhs, keys, out, C, R, DK, G, lhs.stride(0), lhs.stride(1), keys.stride(0),
                                 keys.stride(1), BLOCK_C=cfg["BLOCK_C"], BLOCK_R=block_r, BLOCK_D=block_d,
                                 IEEE=keys.dtype == _f32(), CHUNKS_M=bool(cfg.get("CHUNKS_M", 0)),
                                 num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


def _f32() -> torch.dtype:
    import torch

    return torch.float32
