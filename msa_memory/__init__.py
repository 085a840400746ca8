"""msa-memory: the memory half of MSA (Memory Sparse Attention) as software.

Public API (imported lazily so that ``import msa_memory`` stays cheap and torch-free):
``open_store``, ``create_store``, ``encode_corpus``, ``encode_token_ids``, ``Memory``, ``load_model``.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "open_store": "msa_memory.store",
    "create_store": "msa_memory.store",
    "MemoryStore": "msa_memory.store",
    "encode_corpus": "msa_memory.jobs",
    "encode_token_ids": "msa_memory.jobs",
    "load_model": "msa_memory.encode",
    "Memory": "msa_memory.runtime",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'msa_memory' has no attribute {name!r}")
