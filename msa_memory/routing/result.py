"""What a route returns: :class:`RouteResult` (top-k documents of one router layer), and how many
documents a route returns (:func:`route_k`), shared by every index (``routing.index``, ``routing.parallel``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from msa_memory.errors import ConfigError, RuntimeMemoryError

__all__ = ["RouteResult", "route_k"]


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
