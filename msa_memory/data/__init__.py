"""Files shipped with the package: the default router adapter for Gemma 3 270M.

``gemma3-270m-router/`` holds ``router_adapter.json`` + ``router_adapter.safetensors`` (a
``msa_memory.encode.RouterAdapter``), ``training.json`` (the run's per-epoch held-out recall, layer
selection trace and data counts) and ``RECIPE.md`` (the exact command and data that reproduce it).
``load_model("default")`` uses it when no adapter is given.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["DEFAULT_ROUTER_ADAPTER", "default_router_adapter"]

#: Folder of the trained router adapter of the default model (Gemma 3 270M, GGUF q4_k_m).
DEFAULT_ROUTER_ADAPTER = Path(__file__).resolve().parent / "gemma3-270m-router"


def default_router_adapter() -> Path | None:
    """The default model's trained adapter folder, or None when the package ships none."""
    d = DEFAULT_ROUTER_ADAPTER
    return d if (d / "router_adapter.json").is_file() and (d / "router_adapter.safetensors").is_file() else None
