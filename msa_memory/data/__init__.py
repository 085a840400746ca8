"""Files shipped with the package: the router adapters trained for Gemma 3 270M.

``gemma3-270m-router/`` (the default; layers 2, 14, 17) holds ``router_adapter.json`` +
``router_adapter.safetensors`` (a ``msa_memory.encode.RouterAdapter``), ``training.json`` (the run's
per-epoch held-out recall, layer selection trace and data counts) and ``RECIPE.md`` (the exact
command and data that reproduce it). ``load_model("default")`` uses it when no adapter is given.

``gemma3-270m-router-shallow/`` is the previous default (layers 1, 5; its recipe is in the default's
RECIPE.md → History): it routes worse, but an encoder that stops after layer 5 instead of 17 encodes
~3× faster on a CPU. Both are reachable by name wherever an adapter folder is taken
(``RouterAdapter.load``, ``load_model(adapter=...)``, ``msa-encode --adapter shallow``): see
:func:`shipped_adapter`.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

__all__ = ["DEFAULT_ROUTER_ADAPTER", "SHALLOW_ROUTER_ADAPTER", "SHIPPED_ADAPTERS", "default_router_adapter",
           "shipped_adapter", "shipped_adapter_for_router"]

#: Folder of the trained router adapter of the default model (Gemma 3 270M, GGUF q4_k_m).
DEFAULT_ROUTER_ADAPTER = Path(__file__).resolve().parent / "gemma3-270m-router"
#: The previous default (router layers 1, 5): faster to encode, worse to route.
SHALLOW_ROUTER_ADAPTER = Path(__file__).resolve().parent / "gemma3-270m-router-shallow"
#: Names an adapter argument may take instead of a folder (a folder of that name, if one exists, wins).
SHIPPED_ADAPTERS = {"default": DEFAULT_ROUTER_ADAPTER, "shallow": SHALLOW_ROUTER_ADAPTER}


def shipped_adapter(name: str) -> Path | None:
    """The folder of the shipped adapter called ``name`` ("default" or "shallow"), else None."""
    d = SHIPPED_ADAPTERS.get(str(name))
    return d if d is not None and (d / "router_adapter.json").is_file() else None


def default_router_adapter() -> Path | None:
    """The default model's trained adapter folder, or None when the package ships none."""
    d = DEFAULT_ROUTER_ADAPTER
    return d if (d / "router_adapter.json").is_file() and (d / "router_adapter.safetensors").is_file() else None


@lru_cache(maxsize=None)
def _shipped_router_ids() -> dict[str, Path]:
    from msa_memory.encode.router import RouterAdapter

    return {RouterAdapter.load(d).fingerprint(): d for d in
            (shipped_adapter(n) for n in SHIPPED_ADAPTERS) if d is not None}


def shipped_adapter_for_router(router_id: str) -> Path | None:
    """The shipped adapter whose fingerprint is ``router_id`` (a store's ``identity.router_id``), else None.

    What ``model="default"`` without an adapter falls back to for an existing store: a store encoded
    with the shipped adapter of an earlier release (or with ``--adapter shallow``) keeps being read
    and updated with that adapter, not refused because the default adapter has changed since.
    """
    return _shipped_router_ids().get(str(router_id))
