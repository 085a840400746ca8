"""Memory Parallel: router keys sharded by document over several devices, or over processes.

MSA serves a memory larger than one accelerator holds by sharding the router keys K̄ᴿ (msa-reference.md
§4): each shard scores its own documents, keeps its local top-k, and one merge picks the global top-k. Two
forms share the shard layout and the merge:

- :class:`ShardedRouterIndex`: one process, one :class:`~msa_memory.routing.index.RouterIndex` per device
  (``Memory(store, devices=["cuda:0", "cuda:1"])``, ``msa ask --devices cuda:0,cuda:1``);
- :class:`DistributedRouterIndex`: one shard per ``torch.distributed`` rank (NCCL on GPUs, gloo on CPU),
  every rank running the same question in lockstep (``Memory(store, distributed=True)`` in each process of a
  ``torchrun`` job); the merge is one ``all_gather`` of every rank's (2, k) local top-k.

Shards are contiguous ranges of the store's dense document order, balanced by chunk count
(:func:`shard_bounds`); a document never spans two shards, so a document's chunk reduce (max or mean over
its chunks) is computed whole on one shard and the merged scores equal one device's up to fp32 rounding (each
shard's score GEMM has its own shape, and a BLAS may block the reduction differently per shape).

Synchronisations a prefill makes: MSA attends the routed documents' K̄V̄ at each router layer, so the next
router layer's query depends on this layer's route and the merges cannot be batched across layers in an
answer's prefill: one merge per router layer (18 for MSA-4B, 6 for the default model), each ONE collective
(the reference's protocol spends about 9 per layer: query and length gathers, two all-to-alls for the
winners and fetch requests, three for the K̄V̄ exchange). Content K̄V̄ is read by every rank from the
store or its host tier, so no K̄V̄ crosses ranks. ``search`` / ``route`` sum the document scores of all
router layers without attaching memory: each shard sums locally and there is ONE gather per question.
:attr:`collectives` counts the merges and gathers made, for the benchmark and the tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from msa_memory.errors import ConfigError
from msa_memory.routing.config import RoutingConfig
from msa_memory.routing.index import RouteResult, RouterIndex, route_k


def shard_bounds(doc_chunks: np.ndarray, n_shards: int) -> np.ndarray:
    """(n_shards + 1,) dense-document boundaries: shard s holds documents ``[b[s], b[s+1])``.

    Contiguous ranges cut where the running chunk count crosses each ``s/n`` of the total, so shards hold
    about equal key bytes; every shard gets at least one document (ConfigError when there are fewer
    documents than shards).
    """
    doc_chunks = np.asarray(doc_chunks, dtype=np.int64)
    n_docs = int(doc_chunks.shape[0])
    if n_shards < 1:
        raise ConfigError(f"Router keys need at least one shard; got {n_shards}.")
    if n_docs < n_shards:
        raise ConfigError(f"The store has {n_docs} document(s), fewer than the {n_shards} router-key shards asked "
                          "for; every shard must hold at least one document.",
                          hint="Use fewer devices (or processes) for a store this small.")
    cum = np.cumsum(doc_chunks)
    total = int(cum[-1]) if n_docs else 0
    cuts = np.searchsorted(cum, [total * s / n_shards for s in range(1, n_shards)], side="left") + 1
    b = np.concatenate([[0], cuts, [n_docs]]).astype(np.int64)
    for s in range(1, n_shards):              # at least one document per shard, order kept
        b[s] = min(max(b[s], b[s - 1] + 1), n_docs - (n_shards - s))
    return b


def slice_shard(keys: Sequence[torch.Tensor], chunk_doc: Any, doc_ids: np.ndarray, lo: int, hi: int,
                config: RoutingConfig, device: Any) -> RouterIndex:
    """The :class:`RouterIndex` of documents ``[lo, hi)``: each layer's key rows of those documents, in
    stored order, with their map shifted to local indices 0..hi-lo-1."""
    per_layer = isinstance(chunk_doc, (list, tuple))
    maps = list(chunk_doc) if per_layer else [chunk_doc] * len(keys)
    sk, sm, cache = [], [], {}
    for k, m in zip(keys, maps):
        if id(m) not in cache:
            cache[id(m)] = shard_rows(m, lo, hi)
        rows, local = cache[id(m)]
        sk.append(k.index_select(0, torch.from_numpy(rows)))
        sm.append(local)
    return RouterIndex(sk, sm if per_layer else sm[0], doc_ids[lo:hi], config, device=device)


def shard_rows(chunk_doc: Any, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, local map): the key rows of documents ``[lo, hi)`` in stored order, and their documents
    counted from ``lo``."""
    m = np.asarray(chunk_doc, dtype=np.int64)
    rows = np.flatnonzero((m >= lo) & (m < hi))
    return rows, m[rows] - lo


def merge_topk(scores: np.ndarray, index: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best of candidate (score, global index) pairs: score descending, then index ascending
    (padding rows carry index -1 and score -inf and are never chosen while real ones remain)."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    index = np.asarray(index, dtype=np.int64).reshape(-1)
    real = index >= 0
    scores, index = scores[real], index[real]
    order = np.lexsort((index, -scores))[:k]
    return scores[order].astype(np.float32), index[order]


class _ShardedBase:
    """What both sharded forms share: the global document order and the route bookkeeping."""

    doc_ids: np.ndarray
    n_docs: int
    config: RoutingConfig
    bounds: np.ndarray
    collectives: int

    def _result(self, layer: int, scores: np.ndarray, index: np.ndarray) -> RouteResult:
        return RouteResult(doc_index=index, doc_ids=self.doc_ids[index], scores=scores, layer=layer)

    def _k(self, layer: int, k: int | None) -> int:
        return route_k(self.n_docs, self.n_layers, self.config.top_k, layer, k)

    @property
    def n_layers(self) -> int:  # pragma: no cover - overridden
        raise NotImplementedError


class ShardedRouterIndex(_ShardedBase):
    """Router keys of one process sharded by document over ``devices``; the same routes as one
    :class:`RouterIndex` over all keys (same documents, same scores).

    Parameters are those of :class:`RouterIndex`, with ``devices`` (one shard per entry; a device may be
    named twice, e.g. to test on one CPU) in place of ``device``.
    """

    def __init__(self, keys: Sequence[torch.Tensor], chunk_doc: Any, doc_ids: Any, config: RoutingConfig,
                 devices: Sequence[Any]) -> None:
        if not devices:
            raise ConfigError("devices= names no device; give at least one (e.g. ['cuda:0', 'cuda:1']).")
        self.config = config
        self.doc_ids = np.asarray(doc_ids, dtype=np.int64)
        self.n_docs = int(self.doc_ids.shape[0])
        map0 = np.asarray(chunk_doc[0] if isinstance(chunk_doc, (list, tuple)) else chunk_doc, dtype=np.int64)
        self.bounds = shard_bounds(np.bincount(map0, minlength=self.n_docs), len(devices))
        self.shards = [slice_shard(keys, chunk_doc, self.doc_ids, int(lo), int(hi), config, dev)
                       for lo, hi, dev in zip(self.bounds[:-1], self.bounds[1:], devices)]
        self.device = self.shards[0].device
        self.collectives = 0

    @property
    def n_layers(self) -> int:
        return self.shards[0].n_layers

    @property
    def n_chunks(self) -> int:
        return sum(s.n_chunks for s in self.shards)

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.shards)

    def shard_nbytes(self) -> list[int]:
        """Resident router-key bytes of each shard, in device order."""
        return [s.nbytes() for s in self.shards]

    # -- scores: one tensor per shard, on the shard's device
    def doc_scores(self, layer: int, q: torch.Tensor, *, suffix: bool = False) -> list[torch.Tensor]:
        return [s.doc_scores(layer, q.to(s.device, non_blocking=True), suffix=suffix) for s in self.shards]

    @property
    def centred(self) -> bool:
        return self.shards[0].centred

    def set_query_centres(self, centres: Any, suffix: Any = None) -> None:
        """:meth:`RouterIndex.set_query_centres` on every shard (each keeps its own chunks' offsets)."""
        for s in self.shards:
            s.set_query_centres(centres, suffix)

    @staticmethod
    def add(a: list[torch.Tensor] | None, b: list[torch.Tensor]) -> list[torch.Tensor]:
        return list(b) if a is None else [x + y for x, y in zip(a, b)]

    def gather_scores(self, ds: list[torch.Tensor]) -> np.ndarray:
        """(N,) float32 host scores in the global document order: one gather."""
        self.collectives += 1
        return np.concatenate([d.float().cpu().numpy() for d in ds])

    def _merge(self, layer: int, packed: list[torch.Tensor], k: int) -> RouteResult:
        self.collectives += 1
        host = [p.cpu() for p in packed]             # each (2, k_s) float64: scores, local indices
        scores = np.concatenate([h[0].numpy() for h in host])
        index = np.concatenate([h[1].numpy().astype(np.int64) + int(lo) for h, lo in zip(host, self.bounds[:-1])])
        s, i = merge_topk(scores, index, k)
        return self._result(layer, s, i)

    def route_scores(self, layer: int, ds: list[torch.Tensor], k: int | None = None) -> RouteResult:
        k = self._k(layer, k)
        packed = []
        for s, d in zip(self.shards, ds):
            ks = min(k, s.n_docs)
            vals, idx = torch.topk(d.float(), ks)
            packed.append(torch.stack([vals.double(), idx.double()]))
        return self._merge(layer, packed, k)

    def route(self, layer: int, q: torch.Tensor, k: int | None = None) -> RouteResult:
        k = self._k(layer, k)
        packed = [s.route_device(layer, q.to(s.device, non_blocking=True), min(k, s.n_docs)) for s in self.shards]
        return self._merge(layer, packed, k)


class DistributedRouterIndex(_ShardedBase):
    """This rank's shard of the router keys in a ``torch.distributed`` job; routes are merged over the group.

    Every rank must call :meth:`route` / :meth:`route_scores` / :meth:`gather_scores` in the same order
    (the ranks run the same question in lockstep); each call is one ``all_gather``, and every rank gets
    the same merged result.

    Parameters
    ----------
    local : RouterIndex
        This rank's documents ``[bounds[rank], bounds[rank + 1])``, indexed locally from 0
        (:func:`slice_shard`; :meth:`build` cuts it from all keys).
    doc_ids : (N,) int64, every rank's documents in the global dense order
    bounds : (world + 1,) int64, :func:`shard_bounds` of the same documents on every rank
    group : process group, default the world
    """

    def __init__(self, local: RouterIndex, doc_ids: Any, bounds: Any, group: Any = None) -> None:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise ConfigError("distributed routing needs torch.distributed initialised in every process.",
                              hint="Start the processes with torchrun (or call torch.distributed.init_process_group) "
                                   "before opening Memory(..., distributed=True).")
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.doc_ids = np.asarray(doc_ids, dtype=np.int64)
        self.n_docs = int(self.doc_ids.shape[0])
        self.bounds = np.asarray(bounds, dtype=np.int64)
        if self.bounds.shape != (self.world + 1,) or self.bounds[-1] != self.n_docs:
            raise ConfigError(f"Shard bounds {self.bounds.tolist()} do not cut {self.n_docs} documents into "
                              f"{self.world} ranks' shards.")
        self.offset = int(self.bounds[self.rank])
        if local.n_docs != int(self.bounds[self.rank + 1]) - self.offset:
            raise ConfigError(f"Rank {self.rank}'s shard holds {local.n_docs} documents; its bounds say "
                              f"{int(self.bounds[self.rank + 1]) - self.offset}.")
        self.local, self.config, self.device = local, local.config, local.device
        self.collectives = 0
        self._max_shard = int(np.diff(self.bounds).max())

    @classmethod
    def build(cls, keys: Sequence[torch.Tensor], chunk_doc: Any, doc_ids: Any, config: RoutingConfig,
              device: Any, group: Any = None) -> DistributedRouterIndex:
        """This rank's shard cut from every document's keys (as :class:`RouterIndex` takes them)."""
        import torch.distributed as dist

        world = dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1
        rank = dist.get_rank(group) if world > 1 or (dist.is_available() and dist.is_initialized()) else 0
        doc_ids = np.asarray(doc_ids, dtype=np.int64)
        map0 = np.asarray(chunk_doc[0] if isinstance(chunk_doc, (list, tuple)) else chunk_doc, dtype=np.int64)
        bounds = shard_bounds(np.bincount(map0, minlength=len(doc_ids)), world)
        local = slice_shard(keys, chunk_doc, doc_ids, int(bounds[rank]), int(bounds[rank + 1]), config, device)
        return cls(local, doc_ids, bounds, group)

    @property
    def n_layers(self) -> int:
        return self.local.n_layers

    @property
    def n_chunks(self) -> int:
        return self.local.n_chunks

    def nbytes(self) -> int:
        """This rank's resident router-key bytes."""
        return self.local.nbytes()

    def doc_scores(self, layer: int, q: torch.Tensor, *, suffix: bool = False) -> torch.Tensor:
        return self.local.doc_scores(layer, q.to(self.device), suffix=suffix)

    @property
    def centred(self) -> bool:
        return self.local.centred

    def set_query_centres(self, centres: Any, suffix: Any = None) -> None:
        """:meth:`RouterIndex.set_query_centres` on this rank's shard."""
        self.local.set_query_centres(centres, suffix)

    @staticmethod
    def add(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
        return b if a is None else a + b

    def _all_gather(self, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        self.collectives += 1
        return torch.stack(parts)

    def gather_scores(self, ds: torch.Tensor) -> np.ndarray:
        """(N,) float32 scores of every rank's documents, in the global order, on every rank: one gather."""
        pad = torch.full((self._max_shard,), float("-inf"), dtype=torch.float32, device=self.device)
        pad[:ds.shape[0]] = ds.float()
        allv = self._all_gather(pad).cpu().numpy()
        return np.concatenate([allv[r, :int(n)] for r, n in enumerate(np.diff(self.bounds))])

    def _merge(self, layer: int, packed: torch.Tensor, k: int) -> RouteResult:
        ks = packed.shape[1]
        buf = torch.full((2, k), -1.0, dtype=torch.float64, device=self.device)
        buf[0].fill_(float("-inf"))
        buf[:, :ks] = packed
        buf[1, :ks] += self.offset                        # global dense indices
        allp = self._all_gather(buf).cpu().numpy()        # (W, 2, k)
        s, i = merge_topk(allp[:, 0], allp[:, 1].astype(np.int64), k)
        return self._result(layer, s, i)

    def route_scores(self, layer: int, ds: torch.Tensor, k: int | None = None) -> RouteResult:
        k = self._k(layer, k)
        vals, idx = torch.topk(ds.float(), min(k, self.local.n_docs))
        return self._merge(layer, torch.stack([vals.double(), idx.double()]), k)

    def route(self, layer: int, q: torch.Tensor, k: int | None = None) -> RouteResult:
        k = self._k(layer, k)
        return self._merge(layer, self.local.route_device(layer, q.to(self.device), min(k, self.local.n_docs)), k)
