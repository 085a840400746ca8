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
scored by the AVX512-BF16 kernel of ``cpu_avx512`` where the CPU has it (and ``cpu_kernel`` /
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

- CPU, blocked bf16 keys: ``cpu_avx512.score_blocked`` streams the keys once (each block of 32 chunks
  is one contiguous run; a 64-byte line is the chunk × dim-pair operand of ``_mm512_dpbf16_ps``), with
  fp32 accumulation, the head/query reduce fused and every torch thread. It replaces the torch GEMMs,
  whose one-row and skinny bf16 cases ran far off the floors (1M chunks, 2-core AVX512-BF16 VM: see
  :func:`score_tile_cm` and ``benchmarks/results/bench_runtime_cpu.json``). ``kernel="torch"`` scores
  row-major tiles unpacked from the blocks (the reference; slow); if the kernel fails, the index moves
  its keys to the chunk-minor layout once and continues on the torch path.

- CUDA: :meth:`RouterIndex.route` replays the whole route of a layer (score + reduces + top-k) as a
  CUDA graph cached per (layer, T, k, dtype) with ONE device→host copy of (scores, indices)
  (``cuda_graph``); ``RoutingConfig.cuda_graphs=False`` turns it off. Max-reduced queries are
  padded to a power-of-two row count by repeating the last row (max unchanged), so few graphs serve
  all query lengths.
- Chunk → document reduce: over sorted document runs on CPU, ``cpu_avx512.doc_reduce`` (the kernel's
  extension, with blocked keys) else ``torch.segment_reduce``; on GPUs a gather of
  :func:`doc_gather_index` + ``amax`` (chunk-reduce max over contiguous documents, no float
  atomics) else ``scatter_reduce_``; on CUDA the top-k is :func:`topk_blocked` (two stages). With
  chunk-reduce max on CUDA (``fused_topk``), document max + top-k are instead two Triton launches
  (``fused_triton.doc_max_topk``), the graph's fixed cost at small stores.
- CUDA, query-reduce max (and any one-row query) with ≥ ``fused_min_rows`` rows: a Triton kernel
  (``fused_triton``) scores a block of chunks against all rows with ``tl.dot`` and keeps the max in registers, writing fp32
  chunk scores and never the R × C matrix; used only when triton imports (eager otherwise).

What it does not do: fetch content K̄V̄ (``memory_tier``), or decide which layers route (the
caller walks the model). Invariant: every chunk → document map indexes the same dense documents
0..N-1 (``doc_ids[n]`` gives the store id) and gives every document at least one chunk. Either one
map (C,) is shared by all layers (a store's aligned chunks), or each layer has its own map (C_l,) over
its own C_l key rows (a layer that also keeps router keys of a shifted chunk grid: both grids' chunks,
so its chunk-reduce max is the max over both); layers with equal maps share one set of reduce tables
(``routing.chunk_map.ChunkMap``). Not thread-safe (the scratch buffer and graph cache are per index).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from msa_memory.errors import ConfigError, RuntimeMemoryError
from msa_memory.routing.chunk_map import ChunkMap, chunk_maps
from msa_memory.routing.config import RoutingConfig
from msa_memory.routing.scoring import ScorePlan, prepare_lhs, resident_dtype, score_tile, score_tile_cm, topk_blocked

if TYPE_CHECKING:
    import torch

__all__ = ["RouteResult", "RouterIndex"]


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



def route_k(n_docs: int, n_layers: int, top_k: int, layer: int, k: int | None) -> int:
    """Documents a route of router layer position ``layer`` returns (``k``, default ``top_k``, at most
    ``n_docs``); RuntimeMemoryError for an empty store, ConfigError for a layer out of range."""
    if n_docs == 0:
        raise RuntimeMemoryError("The store has no documents to route to; encode some first (`msa-encode`).")
    if not 0 <= layer < n_layers:
        raise ConfigError(f"Router layer position {layer!r} out of range 0..{n_layers - 1}.")
    return min(int(k or top_k), n_docs)


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
        self._map0, self._maps = chunk_maps(chunk_doc, len(keys), self.n_docs, self.device)   # _maps[layer]
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
        # CPU + bf16 keys + AVX512-BF16: blocked keys scored by cpu_avx512 (built here, on first use)
        self._blocked = bool(self._chunk_minor and config.cpu_kernel and resident
                             and all(dt == torch.bfloat16 for dt in resident)
                             and all(k.shape[-1] % 2 == 0 for k in keys) and _cpu_kernel_module() is not None)
        for k, dt in zip(keys, resident):
            k = k.to(self.device, dt)
            if config.score == "cosine":  # normalize after pooling, per chunk and head (§3.3 training path)
                k = torch.nn.functional.normalize(k.float(), dim=-1).to(k.dtype)
            self._shapes.append(tuple(k.shape))
            if self._blocked:       # (nb, H, D/2, 32, 2): each block of 32 chunks one contiguous run
                from msa_memory.routing.kernels import cpu_avx512

                self._keys_blk.append(cpu_avx512.pack_blocked(k))
            elif self._chunk_minor:   # stored (H, D, C): the score GEMM streams keys as a column-major operand
                self._keys_cm.append(k.permute(1, 2, 0).contiguous())
                self._keys.append(self._keys_cm[-1].permute(2, 0, 1))
            else:
                self._keys.append(k.contiguous())
        self._doc_topk_broken = False
        self._doc_kernel_broken = False
        self._scratch: dict[Any, torch.Tensor] = {}      # reused GEMM output of the eager tile loop
        self._fused_broken = False                          # set when the Triton kernel failed once
        self._graphs: Any = None                           # cuda_graph.GraphRouteCache, made on first CUDA route
        self._offsets: dict[tuple[bool, int], torch.Tensor] = {}   # (suffix?, layer) -> (C_l,) query-centre offsets

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
            from msa_memory.routing.kernels import cpu_avx512

            return [cpu_avx512.unpack_blocked(b, 0, m.n_chunks) for b, m in zip(self._keys_blk, self._maps)]
        return list(self._keys)

    @property
    def layout(self) -> str:
        """How the keys are stored: ``"rows"`` (C, H, D) on devices, ``"chunk_minor"`` (H, D, C) on CPU, or
        ``"blocked"`` (⌈C/32⌉, H, D/2, 32, 2) on CPUs with the AVX512-BF16 kernel (``cpu_avx512``)."""
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
        from msa_memory.routing.kernels import fused_triton

        return fused_triton.available()

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
            from msa_memory.routing.kernels import fused_triton

            if plan.query_reduce != "max" or not fused_triton.available():
                raise ConfigError("The fused Triton kernel needs triton and query_reduce 'max' (or 'last').")
            try:
                # the kernel reads (C, G, Dk) rows; CPU keys are chunk-minor or blocked (only the interpreter runs it there)
                if self._blocked:   # unpack this layer only (``self.keys`` unpacks every layer)
                    from msa_memory.routing.kernels import cpu_avx512

                    rows = cpu_avx512.unpack_blocked(kv, 0, C).reshape(C, lhs.shape[0], -1)
                elif self._chunk_minor:
                    rows = kv.permute(2, 0, 1).contiguous()
                else:
                    rows = kv
                fused_triton.fused_max_scores(lhs, rows, out)
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
        """``out`` ← chunk scores from blocked CPU keys with the AVX512-BF16 kernel (``cpu_avx512``); True
        when done. ``kernel="torch"``: the torch tile loop over row-major tiles unpacked from the blocks
        (``score_tile``, the reference; slow, a copy per tile). Should the kernel fail, the keys move to
        the chunk-minor layout once (one warning) and False sends this route to the torch path there."""
        from msa_memory.routing.kernels import cpu_avx512

        if kernel != "torch":
            try:
                cpu_avx512.score_blocked(lhs, blk, plan.T, plan.rep, plan.query_reduce, out)
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
        tile = max(cpu_avx512.BLOCK, min(int(self.config.tile_chunks),
                                          _CPU_SCRATCH_BYTES // (G * R * blk.element_size())))
        tile -= tile % cpu_avx512.BLOCK
        scratch = self._get_scratch(G * min(tile, C) * R, blk.dtype)
        for start in range(0, C, tile):
            rows = cpu_avx512.unpack_blocked(blk, start, min(C, start + tile))           # (t, H, D) copy
            score_tile(lhs, rows.view(rows.shape[0], G, Dk), plan, out[start:start + rows.shape[0]], scratch)
        return True

    def _to_chunk_minor(self) -> None:
        """Move blocked keys to the chunk-minor layout (the torch path's), layer by layer."""
        from msa_memory.routing.kernels import cpu_avx512

        while self._keys_blk:
            blk = self._keys_blk.pop(0)
            C = self._maps[len(self._keys_cm)].n_chunks                      # the layer moved now
            cm = cpu_avx512.unpack_blocked(blk, 0, C).permute(1, 2, 0).contiguous()
            del blk
            self._keys_cm.append(cm)
            self._keys.append(cm.permute(2, 0, 1))
        self._blocked = False
        self._scratch.clear()

    def _doc_reduce(self, cs: torch.Tensor, m: ChunkMap) -> torch.Tensor:
        """(N,) float32 chunk reduce of one layer's chunk scores ``cs`` (C_l,) over its map ``m``."""
        import torch

        if m.lengths is not None and cs.device.type == "cpu":     # sorted map: one pass over the runs
            if self._blocked and not self._doc_kernel_broken and cs.dtype == torch.float32 and cs.is_contiguous():
                # the kernel's extension is loaded (blocked keys): its doc_reduce (see ChunkMap for the figures)
                from msa_memory.routing.kernels import cpu_avx512

                out = torch.empty(self.n_docs, dtype=torch.float32)
                try:
                    cpu_avx512.doc_reduce(cs, m.offsets, self.config.chunk_reduce, out)
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

    def doc_scores(self, layer: int, q: torch.Tensor, kernel: str = "auto", *, suffix: bool = False) -> torch.Tensor:
        """(N,) float32 document scores s[d] (chunk reduce of :meth:`chunk_scores`); with query centres set
        (:meth:`set_query_centres`), each chunk's offset is taken off before the reduce (``suffix``: the
        queries are suffix queries, which have centres of their own)."""
        cs = self.chunk_scores(layer, q, kernel)
        off = self._offsets.get((bool(suffix), int(layer)))
        return self._doc_reduce(cs if off is None else cs - off, self._maps[layer])

    @property
    def centred(self) -> bool:
        """Whether query centres are set (:meth:`set_query_centres`)."""
        return bool(self._offsets)

    def set_query_centres(self, centres: Mapping[int, torch.Tensor] | None,
                          suffix: Mapping[int, torch.Tensor] | None = None) -> None:
        """Hubness correction: score ``(q' - mu_l) . k`` in place of ``q' . k`` at each layer l of ``centres``.

        ``centres[l]`` (Hq, D) is the mean of the *prepared* router queries (L2-normalised per head under
        ``score="cosine"``, raw under ``"dot"``) over reference questions; ``suffix[l]`` likewise for the suffix
        queries of layer l. The term ``mu_l . k_c`` does not depend on the question, so it is kept as one
        float per chunk (the chunk's mean score against the reference questions) and taken off every chunk
        score before the document reduce: a chunk that scores high against every question (a hub) no
        longer wins for all of them. Every scoring kernel is unchanged; ``route`` then goes through
        :meth:`doc_scores` (no CUDA graph). None (or empty) clears them. Layer positions index the router
        layers as everywhere in this class."""
        import torch

        offsets: dict[tuple[bool, int], torch.Tensor] = {}
        keys = self.keys if (centres or suffix) else []
        for is_suffix, table in ((False, centres or {}), (True, suffix or {})):
            for layer, mu in table.items():
                layer = int(layer)
                if not 0 <= layer < self.n_layers:
                    raise ConfigError(f"Query centre for router layer position {layer}, but this index has "
                                      f"{self.n_layers} router layers.")
                C, H, D = self._shapes[layer]
                mu = torch.as_tensor(mu, dtype=torch.float32)
                if mu.dim() != 2 or mu.shape[1] != D or mu.shape[0] % H:
                    raise ConfigError(f"Query centre of router layer position {layer} must be (Hq, D={D}) with Hq a "
                                      f"multiple of H={H}; got {tuple(mu.shape)}.")
                k = keys[layer].cpu().double()                                 # (C, H, D), normalised if cosine
                g = mu.double().view(H, mu.shape[0] // H, D).sum(1)             # (H, D): GQA groups summed
                scale = 1.0 if self.config.score == "cosine" else D ** -0.5
                # head mean, as prepare_lhs folds it; row by row in float64, so a chunk's offset does not
                # depend on which other chunks (which shard) it is computed with
                off = (k * g).sum((1, 2)) * (scale / mu.shape[0])
                offsets[(is_suffix, layer)] = off.float().to(self.device).contiguous()
        self._offsets = offsets

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
            from msa_memory.routing.kernels import fused_triton

            cs = self.chunk_scores(layer, q, kernel)
            off = self._offsets.get((False, int(layer)))
            if off is not None:
                cs = cs - off
            try:
                return fused_triton.doc_max_topk(cs, *m.runs, k)
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

    def _doc_topk_ok(self, k: int, m: ChunkMap | None = None) -> bool:
        """True when the Triton document top-k serves map ``m`` (default: layer 0's; bench_runtime asks)."""
        m = self._map0 if m is None else m
        if not (self.config.fused_topk and self.config.chunk_reduce == "max" and m.runs is not None
                and not self._doc_topk_broken):
            return False
        if self.device.type != "cuda" and not _interpreting_triton():
            return False
        from msa_memory.routing.kernels import fused_triton

        return fused_triton.available() and fused_triton.doc_max_topk_plan(self.n_docs, k) is not None

    def _check_route(self, layer: int, k: int | None) -> int:
        return route_k(self.n_docs, self.n_layers, self.config.top_k, layer, k)

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
        if self._offsets:   # query centres: the chunk offsets come off before the document reduce
            with torch.no_grad():
                return self.route_scores(layer, self.doc_scores(layer, q), k)
        use_graph = path == "graph" or (path == "auto" and self.config.cuda_graphs and self.device.type == "cuda")
        if use_graph:
            if self.device.type != "cuda":
                raise ConfigError("Routing path='graph' needs the router keys on a CUDA device.")
            if self._graphs is None:
                from msa_memory.routing.kernels.cuda_graph import GraphRouteCache

                self._graphs = GraphRouteCache(self)
            packed = self._graphs.route(layer, q, k)
        else:
            with torch.no_grad():
                packed = self.route_device(layer, q, k).cpu()
        vals = packed[0].numpy().astype(np.float32)
        idx_np = packed[1].numpy().astype(np.int64)
        return RouteResult(doc_index=idx_np, doc_ids=self.doc_ids[idx_np], scores=vals, layer=layer)


_CPU_SCRATCH_BYTES = 2 << 20   # CPU score tile: a cache-sized GEMM output (1M chunks, T=256: 2 MiB 1.04 s, 64 MiB 2.6 s)


def _cpu_kernel_module() -> Any:
    """The AVX512-BF16 routing extension, or None (no such CPU, MSA_CPU_KERNEL=0, or no build)."""
    from msa_memory.routing.kernels import cpu_avx512

    return cpu_avx512.load()


def _capturing(device: Any) -> bool:
    import torch

    return torch.device(device).type == "cuda" and torch.cuda.is_current_stream_capturing()


def _interpreting_triton() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "") == "1"
