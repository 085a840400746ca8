"""Which adapter routes a store: the one place that answers it.

A store records the router id (the adapter's fingerprint) of every version. A store built with an adapter
shipped for the default model keeps that adapter: ``model="default"`` without an adapter reads, updates
and re-keys it with the shipped adapter whose router id the store names, not with whatever the default
is now (:func:`adapter_for_store`). ``Memory``, the encode jobs and ``train.reindex`` ask here.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from msa_memory.data import SHIPPED_ADAPTERS
from msa_memory.routing.files import ADAPTER_SUBSET, is_subset_folder, shipped_adapter

__all__ = ["shipped_adapter_for_router", "adapter_for_store", "shipped_router"]


@lru_cache(maxsize=None)
def _shipped_router_ids() -> dict[str, Path]:
    from msa_memory.routing.adapter import RouterAdapter

    out = {}
    for d in (shipped_adapter(n) for n in SHIPPED_ADAPTERS):
        if d is None:
            continue
        if is_subset_folder(d):
            # a subset folder names its router id; RouterAdapter.load checks it when the folder is used,
            # so the merged weights it is cut from are not read once more per subset here
            out[str(json.loads((d / ADAPTER_SUBSET).read_text())["router_id"])] = d
        else:
            out[RouterAdapter.load(d).fingerprint()] = d
    return out


def shipped_adapter_for_router(router_id: str) -> Path | None:
    """The shipped adapter whose fingerprint is ``router_id`` (a store's ``identity.router_id``), else None."""
    return _shipped_router_ids().get(str(router_id))


def adapter_for_store(router_id: str | None, model: Any, adapter: Any = None) -> Any:
    """The adapter to load ``model`` with for a store routed by ``router_id`` (None: no store yet).

    ``adapter`` when one is given; for the default model (``model == "default"``) without one, the shipped
    adapter (its folder, as a string) that routes the store; else None (the model's own default).
    """
    if adapter is not None or str(model) != "default" or router_id is None:
        return adapter
    found = shipped_adapter_for_router(router_id)
    return None if found is None else str(found)


def shipped_router(router_id: str) -> Any:
    """The shipped :class:`~msa_memory.routing.adapter.RouterAdapter` whose router id is ``router_id``, else None."""
    from msa_memory.routing.adapter import RouterAdapter

    found = shipped_adapter_for_router(router_id)
    return None if found is None else RouterAdapter.load(found)
