"""Routing: which documents a question reads (msa-reference §3.3-3.4), in one place.

- ``config``: the score / reduce choices (defined once) and :class:`RoutingConfig`
- ``scoring``: the eager score path of one router layer (query operand, score tiles, top-k helpers)
- ``adapter``, ``files``, ``registry``: the router projections, their file format, which adapter routes a store
- ``query``: a question's routing tokens; ``reference``: the slow, differentiable reference scorer
- ``index``: :class:`RouterIndex`, the resident router keys of a store and their top-k route
- ``kernels/``: the fast paths (AVX512-BF16 CPU extension, fused Triton, CUDA graphs); each says
  when it applies and is tested against the eager path
"""

from msa_memory.routing.config import ChunkReduce, HeadReduce, QueryReduce, RoutingConfig, ScoreMode
from msa_memory.routing.index import RouterIndex, RouteResult
from msa_memory.routing.scoring import (cpu_has_native_bf16, doc_gather_index, pad_query_rows, prepare_lhs,
                                        resident_dtype, score_tile, score_tile_cm, topk_blocked, torch_dtype_of)

__all__ = ["ChunkReduce", "HeadReduce", "QueryReduce", "ScoreMode", "RoutingConfig", "RouterIndex", "RouteResult",
           "cpu_has_native_bf16", "doc_gather_index", "pad_query_rows", "prepare_lhs", "resident_dtype", "score_tile",
           "score_tile_cm", "topk_blocked", "torch_dtype_of"]
