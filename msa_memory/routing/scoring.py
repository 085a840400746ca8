"""The eager (torch) score path of one router layer: the reference every routing kernel is checked
against, shared by :class:`~msa_memory.routing.index.RouterIndex` and the kernels.

The query's left operand (:func:`prepare_lhs`); one tile of chunk scores with the head/query reduce fused
(:func:`score_tile`, :func:`score_tile_cm`) and the tile loop over a layer (:func:`eager_scores`, with its
reused :class:`Scratch`); the document reduce (:func:`torch_doc_reduce`), the top-k (:func:`topk_blocked`,
:func:`pack_topk`) and the per-chunk offsets of query centring (:func:`centre_offsets`). See the design
note of :mod:`msa_memory.routing.index` for the folds and layouts. Holds no state of an index: the index
passes its keys, maps and scratch in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

    from msa_memory.routing.config import RoutingConfig

__all__ = ["CPU_SCRATCH_BYTES", "ScorePlan", "Scratch", "centre_offsets", "cpu_has_native_bf16", "doc_gather_index",
           "eager_scores", "pack_topk", "pad_query_rows", "prepare_lhs", "resident_dtype", "score_tile",
           "score_tile_cm", "topk_blocked", "torch_doc_reduce", "torch_dtype_of"]

_CM_TALL_MIN_ROWS = 16   # score_tile_cm: from this many query rows on, the GEMM writes (t, R)
CPU_SCRATCH_BYTES = 2 << 20
"""CPU score tile: a cache-sized GEMM output (1M chunks, T=256: 2 MiB 1.04 s, 64 MiB 2.6 s)."""


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


class Scratch:
    """The reused GEMM output of the eager tile loop, one buffer per dtype, on one device."""

    def __init__(self, device: Any) -> None:
        self.device = device
        self._bufs: dict[Any, torch.Tensor] = {}

    def get(self, need: int, dtype: torch.dtype) -> torch.Tensor:
        """A buffer of at least ``need`` elements of ``dtype`` (grown when smaller)."""
        import torch

        buf = self._bufs.get(dtype)
        if buf is None or buf.numel() < need or buf.device != self.device:
            with torch.inference_mode(False):   # a normal tensor: reusable in and outside inference mode
                buf = torch.empty(need, dtype=dtype, device=self.device)
            self._bufs[dtype] = buf
        return buf

    def clear(self) -> None:
        self._bufs.clear()


def eager_scores(lhs: torch.Tensor, kv: torch.Tensor, plan: ScorePlan, out: torch.Tensor, *, chunk_minor: bool,
                 tile_chunks: int, scratch: Scratch | None) -> torch.Tensor:
    """``out`` (C,) float32 ← chunk scores of ``lhs`` (G, R, Dk) against one layer's keys ``kv``, tile by tile:
    (C, G, Dk) rows, or (G, Dk, C) with ``chunk_minor`` (the CPU layout). ``scratch`` None: fresh buffers (what
    a CUDA graph capture needs, its own pool). On CPU the tile shrinks so the GEMM output stays cache-sized."""
    import torch

    C = out.shape[0]
    tile = int(tile_chunks)
    G, R = lhs.shape[0], lhs.shape[1]
    if kv.device.type == "cpu":   # bound the scratch to a cache-sized tile (see CPU_SCRATCH_BYTES)
        tile = min(tile, max(2048, CPU_SCRATCH_BYTES // (G * R * kv.element_size())))
    buf = None
    gemv = G == 1 and R == 1 and not (chunk_minor and kv.dtype != torch.float32)
    if not gemv and scratch is not None:
        buf = scratch.get(G * min(tile, C) * R, kv.dtype)
    for start in range(0, C, tile):
        if chunk_minor:
            kt = kv[:, :, start:start + tile]
            score_tile_cm(lhs, kt, plan, out[start:start + kt.shape[2]], buf)
        else:
            kt = kv[start:start + tile]
            score_tile(lhs, kt, plan, out[start:start + kt.shape[0]], buf)
    return out


def eager_scores_unpacking(lhs: torch.Tensor, stored: torch.Tensor, unpack: Any, plan: ScorePlan, out: torch.Tensor,
                           *, tile_chunks: int, block: int, scratch: Scratch) -> torch.Tensor:
    """:func:`eager_scores` of keys held in a kernel's own layout: row-major tiles of ``block``-multiple chunks
    unpacked from ``stored`` by ``unpack(stored, start, stop)`` (a copy per tile; the slow reference)."""
    G, R, Dk = lhs.shape
    C = out.shape[0]
    tile = max(block, min(int(tile_chunks), CPU_SCRATCH_BYTES // (G * R * stored.element_size())))
    tile -= tile % block
    buf = scratch.get(G * min(tile, C) * R, stored.dtype)
    for start in range(0, C, tile):
        rows = unpack(stored, start, min(C, start + tile))                         # (t, H, D) copy
        score_tile(lhs, rows.view(rows.shape[0], G, Dk), plan, out[start:start + rows.shape[0]], buf)
    return out


def torch_doc_reduce(cs: torch.Tensor, chunk_map: Any, chunk_reduce: str, n_docs: int) -> torch.Tensor:
    """(N,) float32 chunk → document reduce of one layer's chunk scores ``cs`` (C_l,) over its
    :class:`~msa_memory.routing.chunk_map.ChunkMap`: one pass over sorted runs on CPU
    (``torch.segment_reduce``), a gather + amax or a scatter on devices."""
    import torch

    m = chunk_map
    if m.lengths is not None and cs.device.type == "cpu":     # sorted map: one pass over the runs
        return torch.segment_reduce(cs, "max" if chunk_reduce == "max" else "mean", lengths=m.lengths)
    if chunk_reduce == "max":
        if m.gather is not None:
            return cs[m.gather].amax(1)
        ds = torch.full((n_docs,), float("-inf"), dtype=torch.float32, device=cs.device)
        return ds.scatter_reduce_(0, m.chunk_doc, cs, reduce="amax", include_self=True)
    ds = torch.zeros(n_docs, dtype=torch.float32, device=cs.device)
    return ds.index_add_(0, m.chunk_doc, cs) / m.doc_chunk_count


def pack_topk(ds: torch.Tensor, k: int) -> torch.Tensor:
    """(2, k) float64: top-k of document scores ``ds`` (N,): row 0 the scores, row 1 the dense indices
    (float64 holds both exactly, so one device → host copy brings them back)."""
    import torch

    vals, idx = topk_blocked(ds, k) if ds.device.type == "cuda" else torch.topk(ds, k)
    return torch.stack([vals.double(), idx.double()])


def centre_offsets(keys: torch.Tensor, mu: torch.Tensor, score: str) -> torch.Tensor:
    """(C,) float32 per-chunk offset of query centring: the mean score of centre ``mu`` (Hq, D) against keys
    (C, H, D) (normalised under ``score="cosine"``), head-mean folded as :func:`prepare_lhs` folds it. Row by
    row in float64, so a chunk's offset does not depend on which other chunks (which shard) it is computed with."""
    D = keys.shape[-1]
    H = keys.shape[1]
    k = keys.cpu().double()
    g = mu.double().view(H, mu.shape[0] // H, D).sum(1)             # (H, D): GQA groups summed
    scale = 1.0 if score == "cosine" else D ** -0.5
    return ((k * g).sum((1, 2)) * (scale / mu.shape[0])).float()
