"""Files shipped with the package: the router adapters trained for Gemma 3 270M.

The default (since the nineteenth session) is ``gemma3-270m-router-suffix/`` (``suffix``): the token-max router
below plus a *suffix query* at layer 13 (``RouterConfig.suffix_layers``; described further down). It is a subset
folder: its weights are those of ``gemma3-270m-router/`` and ``gemma3-270m-router-suffix13/``.

``gemma3-270m-router/`` (``tokenmax``, the default until then; layers 1, 5, 8, 11, 13, 16, 17, router keys
also over a finer shifted grid at every layer: 32-token windows at a stride of 16 tokens,
``RouterConfig.shifted_window``) holds ``router_adapter.json`` + ``router_adapter.safetensors`` (a
``msa_memory.encode.RouterAdapter``) and ``RECIPE.md`` (the exact commands and data that reproduce every
shipped adapter).
Its weights are the merge (``RouterAdapter.merge``) of three trained adapters, each also shipped as a
*subset folder* of it (``router_subset.json``: which layers, their router id, the training run's
provenance; beside it that run's ``training.json``):

* ``gemma3-270m-router-deepv/`` (layers 13, 16, 17): trained on the H200 over 69k passages with
  varied fact names, among the candidates 2, 13, 14, 16, 17;
* ``gemma3-270m-router-shallow/`` (layers 1, 5): trained on this CPU over 25k passages; an encoder
  that stops after layer 5 instead of 17 encodes ~3× faster on a CPU;
* ``gemma3-270m-router-mid/`` (layers 8, 11): the same 69k passages, trained on the H200 among
  candidates 5, 8, 11, 14, 17 (a trial run whose greedy selection kept layer 14 alone).

Two more subset folders hold the token-max weights over other router-key grids, so the stores they built
keep their router:

* ``gemma3-270m-router-shifted/`` (``--adapter shifted``, router id ``4677d0b5d88ecb88``): the shifted
  64-token grid (windows from token 32) at layers 1, 5, 8, 11 only; the default of the thirteenth and
  fourteenth sessions;
* ``gemma3-270m-router-aligned/`` (``--adapter aligned``, router id ``a33595931c4c316b``): MSA's aligned
  chunk grid alone; the default of the tenth to twelfth sessions.

``--adapter fine`` (the token-max grid, opt-in in the fourteenth session) is another name of ``tokenmax``.

``gemma3-270m-router-deep/`` (layers 2, 14, 17) keeps its own weights: trained on the H200 over the
same 69k passages, it was part of the two defaults before, and its layers 2 and 14 (and its own
training of layer 17) are in no other shipped adapter. Those defaults are subset folders of several
folders (``"parts"``), so the stores they built keep their router:

* ``gemma3-270m-router-merge7/`` (layers 1, 2, 5, 8, 11, 14, 17: shallow + deep + mid), the default
  of the fifth to ninth sessions;
* ``gemma3-270m-router-merge5/`` (layers 1, 2, 5, 14, 17: shallow + deep), the one before that.

``gemma3-270m-router-suffix/`` (``--adapter suffix``, the default) is the token-max router plus a *suffix
query* at layer 13 (``RouterConfig.suffix_layers``): every question is also read at the end of the suffix
"\nThis passage is about", by a query projection of its own scored against layer 13's own keys. Its
weights: the token-max router's, and ``gemma3-270m-router-suffix13/`` (``--adapter suffix13``: layer 13 with
the token-max keys and a query trained for the suffix's end, ``msa train-router ... --freeze-keys``; its
``training.json`` beside it). Its keys are the token-max router's, so a store of ``tokenmax`` serves it after
a key copy (``msa store reindex-router STORE --dest NEW --adapter default``). ``RECIPE.md``'s section
"The suffix query" has the commands and figures.

``load_model("default")`` uses the default when no adapter is given; all of them are reachable by
name wherever an adapter folder is taken (``RouterAdapter.load``, ``load_model(adapter=...)``,
``msa-encode --adapter shallow``): see :func:`shipped_adapter`. A store built with any of them keeps
it (:func:`shipped_adapter_for_router`).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

__all__ = ["DEFAULT_ROUTER_ADAPTER", "TOKENMAX_ROUTER_ADAPTER", "SHIFTED_ROUTER_ADAPTER", "ALIGNED_ROUTER_ADAPTER", "FINE_ROUTER_ADAPTER",
           "DEEP_ROUTER_ADAPTER", "DEEPV_ROUTER_ADAPTER", "SHALLOW_ROUTER_ADAPTER", "MID_ROUTER_ADAPTER", "MERGE5_ROUTER_ADAPTER", "MERGE7_ROUTER_ADAPTER",
           "SUFFIX_ROUTER_ADAPTER", "SUFFIX13_ROUTER_ADAPTER", "SHIPPED_ADAPTERS",
           "default_router_adapter", "shipped_adapter", "shipped_adapter_for_router"]

_HERE = Path(__file__).resolve().parent
#: The token-max router (the default until the nineteenth session; ``tokenmax``, also ``fine``): layers 1, 5, 8,
#: 11, 13, 16, 17, keys over the aligned chunks and 32-token windows at every layer; the weights and RECIPE.md.
TOKENMAX_ROUTER_ADAPTER = _HERE / "gemma3-270m-router"
#: The default's weights and layers with router keys also over the shifted 64-token grid at 1, 5, 8, 11 (the
#: previous default).
SHIFTED_ROUTER_ADAPTER = _HERE / "gemma3-270m-router-shifted"
#: The default's weights and layers with router keys over MSA's aligned chunks alone (the default before that).
ALIGNED_ROUTER_ADAPTER = _HERE / "gemma3-270m-router-aligned"
#: The name ``fine`` (32-token windows at a stride of 16 at every layer, opt-in in the fourteenth session) is
#: the token-max router's.
FINE_ROUTER_ADAPTER = TOKENMAX_ROUTER_ADAPTER
#: Router layers 13, 16, 17 of the default (its deep part, trained with varied fact names).
DEEPV_ROUTER_ADAPTER = _HERE / "gemma3-270m-router-deepv"
#: Router layers 1, 5 of the default (its shallow part): faster to encode, worse to route.
SHALLOW_ROUTER_ADAPTER = _HERE / "gemma3-270m-router-shallow"
#: Router layers 8, 11 of the default (its middle part).
MID_ROUTER_ADAPTER = _HERE / "gemma3-270m-router-mid"
#: Router layers 2, 14, 17 (the deep part of the two defaults before; weights of its own).
DEEP_ROUTER_ADAPTER = _HERE / "gemma3-270m-router-deep"
#: Router layers 1, 2, 5, 8, 11, 14, 17 (shallow + deep + mid: the default of the fifth to ninth sessions).
MERGE7_ROUTER_ADAPTER = _HERE / "gemma3-270m-router-merge7"
#: Router layers 1, 2, 5, 14, 17 (shallow + deep: the default before that).
MERGE5_ROUTER_ADAPTER = _HERE / "gemma3-270m-router-merge5"
#: The default's router plus a suffix query at layer 13 (``RouterConfig.suffix_layers``, question suffix
#: "\nThis passage is about"): the same router keys, so a store of the default serves it after a key copy.
SUFFIX_ROUTER_ADAPTER = _HERE / "gemma3-270m-router-suffix"
#: That suffix query's own adapter: layer 13 with the default's keys, its query trained for the suffix's end.
SUFFIX13_ROUTER_ADAPTER = _HERE / "gemma3-270m-router-suffix13"
#: The default router adapter of the default model (Gemma 3 270M, GGUF q4_k_m): ``suffix`` since the nineteenth
#: session (2026-12-05).
DEFAULT_ROUTER_ADAPTER = SUFFIX_ROUTER_ADAPTER
#: Names an adapter argument may take instead of a folder (a folder of that name, if one exists, wins).
SHIPPED_ADAPTERS = {"default": DEFAULT_ROUTER_ADAPTER, "tokenmax": TOKENMAX_ROUTER_ADAPTER, "fine": FINE_ROUTER_ADAPTER,
                    "shifted": SHIFTED_ROUTER_ADAPTER,
                    "aligned": ALIGNED_ROUTER_ADAPTER,
                    "deepv": DEEPV_ROUTER_ADAPTER, "shallow": SHALLOW_ROUTER_ADAPTER,
                    "mid": MID_ROUTER_ADAPTER, "deep": DEEP_ROUTER_ADAPTER, "merge7": MERGE7_ROUTER_ADAPTER,
                    "merge5": MERGE5_ROUTER_ADAPTER, "suffix": SUFFIX_ROUTER_ADAPTER, "suffix13": SUFFIX13_ROUTER_ADAPTER}


def shipped_adapter(name: str) -> Path | None:
    """The folder of the shipped adapter called ``name`` (a key of :data:`SHIPPED_ADAPTERS`), else None."""
    from msa_memory.encode.router import is_adapter_folder

    d = SHIPPED_ADAPTERS.get(str(name))
    return d if d is not None and is_adapter_folder(d) else None


def default_router_adapter() -> Path | None:
    """The default model's trained adapter folder, or None when the package ships none."""
    from msa_memory.encode.router import is_adapter_folder

    return DEFAULT_ROUTER_ADAPTER if is_adapter_folder(DEFAULT_ROUTER_ADAPTER) else None


@lru_cache(maxsize=None)
def _shipped_router_ids() -> dict[str, Path]:
    import json

    from msa_memory.encode.router import ADAPTER_SUBSET, RouterAdapter, is_subset_folder

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
    """The shipped adapter whose fingerprint is ``router_id`` (a store's ``identity.router_id``), else None.

    What ``model="default"`` without an adapter falls back to for an existing store: a store encoded
    with the shipped adapter of an earlier release (or with ``--adapter shallow``) keeps being read
    and updated with that adapter, not refused because the default adapter has changed since.
    """
    return _shipped_router_ids().get(str(router_id))
