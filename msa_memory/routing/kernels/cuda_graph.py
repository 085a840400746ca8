"""CUDA-graph routing: one layer's whole route replayed as one graph, one device→host copy back.

Design note. On a GPU the eager route of one layer is a dozen small kernels (query prep, one GEMM
and one reduce per tile, chunk→document reduce, top-k) plus two blocking copies; at 10k–100k
chunks their launch and sync overhead (~0.35 ms measured on an H100) is 20–200× the memory floor.
:class:`GraphRouteCache` captures ``RouterIndex.route_device`` — the SAME tensor maths as the eager
path (``prepare_lhs`` → ``score_tile`` tile loop or the fused Triton kernel → chunk→doc reduce →
top-k) and the copy of its (2, k) float64 result into a pinned host buffer — once per (layer, padded T,
Hq, k, query dtype; re-captured when the routing config changes) into a ``torch.cuda.CUDAGraph`` with a
static query buffer, then per call: copy the query in, replay, synchronise. Query-reduce-max queries are padded to a power-of-two
row count by repeating the last row (``pad_query_rows``; the max is unchanged, up to
GEMM rounding), so a handful of graphs serve
every question length. At most ``max_graphs`` graphs are kept (least recently used dropped); each holds
its own memory pool (chunk scores C·4 bytes + the GEMM scratch of one tile).

What it does not do: capture ``doc_scores`` (the collect-only path of ``Memory.route`` stays eager), or
run anywhere but CUDA. Invariant: the index's key tensors are never reallocated after a capture (the
graph reads their addresses).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from msa_memory.routing.kernels import base
from msa_memory.routing.scoring import pad_query_rows

if TYPE_CHECKING:
    import torch

__all__ = ["KERNELS", "CudaGraphRoute", "GraphRouteCache"]


class _Entry:
    __slots__ = ("config", "graph", "host", "out", "q_in")

    def __init__(self, graph: Any, q_in: Any, out: Any, host: Any, config: Any) -> None:
        self.graph, self.q_in, self.out, self.host, self.config = graph, q_in, out, host, config


class GraphRouteCache:
    """Captured routes of one :class:`~msa_memory.routing.index.RouterIndex` (``index``) on CUDA, keyed by (layer, padded T, Hq, k, dtype, config)."""

    def __init__(self, index: Any, max_graphs: int = 16, warmup: int = 2) -> None:
        self.index = index
        self.max_graphs = int(max_graphs)
        self.warmup = int(warmup)
        self._graphs: OrderedDict[tuple, _Entry] = OrderedDict()
        self.captures = 0

    def __len__(self) -> int:
        return len(self._graphs)

    def _capture(self, layer: int, q: torch.Tensor, k: int) -> _Entry:
        import torch

        dev = self.index.device
        with torch.inference_mode(False):      # static buffers are normal tensors: the engine routes in
            q_in = torch.empty(q.shape, dtype=torch.float32, device=dev)     # inference mode, users may not
            host = torch.empty((2, k), dtype=torch.float64, pin_memory=True)
        q_in.copy_(q)
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.no_grad(), torch.cuda.stream(side):      # warm up: cuBLAS handles, Triton compile
            for _ in range(self.warmup):
                self.index.route_device(layer, q_in, k)
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph):
            out = self.index.route_device(layer, q_in, k)
            host.copy_(out, non_blocking=True)           # the device→host copy is a node of the graph too
        self.captures += 1
        return _Entry(graph, q_in, out, host, self.index.config)

    def route(self, layer: int, q: torch.Tensor, k: int) -> torch.Tensor:
        """(2, k) float64 on the host: top-k document scores and dense indices, as ``route_device``.

        The returned (pinned) tensor is the graph's own output buffer: read it before the next route of
        the same shape (``RouterIndex.route`` copies it into numpy at once).
        """
        import torch

        cfg = self.index.config
        q = pad_query_rows(q, cfg)
        key = (layer, q.shape, k, q.dtype)
        entry = self._graphs.get(key)
        if entry is not None and entry.config is not cfg and entry.config != cfg:   # reducers / kernels changed
            del self._graphs[key]
            entry = None
        if entry is None:
            entry = self._capture(layer, q, k)
            self._graphs[key] = entry
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        else:
            self._graphs.move_to_end(key)
            entry.q_in.copy_(q, non_blocking=True)
        entry.graph.replay()
        torch.cuda.current_stream(self.index.device).synchronize()
        return entry.host


class CudaGraphRoute(base.RoutingKernel):
    """Whole routes of one index replayed as CUDA graphs: ``make(index)`` gives its :class:`GraphRouteCache`."""

    name = "cuda_graph"
    stage = "route"
    devices = ("cuda",)
    switch = "cuda_graphs"

    def make(self, index: Any) -> GraphRouteCache:
        return GraphRouteCache(index)


KERNELS = (CudaGraphRoute(),)
"""The kernels of this module (found by :func:`msa_memory.routing.kernels.all_kernels`)."""
