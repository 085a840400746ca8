"""The Triton device code of :mod:`msa_memory.routing.kernels.fused_triton` (see its design note).

Kept apart so that the kernel's declaration and wrappers import without triton: this module is imported
only where the kernel may run (CUDA, or CPU under ``TRITON_INTERPRET=1``), through ``fused_triton.available``.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["doc_max_topk_kernel", "max_scores_kernel", "topk_merge_kernel"]


@triton.jit
def max_scores_kernel(Q, K, OUT, C, R, DK, G, s_qg, s_qr, s_kc, s_kg,
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
def doc_max_topk_kernel(CS, STARTS, COUNTS, N, MAXC, OUT_V, OUT_I, K: tl.constexpr, BLOCK_N: tl.constexpr):
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
def topk_merge_kernel(V, I, M, OUT, K: tl.constexpr, BLOCK: tl.constexpr):
    # one program: the top K of M candidates (value, document) → OUT (2, K) float64 (scores; indices)
    lane = tl.arange(0, BLOCK)
    m = lane < M
    v = tl.load(V + lane, mask=m, other=float("-inf"))
    for i in tl.static_range(K):
        mx, am = tl.max(v, axis=0, return_indices=True, return_indices_tie_break_left=True)
        tl.store(OUT + i, mx.to(tl.float64))
        tl.store(OUT + K + i, tl.load(I + am).to(tl.float64))
        v = tl.where(lane == am, float("-inf"), v)
