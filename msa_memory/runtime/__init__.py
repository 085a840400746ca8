"""The MSA runtime: route a question to top-k documents of a store and generate from them.

``Memory(store, model=...)`` is the entry point (``memory.py``); the parts underneath can be used
alone: ``RouterIndex`` (resident router keys, §3.3 scoring), ``ContentMemory`` (tiered K̄V̄ with an
LRU cache), ``MsaEngine`` (HF model with MSA memory attention). torch is imported lazily.
"""

from __future__ import annotations

from msa_memory.runtime.memory import Memory, Mode
from msa_memory.runtime.memory_tier import ContentMemory
from msa_memory.runtime.engine import MsaEngine
from msa_memory.runtime.results import Answer, DocHit, Round
from msa_memory.routing.config import RoutingConfig
from msa_memory.routing.index import RouterIndex, RouteResult

__all__ = ["Memory", "Mode", "ContentMemory", "MsaEngine", "Answer", "DocHit", "Round", "RouterIndex",
           "RouteResult", "RoutingConfig"]
