"""Routing: which documents a question reads (msa-reference §3.3-3.4), in one place.

- ``config``: the score / reduce choices and their defaults, defined once (:class:`ScoreChoices`), and the two
  configurations derived from them: :class:`RouterConfig` (an adapter's, saved) and :class:`RoutingConfig`
  (a runtime's)
- ``scoring``: the eager (torch) score path of one router layer, the reference of every kernel (query
  operand, score tiles and their loop, document reduce, top-k, centring offsets)
- ``adapter``, ``files``, ``registry``: the router projections, their file format, which adapter routes a store
- ``query``: a question's routing tokens; ``reference``: the slow, differentiable reference scorer
- ``index``: :class:`RouterIndex`, the resident router keys of a store and their top-k route
  (``result``: :class:`RouteResult`); ``resident``, ``parallel``: a store's keys loaded, sharded
- ``kernels/``: the fast paths (AVX512-BF16 CPU extension, fused Triton, CUDA graphs) behind one
  interface (``kernels.base``): each states when it applies, the index picks through
  ``kernels.select``, and ``tests/unit/routing/test_kernels.py`` checks each against ``reference``
"""

from msa_memory.routing.config import (ChunkReduce, HeadReduce, QueryReduce, RouterConfig, RoutingConfig, ScoreChoices,
                                       ScoreMode)
from msa_memory.routing.index import RouterIndex, RouteResult
from msa_memory.routing.scoring import (cpu_has_native_bf16, doc_gather_index, pad_query_rows, prepare_lhs,
                                        resident_dtype, score_tile, score_tile_cm, topk_blocked, torch_dtype_of)

__all__ = ["ChunkReduce", "HeadReduce", "QueryReduce", "ScoreMode", "ScoreChoices", "RouterConfig", "RoutingConfig",
           "RouterIndex", "RouteResult",
           "cpu_has_native_bf16", "doc_gather_index", "pad_query_rows", "prepare_lhs", "resident_dtype", "score_tile",
           "score_tile_cm", "topk_blocked", "torch_dtype_of"]
