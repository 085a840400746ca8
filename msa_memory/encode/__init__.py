"""encode: model loading, passage wrapping/packing, the encoding forward, pooling. The router projections
themselves (``RouterAdapter``, ``RouterConfig``) are in :mod:`msa_memory.routing`; re-exported here.

Writes no store files (see docs/design.md, section "encode"). Public API::

    from msa_memory.encode import load_model, split_passages, Encoder
    from msa_memory.encode import Backbone, AttnCall, causal_attention, PackedCausalAttention, sdpa
    from msa_memory.encode import RouterAdapter, RouterConfig
"""

from __future__ import annotations

from msa_memory.encode.encoder import Encoder, PooledBatch, TemplatePrefix
from msa_memory.encode.attention import PackedCausalAttention, causal_attention, sdpa, windowed_causal
from msa_memory.encode.forward import ATTN_IMPLEMENTATION, AttentionFn, AttnCall, Backbone
from msa_memory.encode.model import LoadedModel, default_dtype, load_model, router_from_model_qk
from msa_memory.encode.passages import DEFAULT_MAX_TOKENS, split_passages
from msa_memory.encode.pooling import chunk_layout, chunk_mean_pool, pool_naive
from msa_memory.routing.adapter import RouterAdapter, UntrainedRouterWarning  # re-exported: made for a model here
from msa_memory.routing.config import RouterConfig

__all__ = [
    "ATTN_IMPLEMENTATION", "AttentionFn", "AttnCall", "Backbone", "PackedCausalAttention",
    "causal_attention", "sdpa", "windowed_causal", "LoadedModel", "default_dtype", "load_model", "router_from_model_qk",
    "RouterAdapter", "RouterConfig", "UntrainedRouterWarning", "Encoder", "PooledBatch",
    "TemplatePrefix", "DEFAULT_MAX_TOKENS", "split_passages", "chunk_layout", "chunk_mean_pool",
    "pool_naive",
]
