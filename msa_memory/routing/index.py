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
bounded by tile × rows, never by C. The tile loop is the eager path, the reference for the others.

The fast paths are kernels of ``routing.kernels``, behind one interface (``kernels.base``): each states
its stage (scores, document reduce, document top-k, whole route), devices, key dtypes and layout, CPU
flags, reduces and ``RoutingConfig`` switch, and the index asks ``kernels.select`` at each step instead of
testing those conditions itself; a kernel that fails is marked broken and the torch path takes over.
Today: on CPUs with AVX512-BF16, bf16 keys are held blocked and scored by ``cpu_avx512`` (whose extension
also reduces chunks to documents; ``kernel="torch"`` then scores row tiles unpacked from the blocks, and a
failing kernel moves the keys to the chunk-minor layout once); on CUDA, query-reduce-max scores and the
chunk-max document top-k are Triton kernels (``fused_triton``) and the whole route of a layer replays as a
CUDA graph with ONE device→host copy (``cuda_graph``; max-reduced queries padded to a power-of-two row
count by repeating the last row, so few graphs serve all query lengths). The reference path's document
reduce is ``torch.segment_reduce`` over sorted runs on CPU, a gather + ``amax`` or ``scatter_reduce_`` on
devices, and its top-k :func:`topk_blocked` on CUDA (``routing.scoring``).

What it does not do: fetch content K̄V̄ (``memory_tier``), or decide which layers route (the
caller walks the model). Invariant: every chunk → document map indexes the same dense documents
0..N-1 (``doc_ids[n]`` gives the store id) and gives every document at least one chunk. Either one
map (C,) is shared by all layers (a store's aligned chunks), or each layer has its own map (C_l,) over
its own C_l key rows (a layer that also keeps router keys of a shifted chunk grid: both grids' chunks,
so its chunk-reduce max is the max over both); layers with equal maps share one set of reduce tables
(``routing.chunk_map.ChunkMap``). Not thread-safe (the scratch buffer and graph cache are per index).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from msa_memory.errors import ConfigError
from msa_memory.routing import kernels
from msa_memory.routing.chunk_map import ChunkMap, chunk_maps
from msa_memory.routing.config import RoutingConfig
from msa_memory.routing.kernels import Need, RoutingKernel
from msa_memory.routing.result import RouteResult, route_k
from msa_memory.routing.scoring import (ScorePlan, Scratch, centre_offsets, eager_scores, eager_scores_unpacking,
                                        pack_topk, prepare_lhs, resident_dtype, torch_doc_reduce)

if TYPE_CHECKING:
    import torch

__all__ = ["RouteResult", "RouterIndex", "route_k"]

_STAGE_WORDS = {"scores": "score kernel", "doc_reduce": "document reduce kernel", "doc_topk": "document top-k kernel",
                "route": "route kernel"}


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


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
        self._keys_packed: list[torch.Tensor] = []   # keys in the layout of self._packer (e.g. blocked bf16)
        self.broken_kernels: set[str] = set()
        """Names of the kernels that failed in this index (not asked again)."""
        self._chosen: dict[Need, RoutingKernel | None] = {}
        resident = [self._resident_dtype(i, k) for i, k in enumerate(keys)]
        self._packer = self._layout_kernel(keys, resident)
        for k, dt in zip(keys, resident):
            k = k.to(self.device, dt)
            if config.score == "cosine":  # normalize after pooling, per chunk and head (§3.3 training path)
                k = torch.nn.functional.normalize(k.float(), dim=-1).to(k.dtype)
            self._shapes.append(tuple(k.shape))
            if self._packer is not None:          # the kernel's own layout (blocked: 32 chunks a contiguous run)
                self._keys_packed.append(self._packer.pack(k))
            elif self._chunk_minor:   # stored (H, D, C): the score GEMM streams keys as a column-major operand
                self._keys_cm.append(k.permute(1, 2, 0).contiguous())
                self._keys.append(self._keys_cm[-1].permute(2, 0, 1))
            else:
                self._keys.append(k.contiguous())
        self._scratch = Scratch(self.device)              # reused GEMM output of the eager tile loop
        self._graphs: Any = None                          # the route kernel's cache (CUDA graphs), made on first use
        self._offsets: dict[tuple[bool, int], torch.Tensor] = {}   # (suffix?, layer) -> (C_l,) query-centre offsets

    def _resident_dtype(self, i: int, k: torch.Tensor) -> torch.dtype:
        C = self._maps[i].n_chunks
        if k.dim() != 3:
            raise ConfigError(f"Router keys of layer {i} must be (C={C}, H, D); got {tuple(k.shape)}.")
        if k.shape[0] != C:
            raise ConfigError(f"Router keys of layer {i} have {k.shape[0]} rows but its chunk → document map has "
                              f"{C} chunks; the keys must be (C={C}, H, D), got {tuple(k.shape)}.")
        return resident_dtype(k.dtype, self.device, self.config.compute_dtype)

    def _layout_kernel(self, keys: list[torch.Tensor], resident: list[torch.dtype]) -> RoutingKernel | None:
        """The score kernel with a key layout of its own that serves every layer (its layout is kept), else None."""
        if not keys:
            return None
        for kern in kernels.all_kernels():
            if kern.stage != "scores" or not kern.layout:
                continue
            if all(kern.applies(Need("scores", self.device.type, self.config, key_dtype=_dtype_name(dt),
                                     head_dim=int(k.shape[-1]))) for k, dt in zip(keys, resident)):
                return kern
        return None

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
        chunk-minor CPU layout; with a kernel's own layout (e.g. ``layout == "blocked"``) each access returns
        row-major COPIES (for tests and baselines; routing never uses them)."""
        if self._packer is not None:
            return [self._packer.unpack(b, 0, m.n_chunks) for b, m in zip(self._keys_packed, self._maps)]
        return list(self._keys)

    @property
    def layout(self) -> str:
        """How the keys are stored: ``"rows"`` (C, H, D) on devices, ``"chunk_minor"`` (H, D, C) on CPU, or a
        kernel's own layout: ``"blocked"`` (⌈C/32⌉, H, D/2, 32, 2) on CPUs with the AVX512-BF16 kernel."""
        if self._packer is not None:
            return self._packer.layout
        return "chunk_minor" if self._chunk_minor else "rows"

    @property
    def key_dtype(self) -> torch.dtype:
        """Dtype of the resident keys (the score GEMM's)."""
        import torch

        stored = self._keys_packed or self._keys
        return stored[0].dtype if stored else torch.float32

    def nbytes(self) -> int:
        """Bytes of resident router keys (all layers; the blocked layout pads C to a multiple of 32)."""
        return sum(k.numel() * k.element_size() for k in (self._keys_packed or self._keys))

    # ------------------------------------------------------------------ kernels
    def _need(self, stage: str, layer: int = 0, **kw: Any) -> Need:
        return Need(stage, self.device.type, self.config, key_dtype=_dtype_name(self.key_dtype),  # type: ignore[arg-type]
                    layout=self.layout, head_dim=self._shapes[layer][2] if self._shapes else 0, **kw)

    def _select(self, need: Need) -> RoutingKernel | None:
        """The kernel for ``need`` (None: the torch path), remembered per need (routes ask at every step)."""
        try:
            return self._chosen[need]
        except KeyError:
            kern = self._chosen[need] = kernels.select(need, self.broken_kernels)
            return kern

    def _kernel_failed(self, kern: RoutingKernel, e: Exception, then: str = "using the torch path.") -> None:
        warnings.warn(f"Routing {_STAGE_WORDS[kern.stage]} failed ({kern.name}, {type(e).__name__}: {e}); {then}",
                      RuntimeWarning, stacklevel=3)
        self.broken_kernels.add(kern.name)
        self._chosen.clear()

    def _scores_need(self, layer: int, lhs: torch.Tensor, plan: ScorePlan) -> Need:
        return self._need("scores", layer, rows=int(lhs.shape[1]), query_reduce=plan.query_reduce)

    def kernel_for(self, stage: str, layer: int = 0, q: torch.Tensor | None = None, k: int | None = None) -> str | None:
        """Name of the kernel that serves ``stage`` (``"scores"``, ``"doc_reduce"``, ``"doc_topk"``,
        ``"route"``) of a route at router layer ``layer`` (``"scores"`` needs the query ``q``, ``"doc_topk"``
        ``k``); None: the torch reference path. For tests and benchmarks."""
        if stage == "scores":
            if q is None:
                raise ConfigError("kernel_for('scores') needs the query q (T, Hq, D).")
            _, lhs, plan = self._query(layer, q)
            need = self._scores_need(layer, lhs, plan)
        elif stage in ("doc_reduce", "doc_topk"):
            m = self._maps[layer]
            sorted_map = m.runs is not None if stage == "doc_topk" else (m.offsets is not None or m.runs is not None)
            need = self._need(stage, layer, sorted_map=sorted_map, n_docs=self.n_docs,
                              k=int(k or self.config.top_k))
        else:
            need = self._need(stage, layer, k=int(k or self.config.top_k))
        kern = self._select(need)
        return None if kern is None else kern.name

    # ------------------------------------------------------------------ scoring
    def _query(self, layer: int, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, ScorePlan]:
        """(keys, lhs (G, R, Dk), plan) of one query at one layer, input checked. The keys are viewed
        (C, G, Dk) on devices and (G, Dk, C) on CPU (chunk-minor storage); keys in a kernel's layout come as
        stored (blocked: (nb, H, D/2, 32, 2))."""
        import torch

        C, H, D = self._shapes[layer]
        self._check_query(layer, q)
        lhs, plan = prepare_lhs(q.to(self.device, torch.float32), self.config, H, self.key_dtype)
        if self._packer is not None:
            return self._keys_packed[layer], lhs, plan
        if self._chunk_minor:
            kt = self._keys_cm[layer]
            return (kt.view(1, H * D, C) if lhs.shape[0] == 1 else kt), lhs, plan
        keys = self._keys[layer]
        return (keys.view(C, 1, H * D) if lhs.shape[0] == 1 else keys), lhs, plan

    def _check_query(self, layer: int, q: torch.Tensor) -> None:
        _, H, D = self._shapes[layer]
        if q.dim() != 3 or q.shape[-1] != D or q.shape[1] % H:
            raise ConfigError(f"Router query must be (T, Hq, D={D}) with Hq a multiple of H={H}; got {tuple(q.shape)}.")
        if q.shape[0] == 0:
            raise ConfigError("Routing needs at least one query token; got an empty query.")

    def _score_kernel(self, kernel: str, need: Need) -> RoutingKernel | None:
        """The score kernel ``kernel`` asks for (``"auto"``: the applicable one; ``"torch"``: none)."""
        if kernel == "torch":
            return None
        if kernel == "auto":
            return self._select(need)
        kern = kernels.named(kernel)
        if kern is None or kern.stage != "scores":
            names = [k.name for k in kernels.all_kernels() if k.stage == "scores"]
            raise ConfigError(f"Routing kernel={kernel!r} is not one of {['auto', 'torch', *names]}.")
        why = kern.why_not(need)
        if why is not None:
            raise ConfigError(f"Routing kernel={kernel!r} does not apply here: it {why}.")
        return kern

    def chunk_scores(self, layer: int, q: torch.Tensor, kernel: str = "auto") -> torch.Tensor:
        """(C_l,) float32 chunk scores S[c] of one query at router layer ``layer`` (its own chunks).

        ``q`` is (T, Hq, D) router queries of the query tokens (already selected: only routing
        tokens). Hq must be a multiple of the keys' H. ``kernel``: ``"auto"`` (the score kernel of
        ``routing.kernels`` that applies, see the module note), ``"torch"`` (the eager tile loop, the
        reference) or a score kernel's name (``"triton"``, ``"cpu"``), which raises ConfigError where it
        does not apply.
        """
        import torch

        kv, lhs, plan = self._query(layer, q)
        kern = self._score_kernel(kernel, self._scores_need(layer, lhs, plan))
        C = self._maps[layer].n_chunks
        out = torch.empty(C, dtype=torch.float32, device=self.device)
        if kern is not None:
            own = bool(kern.layout) and kern is self._packer
            try:
                kern.score(lhs, kv if own else self._rows(layer, kv, lhs), plan, out)
                return out
            except Exception as e:  # noqa: BLE001  (a build, compile or launch failure: the torch path is exact too)
                if kernel != "auto":
                    raise
                if own:
                    self._kernel_failed(kern, e, "keys move to the chunk-minor layout and routing uses the torch path.")
                    self._to_chunk_minor()
                    kv, lhs, plan = self._query(layer, q)
                else:
                    self._kernel_failed(kern, e)
        if self._packer is not None:          # kernel="torch" on a kernel's layout: row tiles unpacked (slow)
            return eager_scores_unpacking(lhs, kv, self._packer.unpack, plan, out, tile_chunks=self.config.tile_chunks,
                                          block=self._packer.block, scratch=self._scratch)
        scratch = None if _capturing(self.device) else self._scratch    # graphs allocate their own (private pool)
        return eager_scores(lhs, kv, plan, out, chunk_minor=self._chunk_minor, tile_chunks=self.config.tile_chunks,
                            scratch=scratch)

    def _rows(self, layer: int, kv: torch.Tensor, lhs: torch.Tensor) -> torch.Tensor:
        """One layer's keys as (C, G, Dk) rows, what kernels without a layout of their own read (CPU keys are
        chunk-minor or packed: then a copy, which only the Triton interpreter asks for)."""
        C = self._maps[layer].n_chunks
        if self._packer is not None:
            return self._packer.unpack(kv, 0, C).reshape(C, lhs.shape[0], -1)
        if self._chunk_minor:
            return kv.permute(2, 0, 1).contiguous()
        return kv

    def _to_chunk_minor(self) -> None:
        """Move keys held in a kernel's layout to the chunk-minor layout (the torch path's), layer by layer."""
        assert self._packer is not None
        while self._keys_packed:
            packed = self._keys_packed.pop(0)
            C = self._maps[len(self._keys_cm)].n_chunks                      # the layer moved now
            cm = self._packer.unpack(packed, 0, C).permute(1, 2, 0).contiguous()
            del packed
            self._keys_cm.append(cm)
            self._keys.append(cm.permute(2, 0, 1))
        self._packer = None
        self._chunk_minor = True
        self._scratch.clear()

    def _doc_reduce(self, cs: torch.Tensor, m: ChunkMap) -> torch.Tensor:
        """(N,) float32 chunk reduce of one layer's chunk scores ``cs`` (C_l,) over its map ``m``."""
        import torch

        kern = self._select(self._need("doc_reduce", sorted_map=m.offsets is not None or m.runs is not None,
                                       n_docs=self.n_docs))
        if kern is not None:
            out = torch.empty(self.n_docs, dtype=torch.float32, device=cs.device)
            try:
                kern.reduce(cs, m, self.config.chunk_reduce, out)    # type: ignore[attr-defined]
                return out
            except Exception as e:  # noqa: BLE001  (the torch reduce is exact too)
                self._kernel_failed(kern, e)
        return torch_doc_reduce(cs, m, self.config.chunk_reduce, self.n_docs)

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
                off = centre_offsets(keys[layer], mu, self.config.score)
                offsets[(is_suffix, layer)] = off.to(self.device).contiguous()
        self._offsets = offsets

    @staticmethod
    def add(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
        """Sum of two :meth:`doc_scores` results (``a`` None: ``b``); sharded indexes sum shard by shard."""
        return b if a is None else a + b

    def gather_scores(self, ds: torch.Tensor) -> np.ndarray:
        """(N,) float32 host copy of :meth:`doc_scores` results, in dense document order."""
        return ds.float().cpu().numpy()

    # ------------------------------------------------------------------ top-k
    def route_device(self, layer: int, q: torch.Tensor, k: int, kernel: str = "auto") -> torch.Tensor:
        """(2, k) float64 on the device: row 0 the top-k document scores, row 1 their dense indices.

        No host synchronisation inside: this is what the CUDA graph captures (float64 holds both the
        fp32 scores and indices < 2⁵³ exactly, so ONE copy brings both back).
        """
        m = self._maps[layer]
        kern = self._select(self._need("doc_topk", layer, sorted_map=m.runs is not None, n_docs=self.n_docs, k=k))
        if kern is None:
            return pack_topk(self.doc_scores(layer, q, kernel), k)
        cs = self.chunk_scores(layer, q, kernel)
        off = self._offsets.get((False, int(layer)))
        if off is not None:
            cs = cs - off
        try:
            return kern.topk(cs, m, k)          # type: ignore[attr-defined]
        except Exception as e:  # noqa: BLE001  (a compile or launch failure: the torch path is exact too)
            self._kernel_failed(kern, e)
            return pack_topk(self._doc_reduce(cs, m), k)

    def _check_route(self, layer: int, k: int | None) -> int:
        return route_k(self.n_docs, self.n_layers, self.config.top_k, layer, k)

    def _result(self, layer: int, packed: torch.Tensor) -> RouteResult:
        idx_np = packed[1].numpy().astype(np.int64)
        return RouteResult(doc_index=idx_np, doc_ids=self.doc_ids[idx_np], scores=packed[0].numpy().astype(np.float32),
                           layer=layer)

    def route_scores(self, layer: int, ds: torch.Tensor, k: int | None = None) -> RouteResult:
        """Top-k documents of given (N,) document scores ``ds`` (e.g. a router layer's with its suffix query's
        added), reported as router layer ``layer``'s route."""
        import torch

        k = self._check_route(layer, k)
        if tuple(ds.shape) != (self.n_docs,):
            raise ConfigError(f"Document scores of shape {tuple(ds.shape)} for {self.n_docs} documents.")
        with torch.no_grad():
            return self._result(layer, pack_topk(ds.float(), k).cpu())

    def route(self, layer: int, q: torch.Tensor, k: int | None = None, path: str = "auto") -> RouteResult:
        """Top-k documents of router layer ``layer`` for router queries ``q`` (T, Hq, D).

        ``path``: ``"auto"`` (the route kernel where one applies, e.g. the CUDA graph on CUDA when
        ``config.cuda_graphs``, else eager), ``"eager"`` (op by op: the reference) or ``"graph"`` (the route
        kernel, CUDA only).
        """
        import torch

        k = self._check_route(layer, k)
        self._check_query(layer, q)
        if path not in ("auto", "eager", "graph"):
            raise ConfigError(f"Routing path={path!r} is not one of 'auto', 'eager', 'graph'.")
        if self._offsets:   # query centres: the chunk offsets come off before the document reduce
            with torch.no_grad():
                return self.route_scores(layer, self.doc_scores(layer, q), k)
        kern = None
        if path == "auto":
            kern = self._select(self._need("route", layer, k=k))
        elif path == "graph":           # forced: the route kernel of this device, whatever the config's switch
            kern = next((r for r in kernels.all_kernels() if r.stage == "route"
                         and self.device.type in r.device_types()), None)
            if kern is None:
                raise ConfigError("Routing path='graph' needs the router keys on a CUDA device.")
        if kern is not None:
            if self._graphs is None:
                self._graphs = kern.make(self)     # type: ignore[attr-defined]
            return self._result(layer, self._graphs.route(layer, q, k))
        with torch.no_grad():
            return self._result(layer, self.route_device(layer, q, k).cpu())


def _capturing(device: Any) -> bool:
    import torch

    return torch.device(device).type == "cuda" and torch.cuda.is_current_stream_capturing()
