"""The router adapter's file format, and the adapters shipped with the package by name.

A saved adapter is a folder with ``router_adapter.json`` (its :class:`~msa_memory.routing.config.RouterConfig`)
and ``router_adapter.safetensors`` (fp32 weights, tensors named as in the reference,
``model.layers.{l}.self_attn.router_{q,k}_proj.0.weight``); a *subset folder* has ``router_subset.json``
instead, naming layers of other adapter folders (see :mod:`msa_memory.routing.adapter`). The shipped
folders are in :mod:`msa_memory.data`; no torch here.
"""

from __future__ import annotations

from pathlib import Path

from msa_memory.data import DEFAULT_ROUTER_ADAPTER, SHIPPED_ADAPTERS

__all__ = ["ADAPTER_JSON", "ADAPTER_WEIGHTS", "ADAPTER_SUBSET", "is_adapter_folder", "is_subset_folder",
           "shipped_adapter", "default_router_adapter"]

ADAPTER_JSON = "router_adapter.json"
ADAPTER_WEIGHTS = "router_adapter.safetensors"
ADAPTER_SUBSET = "router_subset.json"


def is_adapter_folder(d: str | Path) -> bool:
    """True when ``d`` holds a saved adapter (json + safetensors) or a subset file."""
    d = Path(d)
    return ((d / ADAPTER_JSON).is_file() and (d / ADAPTER_WEIGHTS).is_file()) or (d / ADAPTER_SUBSET).is_file()


def is_subset_folder(d: str | Path) -> bool:
    """True when ``d`` is a subset folder: a subset file and no adapter of its own (which would win)."""
    d = Path(d)
    return (d / ADAPTER_SUBSET).is_file() and not (d / ADAPTER_JSON).is_file()


def shipped_adapter(name: str) -> Path | None:
    """The folder of the shipped adapter called ``name`` (a key of :data:`msa_memory.data.SHIPPED_ADAPTERS`), else None."""
    d = SHIPPED_ADAPTERS.get(str(name))
    return d if d is not None and is_adapter_folder(d) else None


def default_router_adapter() -> Path | None:
    """The default model's trained adapter folder, or None when the package ships none."""
    return DEFAULT_ROUTER_ADAPTER if is_adapter_folder(DEFAULT_ROUTER_ADAPTER) else None
