"""Routing: score a query's router-Q against every resident pooled router key K̄ᵣ, pick top-k documents.

Design note. This is msa-reference.md §3.3–3.4 as one function per router layer:

    S[t,c,h] = <q[t,h], K̄ᵣ[c, g(h)]> · scale        g(h) = h // (Hq / H)   (GQA mapping)
    S[t,c]   = head_reduce_h S[t,c,h]              mean | max
    S[c]     = query_reduce_t S[t,c]               max | mean | last
    s[d]     = chunk_reduce_{c in d} S[c]          max | mean
    I        = top-k_d s[d]                        whole documents

``score="dot"`` is the reference inference path (raw dot · 1/√D, nothing normalized);
``score="cosine"`` is the paper / training path (q and K̄ᵣ L2-normalized per head, scale 1).
Keys stay resident on the device as ONE tensor per router layer (``RouterIndex.layout``): row-major,
viewed as (C, G, Dk), on GPUs; on CPU bf16 keys are stored blocked, (⌈C/32⌉, H, D/2, 32, 2), and
scored by the AVX512-BF16 kernel of ``routing_cpu`` where the CPU has it (and ``cpu_kernel`` /
``MSA_CPU_KERNEL`` leave it on), other CPU keys chunk-minor, (H, D, C). ``keys[layer]`` is a (C, H, D)
view (a row-major copy for blocked keys).

The query becomes one left operand ``lhs`` (G, R, Dk) (:func:`prepare_lhs`): head-mean folds the
heads of each group into the query (mean_h <q_h, k_g(h)> = Σ_g <mean-of-group q, k_g> · H/Hq), so
G = 1, Dk = H·D and R = T rows — and with query-mean too, the T rows fold into ONE (R = 1); head-max
keeps G = H groups of R = T·rep rows. :func:`score_tile` (row-major keys) / :func:`score_tile_cm`
(chunk-minor keys, CPU) score one tile of chunks with one GEMM into a reused scratch buffer, fuse the
head/query reduce in the same tile, and become a GEMV when R = G = 1 (query "last", or head-mean +
query-mean). On CPU the chunk-minor GEMV streams the keys on both cores (MKL's row-major GEMV runs on
one: 2.7× slower at 1M chunks) and CPU tiles keep the GEMM output cache-sized (2 MiB). Peak memory is
bounded by tile × rows, never by C. The tile loop is the eager path, the reference for the others:

- CPU, blocked bf16 keys: ``routing_cpu.score_blocked`` streams the keys once (each block of 32 chunks
  is one contiguous run; a 64-byte line is the chunk × dim-pair operand of ``_mm512_dpbf16_ps``), with
  fp32 accumulation, the head/query reduce fused and every torch thread. It replaces the torch GEMMs,
  whose one-row and skinny bf16 cases ran far off the floors (1M chunks, 2-core AVX512-BF16 VM: see
  :func:`score_tile_cm` and ``benchmarks/results/bench_runtime_cpu.json``). ``kernel="torch"`` scores
  row-major tiles unpacked from the blocks (the reference; slow); if the kernel fails, the index moves
  its keys to the chunk-minor layout once and continues on the torch path.

- CUDA: :meth:`RouterIndex.route` replays the whole route of a layer (score + reduces + top-k) as a
  CUDA graph cached per (layer, T, k, dtype) with ONE device→host copy of (scores, indices)
  (``routing_cuda``); ``RoutingConfig.cuda_graphs=False`` turns it off. Max-reduced queries are
  padded to a power-of-two row count by repeating the last row (max unchanged), so few graphs serve
  all query lengths.
- Chunk → document reduce: over sorted document runs on CPU, ``routing_cpu.doc_reduce`` (the kernel's
  extension, with blocked keys) else ``torch.segment_reduce``; on GPUs a gather of
  :func:`doc_gather_index` + ``amax`` (chunk-reduce max over contiguous documents, no float
  atomics) else ``scatter_reduce_``; on CUDA the top-k is :func:`topk_blocked` (two stages). With
  chunk-reduce max on CUDA (``fused_topk``), document max + top-k are instead two Triton launches
  (``routing_triton.doc_max_topk``), the graph's fixed cost at small stores.
- CUDA, query-reduce max (and any one-row query) with ≥ ``fused_min_rows`` rows: a Triton kernel
  (``routing_triton``) scores a block of chunks against all rows with ``tl.dot`` and keeps the max in registers, writing fp32
  chunk scores and never the R × C matrix; used only when triton imports (eager otherwise).

What it does not do: fetch content K̄V̄ (``memory_tier``), or decide which layers route (the
caller walks the model). Invariant: every chunk → document map indexes the same dense documents
0..N-1 (``doc_ids[n]`` gives the store id) and gives every document at least one chunk. Either one
map (C,) is shared by all layers (a store's aligned chunks), or each layer has its own map (C_l,) over
its own C_l key rows (a layer that also keeps router keys of a shifted chunk grid: both grids' chunks,
so its chunk-reduce max is the max over both); layers with equal maps share one set of reduce tables
(``_ChunkMap``). Not thread-safe (the scratch buffer and graph cache are per index).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from msa_memory.errors import ConfigError, RuntimeMemoryError

if TYPE_CHECKING:
    import torch

__all__ = [
    "RouteResult",
    "RouterIndex",
    "RoutingConfig",
    "ScoreMode",
    "cpu_has_native_bf16",
    "doc_gather_index",
    "pad_query_rows",
    "prepare_lhs",
    "resident_dtype",
    "topk_blocked",
    "score_tile",
    "score_tile_cm",
    "torch_dtype_of",
]

ScoreMode = Literal["dot", "cosine"]
HeadReduce = Literal["mean", "max"]
QueryReduce = Literal["max", "mean", "last"]
ChunkReduce = Literal["max", "mean"]

_CHOICES = {
    "score": ("dot", "cosine"),
    "head_reduce": ("mean", "max"),
    "query_reduce": ("max", "mean", "last"),
    "chunk_reduce": ("max", "mean"),
}


@dataclass(frozen=True)
class RoutingConfig:
    """How router scores are computed and reduced (msa-reference §3.3); validated on construction."""

    score: ScoreMode = "dot"
    """``"dot"``: raw <q, K̄ᵣ>/√D (reference inference); ``"cosine"``: per-head L2-normalized (paper)."""
    head_reduce: HeadReduce = "mean"
    """Reduce over query heads: ``"mean"`` (MSA) or ``"max"``."""
    query_reduce: QueryReduce = "max"
    """Reduce over query tokens: ``"max"`` (MSA), ``"mean"`` or ``"last"``."""
    chunk_reduce: ChunkReduce = "max"
    """Reduce a document's chunk scores: ``"max"`` (MSA) or ``"mean"``."""
    top_k: int = 16
    """Documents chosen per router layer (fewer if the store holds fewer)."""
    tile_chunks: int = 262_144
    """Chunks scored per matmul tile; bounds the score buffer to rows × tile_chunks floats (on CPU the
    tile also shrinks so that buffer stays ≤ 2 MiB, cache-sized)."""
    cuda_graphs: bool = True
    """On CUDA, replay each layer's route as a cached CUDA graph (one launch, one device→host copy)."""
    fused_scores: bool = True
    """On CUDA with triton, score query-reduce-max queries of ≥ ``fused_min_rows`` rows with the fused kernel."""
    fused_min_rows: int = 1
    """Rows of the left operand (query tokens × heads kept apart) from which the fused kernel is used."""
    fused_topk: bool = True
    """On CUDA with triton, chunk-reduce max over a sorted chunk → document map: the document max and the
    top-k as two Triton launches (``routing_triton.doc_max_topk``) instead of about ten torch kernels."""
    cpu_kernel: bool = True
    """On CPUs with AVX512-BF16, keep bf16 keys in the blocked layout and score them with the AVX512-BF16
    kernel (``routing_cpu``; built at first use, ``MSA_CPU_KERNEL=0`` turns it off everywhere). False: the
    chunk-minor layout and the torch GEMM path."""
    compute_dtype: str = "auto"
    """Dtype of the resident keys and the score GEMM: ``"auto"`` keeps the stored dtype on GPUs and on
    CPUs with native bf16 (AMX / AVX512-BF16) and widens bf16/fp16 keys to float32 once, at load, on
    other CPUs (where bf16 GEMMs are emulated and ~100× slower); or ``"float32"`` / ``"bfloat16"``."""

    def __post_init__(self) -> None:
        for name, allowed in _CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigError(f"Routing {name}={value!r} is not supported; allowed: {list(allowed)}.")
        if int(self.top_k) < 1:
            raise ConfigError(f"Routing top_k must be >= 1, got {self.top_k!r}.")
        if int(self.tile_chunks) < 1:
            raise ConfigError(f"Routing tile_chunks must be >= 1, got {self.tile_chunks!r}.")
        if int(self.fused_min_rows) < 1:
            raise ConfigError(f"Routing fused_min_rows must be >= 1, got {self.fused_min_rows!r}.")
        if self.compute_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"Routing compute_dtype={self.compute_dtype!r} is not one of "
                              "'auto', 'float32', 'bfloat16', 'float16'.")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RoutingConfig:
        """Build from a dict; accepts MSA ``msa_config`` spellings (``*_reduce_method``, ``top_k_docs``)."""
        aliases = {
            "head_reduce_method": "head_reduce", "query_reduce_method": "query_reduce",
            "chunk_reduce_method": "chunk_reduce", "top_k_docs": "top_k", "doc_top_k": "top_k",
            "score_mode": "score",
        }
        known = {f for f in cls.__dataclass_fields__}
        out: dict[str, Any] = {}
        for key, value in d.items():
            key = aliases.get(key, key)
            if key in known:
                out[key] = value
        return cls(**out)


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


@dataclass
class RouteResult:
    """Top-k documents of one router layer for one query."""

    doc_index: np.ndarray
    """(k,) int64 dense document indices, best first."""
    doc_ids: np.ndarray
    """(k,) int64 store document ids, best first."""
    scores: np.ndarray
    """(k,) float32 document scores, descending."""
    layer: int = -1
    """Router-layer position 0..L-1 (``-1`` when not tied to a layer)."""
    extra: dict[str, Any] = field(default_factory=dict)


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
    scores them with ``routing_cpu.score_blocked``, since oneDNN's one-row bf16 GEMM reads only ~9–14 GB/s
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


class _ChunkMap:
    """One chunk → document map and the tables of its document reduce, built once per distinct map
    (layers whose maps are equal share one object): ``chunk_doc`` (C,) int64 and ``doc_chunk_count``
    (N,) float32 on the device, and where each document's chunks are one contiguous run in document
    order (what stores write): ``runs`` (starts, counts int32, max count) for ``routing_triton``'s
    document top-k, on CPU ``lengths`` / ``offsets`` for ``torch.segment_reduce`` / ``routing_cpu.doc_reduce``,
    on devices the ``gather`` index of :func:`doc_gather_index` (where it stays ≤ 8 × C entries)."""

    __slots__ = ("chunk_doc", "doc_chunk_count", "gather", "lengths", "n_chunks", "offsets", "runs")

    def __init__(self, chunk_doc_np: np.ndarray, n_docs: int, device: torch.device, where: str = "") -> None:
        import torch

        self.n_chunks = int(chunk_doc_np.shape[0])
        if self.n_chunks and (chunk_doc_np.min() < 0 or chunk_doc_np.max() >= n_docs):
            raise ConfigError(f"chunk_doc{where} must index 0..{n_docs - 1}, got range "
                              f"[{chunk_doc_np.min()}, {chunk_doc_np.max()}].")
        self.chunk_doc = torch.from_numpy(chunk_doc_np).to(device)
        counts = np.bincount(chunk_doc_np, minlength=n_docs) if self.n_chunks else np.zeros(n_docs, np.int64)
        if n_docs and counts.min() == 0:
            none = np.flatnonzero(counts == 0)
            raise ConfigError(f"Every document must own at least one chunk{where}; {len(none)} documents have none "
                              f"(dense indices {none[:5].tolist()}{' ...' if len(none) > 5 else ''}).")
        self.doc_chunk_count = torch.from_numpy(counts.astype(np.float32)).to(device)
        # CPU chunk→doc reduce: when each document's chunks are contiguous and in order (what stores write),
        # one pass over the runs: routing_cpu.doc_reduce with blocked keys, else torch.segment_reduce (2-core
        # VM, max: 10k chunks / 1,250 documents 7.4 µs vs 29.7 µs; 1M / 125k 0.80 ms vs 1.83 ms; 1M / 250k 1.42
        # vs 2.74 ms; segment_reduce was 2x numpy reduceat and ~5x scatter_reduce_)
        self.lengths: torch.Tensor | None = None
        self.offsets: torch.Tensor | None = None     # (N + 1,) int64 run offsets (CPU, sorted map)
        self.gather: torch.Tensor | None = None
        self.runs: tuple[torch.Tensor, torch.Tensor, int] | None = None   # (starts, counts, max count)
        if self.n_chunks and np.all(chunk_doc_np[1:] >= chunk_doc_np[:-1]):
            starts = np.flatnonzero(np.r_[True, chunk_doc_np[1:] != chunk_doc_np[:-1]])
            if self.n_chunks < 2**31:
                self.runs = (torch.from_numpy(starts.astype(np.int32)).to(device),
                             torch.from_numpy(counts.astype(np.int32)).to(device), int(counts.max()))
            if device.type == "cpu":
                self.lengths = torch.from_numpy(counts)
                self.offsets = torch.from_numpy(np.r_[0, np.cumsum(counts)].astype(np.int64))
            elif n_docs * int(counts.max()) <= 8 * self.n_chunks:
                # device chunk→doc max: one gather + amax instead of a scatter of float atomics (about 75 µs
                # at 1M chunks on an H100)
                self.gather = torch.from_numpy(doc_gather_index(starts, counts)).to(device)


def _chunk_maps(chunk_doc: Any, n_layers: int, n_docs: int, device: torch.device) -> tuple[_ChunkMap, list[_ChunkMap]]:
    """(layer 0's map, one map per layer) of ``RouterIndex``'s ``chunk_doc``: one array-like shared by all
    layers, or a list / tuple of one array-like per layer (equal maps, by identity or value, built once)."""
    if not (isinstance(chunk_doc, (list, tuple)) and any(np.ndim(m) > 0 for m in chunk_doc)):
        shared = _ChunkMap(np.asarray(chunk_doc, dtype=np.int64), n_docs, device)
        return shared, [shared] * n_layers
    if len(chunk_doc) != n_layers:
        raise ConfigError(f"chunk_doc gives {len(chunk_doc)} chunk → document maps for {n_layers} router layers; "
                          "give one map shared by all layers or one per layer.")
    seen: list[tuple[Any, np.ndarray, _ChunkMap]] = []
    maps = []
    for i, m in enumerate(chunk_doc):
        arr = np.asarray(m, dtype=np.int64)
        if arr.ndim != 1:
            raise ConfigError(f"The chunk → document map of layer {i} must be 1-D (C_l,); got shape {arr.shape}.")
        cm = next((c for obj, a, c in seen if obj is m or (a.shape == arr.shape and np.array_equal(a, arr))), None)
        if cm is None:
            cm = _ChunkMap(arr, n_docs, device, f" of layer {i}")
            seen.append((m, arr, cm))
        maps.append(cm)
    return maps[0], maps


class RouterIndex:
    """Resident router keys of every router layer plus the chunk → document map(s).

    Parameters
    ----------
    keys : sequence of torch.Tensor
        One (C_l, H, D) tensor per router layer, any float dtype; moved to ``device`` as-is
        (cosine mode normalizes each chunk's heads once, here, in float32).
    chunk_doc : array-like (C,) int64, or a list / tuple of one (C_l,) int64 array-like per layer
        Dense document index 0..N-1 of every chunk: one map shared by all layers (then C_l = C), or
        layer l's own map of its C_l key rows. Every map gives every document at least one chunk.
    doc_ids : array-like, (N,) int64
        Store id of each dense document index.
    config : RoutingConfig
    device : str or torch.device, default "cpu"
    """

    def __init__(self, keys: Sequence[torch.Tensor], chunk_doc: Any, doc_ids: Any,
                 config: RoutingConfig, device: Any = "cpu") -> None:
        import torch

        self.config = config
        self.device = torch.device(device)
        self.doc_ids = np.asarray(doc_ids, dtype=np.int64)
        self.n_docs = int(self.doc_ids.shape[0])
        keys = list(keys)
        self._map0, self._maps = _chunk_maps(chunk_doc, len(keys), self.n_docs, self.device)   # _maps[layer]
        self._keys: list[torch.Tensor] = []     # (C, H, D) views of the storage (rows, chunk-minor layouts)
        self._shapes: list[tuple[int, int, int]] = []
        self._chunk_minor = self.device.type == "cpu"
        self._keys_cm: list[torch.Tensor] = []
        self._keys_blk: list[torch.Tensor] = []  # blocked (nb, H, D/2, 32, 2) bf16: the AVX512-BF16 kernel's layout
        resident = []
        for i, k in enumerate(keys):
            C = self._maps[i].n_chunks
            if k.dim() != 3:
                raise ConfigError(f"Router keys of layer {i} must be (C={C}, H, D); got {tuple(k.shape)}.")
            if k.shape[0] != C:
                raise ConfigError(f"Router keys of layer {i} have {k.shape[0]} rows but its chunk → document map has "
                                  f"{C} chunks; the keys must be (C={C}, H, D), got {tuple(k.shape)}.")
            resident.append(resident_dtype(k.dtype, self.device, config.compute_dtype))
        # CPU + bf16 keys + AVX512-BF16: blocked keys scored by routing_cpu (built here, on first use)
        self._blocked = bool(self._chunk_minor and config.cpu_kernel and resident
                             and all(dt == torch.bfloat16 for dt in resident)
                             and all(k.shape[-1] % 2 == 0 for k in keys) and _cpu_kernel_module() is not None)
        for k, dt in zip(keys, resident):
            k = k.to(self.device, dt)
            if config.score == "cosine":  # normalize after pooling, per chunk and head (§3.3 training path)
                k = torch.nn.functional.normalize(k.float(), dim=-1).to(k.dtype)
            self._shapes.append(tuple(k.shape))
            if self._blocked:       # (nb, H, D/2, 32, 2): each block of 32 chunks one contiguous run
                from msa_memory.runtime import routing_cpu

                self._keys_blk.append(routing_cpu.pack_blocked(k))
            elif self._chunk_minor:   # stored (H, D, C): the score GEMM streams keys as a column-major operand
                self._keys_cm.append(k.permute(1, 2, 0).contiguous())
                self._keys.append(self._keys_cm[-1].permute(2, 0, 1))
            else:
                self._keys.append(k.contiguous())
        self._doc_topk_broken = False
        self._doc_kernel_broken = False
        self._scratch: dict[Any, torch.Tensor] = {}      # reused GEMM output of the eager tile loop
        self._fused_broken = False                          # set when the Triton kernel failed once
        self._graphs: Any = None                           # routing_cuda.GraphRouteCache, made on first CUDA route

    @property
    def n_layers(self) -> int:
        return len(self._shapes)

    @property
    def n_chunks(self) -> int:
        """Chunks of layer 0's chunk → document map (of every layer's when one map is shared; see
        :meth:`layer_chunks`)."""
        return self._map0.n_chunks

    def layer_chunks(self, layer: int) -> int:
        """Chunks C_l of router layer ``layer`` (its key rows, its chunk → document map's length)."""
        return self._maps[layer].n_chunks

    @property
    def chunk_doc(self) -> torch.Tensor:
        """(C,) int64 dense document index of each chunk of layer 0's map, on the device."""
        return self._map0.chunk_doc

    @property
    def doc_chunk_count(self) -> torch.Tensor:
        """(N,) float32 chunks of each document in layer 0's map, on the device."""
        return self._map0.doc_chunk_count

    @property
    def keys(self) -> list[torch.Tensor]:
        """(C_l, H, D) resident keys of each router layer: views of the storage on devices and in the
        chunk-minor CPU layout; with the blocked layout of the CPU kernel (``layout == "blocked"``) each
        access returns row-major COPIES (for tests and baselines; routing never uses them)."""
        if self._blocked:
            from msa_memory.runtime import routing_cpu

            return [routing_cpu.unpack_blocked(b, 0, m.n_chunks) for b, m in zip(self._keys_blk, self._maps)]
        return list(self._keys)

    @property
    def layout(self) -> str:
        """How the keys are stored: ``"rows"`` (C, H, D) on devices, ``"chunk_minor"`` (H, D, C) on CPU, or
        ``"blocked"`` (⌈C/32⌉, H, D/2, 32, 2) on CPUs with the AVX512-BF16 kernel (``routing_cpu``)."""
        return "blocked" if self._blocked else "chunk_minor" if self._chunk_minor else "rows"

    @property
    def key_dtype(self) -> torch.dtype:
        """Dtype of the resident keys (the score GEMM's)."""
        import torch

        stored = self._keys_blk or self._keys
        return stored[0].dtype if stored else torch.float32

    def nbytes(self) -> int:
        """Bytes of resident router keys (all layers; the blocked layout pads C to a multiple of 32)."""
        return sum(k.numel() * k.element_size() for k in (self._keys_blk or self._keys))

    # ------------------------------------------------------------------ scoring
    def _query(self, layer: int, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, ScorePlan]:
        """(keys, lhs (G, R, Dk), plan) of one query at one layer, input checked. The keys are viewed
        (C, G, Dk) on devices and (G, Dk, C) on CPU (chunk-minor storage); blocked CPU keys come as stored,
        (nb, H, D/2, 32, 2)."""
        import torch

        C, H, D = self._shapes[layer]
        self._check_query(layer, q)
        lhs, plan = prepare_lhs(q.to(self.device, torch.float32), self.config, H, self.key_dtype)
        if self._blocked:
            return self._keys_blk[layer], lhs, plan
        keys = self._keys[layer]
        if self._chunk_minor:
            kt = self._keys_cm[layer]
            return (kt.view(1, H * D, C) if lhs.shape[0] == 1 else kt), lhs, plan
        kv = keys.view(C, 1, H * D) if lhs.shape[0] == 1 else keys
        return kv, lhs, plan

    def _check_query(self, layer: int, q: torch.Tensor) -> None:
        _, H, D = self._shapes[layer]
        if q.dim() != 3 or q.shape[-1] != D or q.shape[1] % H:
            raise ConfigError(f"Router query must be (T, Hq, D={D}) with Hq a multiple of H={H}; got {tuple(q.shape)}.")
        if q.shape[0] == 0:
            raise ConfigError("Routing needs at least one query token; got an empty query.")

    def _fused_ok(self, lhs: torch.Tensor, plan: ScorePlan) -> bool:
        cfg = self.config
        if self._fused_broken or not (cfg.fused_scores and plan.query_reduce == "max"
                                      and lhs.shape[1] >= cfg.fused_min_rows):
            return False
        if self.device.type != "cuda" and not _interpreting_triton():
            return False
        from msa_memory.runtime import routing_triton

        return routing_triton.available()

    def chunk_scores(self, layer: int, q: torch.Tensor, kernel: str = "auto") -> torch.Tensor:
        """(C_l,) float32 chunk scores S[c] of one query at router layer ``layer`` (its own chunks).

        ``q`` is (T, Hq, D) router queries of the query tokens (already selected: only routing
        tokens). Hq must be a multiple of the keys' H. ``kernel``: ``"auto"`` (the fused Triton
        kernel where it applies, the AVX512-BF16 CPU kernel for blocked keys, see the module note),
        ``"torch"`` (the eager tile loop), ``"triton"`` (the fused kernel) or ``"cpu"`` (the CPU
        kernel); the last two raise ConfigError where they do not apply.
        """
        import torch

        if kernel not in ("auto", "torch", "triton", "cpu"):
            raise ConfigError(f"Routing kernel={kernel!r} is not one of 'auto', 'torch', 'triton', 'cpu'.")
        kv, lhs, plan = self._query(layer, q)
        C = self._maps[layer].n_chunks
        out = torch.empty(C, dtype=torch.float32, device=self.device)
        if kernel == "cpu" and not self._blocked:
            raise ConfigError("Routing kernel='cpu' needs bf16 keys on a CPU with AVX512-BF16 (layout 'blocked'), "
                              "RoutingConfig.cpu_kernel and MSA_CPU_KERNEL not 0.")
        use_fused = kernel == "triton" or (kernel == "auto" and self._fused_ok(lhs, plan))
        if use_fused:
            from msa_memory.runtime import routing_triton

            if plan.query_reduce != "max" or not routing_triton.available():
                raise ConfigError("The fused Triton kernel needs triton and query_reduce 'max' (or 'last').")
            try:
                # the kernel reads (C, G, Dk) rows; CPU keys are chunk-minor or blocked (only the interpreter runs it there)
                if self._blocked:   # unpack this layer only (``self.keys`` unpacks every layer)
                    from msa_memory.runtime import routing_cpu

                    rows = routing_cpu.unpack_blocked(kv, 0, C).reshape(C, lhs.shape[0], -1)
                elif self._chunk_minor:
                    rows = kv.permute(2, 0, 1).contiguous()
                else:
                    rows = kv
                routing_triton.fused_max_scores(lhs, rows, out)
                return out
            except Exception as e:
                if kernel == "triton":
                    raise
                import warnings

                warnings.warn(f"Fused Triton routing kernel failed ({type(e).__name__}: {e}); using the eager path.",
                              RuntimeWarning, stacklevel=2)
                self._fused_broken = True
        if self._blocked:
            if self._blocked_scores(kv, lhs, plan, out, kernel):
                return out
            kv, lhs, plan = self._query(layer, q)                      # the kernel failed: now chunk-minor
        tile = int(self.config.tile_chunks)
        G, R = lhs.shape[0], lhs.shape[1]
        if self.device.type == "cpu":   # bound the scratch to a cache-sized tile (see _CPU_SCRATCH_BYTES)
            tile = min(tile, max(2048, _CPU_SCRATCH_BYTES // (G * R * kv.element_size())))
        scratch = None
        gemv = G == 1 and R == 1 and not (self._chunk_minor and kv.dtype != torch.float32)
        if not gemv and not _capturing(self.device):   # graphs allocate their own (private pool)
            scratch = self._get_scratch(G * min(tile, C) * R, kv.dtype)
        for start in range(0, C, tile):
            if self._chunk_minor:
                kt = kv[:, :, start:start + tile]
                score_tile_cm(lhs, kt, plan, out[start:start + kt.shape[2]], scratch)
            else:
                kt = kv[start:start + tile]
                score_tile(lhs, kt, plan, out[start:start + kt.shape[0]], scratch)
        return out

    def _get_scratch(self, need: int, dtype: torch.dtype) -> torch.Tensor:
        import torch

        scratch = self._scratch.get(dtype)
        if scratch is None or scratch.numel() < need or scratch.device != self.device:
            with torch.inference_mode(False):   # a normal tensor: reusable in and outside inference mode
                scratch = torch.empty(need, dtype=dtype, device=self.device)
            self._scratch[dtype] = scratch
        return scratch

    def _blocked_scores(self, blk: torch.Tensor, lhs: torch.Tensor, plan: ScorePlan, out: torch.Tensor,
                        kernel: str) -> bool:
        """``out`` ← chunk scores from blocked CPU keys with the AVX512-BF16 kernel (``routing_cpu``); True
        when done. ``kernel="torch"``: the torch tile loop over row-major tiles unpacked from the blocks
        (``score_tile``, the reference; slow, a copy per tile). Should the kernel fail, the keys move to
        the chunk-minor layout once (one warning) and False sends this route to the torch path there."""
        from msa_memory.runtime import routing_cpu

        if kernel != "torch":
            try:
                routing_cpu.score_blocked(lhs, blk, plan.T, plan.rep, plan.query_reduce, out)
                return True
            except Exception as e:  # noqa: BLE001
                if kernel == "cpu":
                    raise
                import warnings

                warnings.warn(f"AVX512-BF16 routing kernel failed ({type(e).__name__}: {e}); keys move to the "
                              "chunk-minor layout and routing uses the torch path.", RuntimeWarning, stacklevel=3)
                self._to_chunk_minor()
                return False
        G, R, Dk = lhs.shape
        C = out.shape[0]                                                     # the layer's chunks
        tile = max(routing_cpu.BLOCK, min(int(self.config.tile_chunks),
                                          _CPU_SCRATCH_BYTES // (G * R * blk.element_size())))
        tile -= tile % routing_cpu.BLOCK
        scratch = self._get_scratch(G * min(tile, C) * R, blk.dtype)
        for start in range(0, C, tile):
            rows = routing_cpu.unpack_blocked(blk, start, min(C, start + tile))           # (t, H, D) copy
            score_tile(lhs, rows.view(rows.shape[0], G, Dk), plan, out[start:start + rows.shape[0]], scratch)
        return True

    def _to_chunk_minor(self) -> None:
        """Move blocked keys to the chunk-minor layout (the torch path's), layer by layer."""
        from msa_memory.runtime import routing_cpu

        while self._keys_blk:
            blk = self._keys_blk.pop(0)
            C = self._maps[len(self._keys_cm)].n_chunks                      # the layer moved now
            cm = routing_cpu.unpack_blocked(blk, 0, C).permute(1, 2, 0).contiguous()
            del blk
            self._keys_cm.append(cm)
            self._keys.append(cm.permute(2, 0, 1))
        self._blocked = False
        self._scratch.clear()

    def _doc_reduce(self, cs: torch.Tensor, m: _ChunkMap) -> torch.Tensor:
        """(N,) float32 chunk reduce of one layer's chunk scores ``cs`` (C_l,) over its map ``m``."""
        import torch

        if m.lengths is not None and cs.device.type == "cpu":     # sorted map: one pass over the runs
            if self._blocked and not self._doc_kernel_broken and cs.dtype == torch.float32 and cs.is_contiguous():
                # the kernel's extension is loaded (blocked keys): its doc_reduce (see _ChunkMap for the figures)
                from msa_memory.runtime import routing_cpu

                out = torch.empty(self.n_docs, dtype=torch.float32)
                try:
                    routing_cpu.doc_reduce(cs, m.offsets, self.config.chunk_reduce, out)
                    return out
                except Exception as e:  # noqa: BLE001  (segment_reduce is exact too)
                    import warnings

                    warnings.warn(f"CPU document reduce kernel failed ({type(e).__name__}: {e}); using "
                                  "torch.segment_reduce.", RuntimeWarning, stacklevel=2)
                    self._doc_kernel_broken = True
            return torch.segment_reduce(cs, "max" if self.config.chunk_reduce == "max" else "mean",
                                        lengths=m.lengths)
        if self.config.chunk_reduce == "max":
            if m.gather is not None:
                return cs[m.gather].amax(1)
            ds = torch.full((self.n_docs,), float("-inf"), dtype=torch.float32, device=self.device)
            return ds.scatter_reduce_(0, m.chunk_doc, cs, reduce="amax", include_self=True)
        ds = torch.zeros(self.n_docs, dtype=torch.float32, device=self.device)
        return ds.index_add_(0, m.chunk_doc, cs) / m.doc_chunk_count

    def doc_scores(self, layer: int, q: torch.Tensor, kernel: str = "auto") -> torch.Tensor:
        """(N,) float32 document scores s[d] (chunk reduce of :meth:`chunk_scores`)."""
        return self._doc_reduce(self.chunk_scores(layer, q, kernel), self._maps[layer])

    @staticmethod
    def add(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
        """Sum of two :meth:`doc_scores` results (``a`` None: ``b``); sharded indexes sum shard by shard."""
        return b if a is None else a + b

    def gather_scores(self, ds: torch.Tensor) -> np.ndarray:
        """(N,) float32 host copy of :meth:`doc_scores` results, in dense document order."""
        return ds.float().cpu().numpy()

    def route_device(self, layer: int, q: torch.Tensor, k: int, kernel: str = "auto") -> torch.Tensor:
        """(2, k) float64 on the device: row 0 the top-k document scores, row 1 their dense indices.

        No host synchronisation inside: this is what the CUDA graph captures (float64 holds both the
        fp32 scores and indices < 2⁵³ exactly, so ONE copy brings both back).
        """
        m = self._maps[layer]
        if self._doc_topk_ok(k, m):
            from msa_memory.runtime import routing_triton

            cs = self.chunk_scores(layer, q, kernel)
            try:
                return routing_triton.doc_max_topk(cs, *m.runs, k)
            except Exception as e:  # noqa: BLE001  (a compile or launch failure: the torch path is exact too)
                import warnings

                warnings.warn(f"Triton document top-k failed ({type(e).__name__}: {e}); using torch.",
                              RuntimeWarning, stacklevel=2)
                self._doc_topk_broken = True
                return self._pack_topk(self._doc_reduce(cs, m), k)
        return self._pack_topk(self.doc_scores(layer, q, kernel), k)

    def _pack_topk(self, ds: torch.Tensor, k: int) -> torch.Tensor:
        import torch

        vals, idx = topk_blocked(ds, k) if ds.device.type == "cuda" else torch.topk(ds, k)
        return torch.stack([vals.double(), idx.double()])

    def _doc_topk_ok(self, k: int, m: _ChunkMap | None = None) -> bool:
        """True when the Triton document top-k serves map ``m`` (default: layer 0's; bench_runtime asks)."""
        m = self._map0 if m is None else m
        if not (self.config.fused_topk and self.config.chunk_reduce == "max" and m.runs is not None
                and not self._doc_topk_broken):
            return False
        if self.device.type != "cuda" and not _interpreting_triton():
            return False
        from msa_memory.runtime import routing_triton

        return routing_triton.available() and routing_triton.doc_max_topk_plan(self.n_docs, k) is not None

    def _check_route(self, layer: int, k: int | None) -> int:
        if self.n_docs == 0:
            raise RuntimeMemoryError("The store has no documents to route to; encode some first (`msa-encode`).")
        if not 0 <= layer < self.n_layers:
            raise ConfigError(f"Router layer position {layer!r} out of range 0..{self.n_layers - 1}.")
        return min(int(k or self.config.top_k), self.n_docs)

    def route_scores(self, layer: int, ds: torch.Tensor, k: int | None = None) -> RouteResult:
        """Top-k documents of given (N,) document scores ``ds`` (e.g. a router layer's with its suffix query's
        added), reported as router layer ``layer``'s route."""
        import torch

        k = self._check_route(layer, k)
        if tuple(ds.shape) != (self.n_docs,):
            raise ConfigError(f"Document scores of shape {tuple(ds.shape)} for {self.n_docs} documents.")
        with torch.no_grad():
            packed = self._pack_topk(ds.float(), k).cpu()
        idx_np = packed[1].numpy().astype(np.int64)
        return RouteResult(doc_index=idx_np, doc_ids=self.doc_ids[idx_np], scores=packed[0].numpy().astype(np.float32),
                           layer=layer)

    def route(self, layer: int, q: torch.Tensor, k: int | None = None, path: str = "auto") -> RouteResult:
        """Top-k documents of router layer ``layer`` for router queries ``q`` (T, Hq, D).

        ``path``: ``"auto"`` (the CUDA graph on CUDA when ``config.cuda_graphs``, else eager),
        ``"eager"`` (op by op: the reference) or ``"graph"`` (CUDA only).
        """
        import torch

        k = self._check_route(layer, k)
        self._check_query(layer, q)
        if path not in ("auto", "eager", "graph"):
            raise ConfigError(f"Routing path={path!r} is not one of 'auto', 'eager', 'graph'.")
        use_graph = path == "graph" or (path == "auto" and self.config.cuda_graphs and self.device.type == "cuda")
        if use_graph:
            if self.device.type != "cuda":
                raise ConfigError("Routing path='graph' needs the router keys on a CUDA device.")
            if self._graphs is None:
                from msa_memory.runtime.routing_cuda import GraphRouteCache

                self._graphs = GraphRouteCache(self)
            packed = self._graphs.route(layer, q, k)
        else:
            with torch.no_grad():
                packed = self.route_device(layer, q, k).cpu()
        vals = packed[0].numpy().astype(np.float32)
        idx_np = packed[1].numpy().astype(np.int64)
        return RouteResult(doc_index=idx_np, doc_ids=self.doc_ids[idx_np], scores=vals, layer=layer)


_CPU_SCRATCH_BYTES = 2 << 20   # CPU score tile: a cache-sized GEMM output (1M chunks, T=256: 2 MiB 1.04 s, 64 MiB 2.6 s)
_CM_TALL_MIN_ROWS = 16


def _cpu_kernel_module() -> Any:
    """The AVX512-BF16 routing extension, or None (no such CPU, MSA_CPU_KERNEL=0, or no build)."""
    from msa_memory.runtime import routing_cpu

    return routing_cpu.load()


def _capturing(device: Any) -> bool:
    import torch

    return torch.device(device).type == "cuda" and torch.cuda.is_current_stream_capturing()


def _interpreting_triton() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "") == "1"
