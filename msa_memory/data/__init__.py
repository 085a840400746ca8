"""Files shipped with the package: the router adapters trained for Gemma 3 270M (the default model).

Three adapters ship, each reachable by name wherever an adapter folder is taken (``RouterAdapter.load``,
``load_model(adapter=...)``, ``msa-encode --adapter aligned``; see :func:`msa_memory.routing.files.shipped_adapter`):

* ``default`` (``gemma3-270m-router/``, router id ``0bd2cbf054be9ce9``): router layers 1, 5, 8, 11, 13, 16,
  17; router keys over MSA's aligned 64-token chunks and, at every layer, over 32-token windows at a stride
  of 16 tokens (``RouterConfig.shifted_window``); a *suffix query* at layer 13 (``RouterConfig.suffix_layers``:
  the question is also read at the end of "\nThis passage is about"). ``router_adapter.json`` +
  ``router_adapter.safetensors`` (a :class:`msa_memory.routing.adapter.RouterAdapter`), and ``RECIPE.md``: the commands,
  data and held-out figures of every shipped adapter.
* ``aligned`` (``gemma3-270m-router-aligned/``, router id ``a33595931c4c316b``): the default's weights over
  MSA's aligned chunks alone, without the suffix query. A fifth of the default's resident router keys
  (56 B a token against 280 B) and about a fifth of its routing time on a CPU, for lower needle recall on
  large stores.
  A store of the default is copied to it without encoding (``msa store reindex-router STORE --dest NEW
  --adapter aligned``).
* ``shallow`` (``gemma3-270m-router-shallow/``, router id ``4b77c12b13a94f8c``): the default's layers 1 and 5
  alone, aligned grid. Encoding stops after block 5 instead of 17, about 3 times faster on a CPU, for
  clearly worse routing.

``aligned`` and ``shallow`` are *subset folders* (``router_subset.json``: which layers and grid of the default's
folder, and the router id that ``RouterAdapter.load`` checks), so the weights ship once.

``load_model("default")`` uses the default when no adapter is given. A store built with any shipped adapter
keeps it: ``model="default"`` without an adapter reads and updates it with the adapter whose router id the
store names (:mod:`msa_memory.routing.registry`).

This module only says where the folders are; it imports nothing of the package.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["DEFAULT_ROUTER_ADAPTER", "ALIGNED_ROUTER_ADAPTER", "SHALLOW_ROUTER_ADAPTER", "SHIPPED_ADAPTERS"]

_HERE = Path(__file__).resolve().parent
#: The default router adapter of the default model (Gemma 3 270M, GGUF q4_k_m): layers 1, 5, 8, 11, 13, 16, 17,
#: keys over both grids at every layer, a suffix query at layer 13; the weights and RECIPE.md.
DEFAULT_ROUTER_ADAPTER = _HERE / "gemma3-270m-router"
#: The default's weights over MSA's aligned chunks alone, without the suffix query: a fifth of the router keys.
ALIGNED_ROUTER_ADAPTER = _HERE / "gemma3-270m-router-aligned"
#: The default's layers 1 and 5 alone: encoding stops after block 5 (about 3x faster on a CPU), routing is worse.
SHALLOW_ROUTER_ADAPTER = _HERE / "gemma3-270m-router-shallow"
#: Names an adapter argument may take instead of a folder (a folder of that name, if one exists, wins).
SHIPPED_ADAPTERS = {"default": DEFAULT_ROUTER_ADAPTER, "aligned": ALIGNED_ROUTER_ADAPTER,
                    "shallow": SHALLOW_ROUTER_ADAPTER}

