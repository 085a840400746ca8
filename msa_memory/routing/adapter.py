"""Router projections (MSA's router_q_proj / router_k_proj): the adapter that makes router keys and queries.

A :class:`RouterAdapter` holds, for each router layer l, two bias-free linear maps from the
layer's ``input_layernorm`` output x (hidden size E): ``q_proj[l]: E -> Hq*D`` and
``k_proj[l]: E -> Hkv*D``. Their outputs get no norm and no RoPE (msa-reference.md §1.3). It also
carries the routing configuration (:class:`~msa_memory.routing.config.RouterConfig`: layers, pooling size, head layout,
score mode, reducers, top-k) so a store and a runtime agree on how keys were made and must be scored.

Sources: an MSA checkpoint's own weights, a saved adapter directory (``router_adapter.json`` +
``router_adapter.safetensors``, tensors named as in the reference,
``model.layers.{l}.self_attn.router_{q,k}_proj.0.weight``), or -- weak, with a warning -- a copy of
the model's own q_proj/k_proj at those layers (``msa_memory.encode.model.router_from_model_qk``). Adapters trained apart can be joined layer by layer
(:meth:`RouterAdapter.merge`: routing sums the layers' scores, so a merged adapter routes by the sum
of its parts); a *subset folder* (``router_subset.json``: ``{"of": FOLDER, "router_layers": [...],
"router_id": ..., "extra": {...}}``) names some layers of another adapter folder, or, with
``"parts": [{"of": FOLDER, "router_layers": [...]}, ...]`` in place of ``"of"``, the merge of layers
of several folders (``router_layers`` is then all of theirs); its optional ``"shifted_layers"`` (default
none, whatever the folders it names have) are the layers with keys over the shifted grid too, and its
optional ``"shifted_window"`` that grid's window (default none: P-token windows from P/2), and its
optional ``"suffix": {"of": FOLDER, "router_layers": [...]}`` suffix queries taken from that adapter folder
(:meth:`RouterAdapter.with_suffix_queries`); ``"suffix_queries": false`` drops the suffix queries the folder
it names has (:meth:`RouterAdapter.without_suffix_queries`).
:meth:`RouterAdapter.load` rebuilds it and checks its fingerprint, so a shipped merged adapter and the
adapters it was made of share one copy of the weights.

An adapter may carry a *query suffix* (``RouterConfig.query_suffix``, not in MSA): text appended to every
question before it is routed, read at its last token, by the router query itself (``query_reduce = "last"``) or
by *suffix queries* (``RouterConfig.suffix_layers``: a second query projection at some layers, scored against
the layer's own keys and summed into its score, while the layer's own query reads the question's tokens).

Score modes: ``"cosine"`` (paper, InfoNCE training; keys are stored L2-normalised per head after
pooling, queries must be normalised too) or ``"dot"`` (reference inference as shipped: raw dot
product divided by sqrt(D), nothing normalised). Weights are kept in fp32 (they are small next to
the backbone, and trainable by router training); :meth:`RouterAdapter.keys_from_pooled` computes
K̄ᵣ = k_proj(mean x) -- equal to mean(k_proj(x)) because the map is linear -- so router keys can
be recomputed from stored pooled inputs (``x_router``) without re-running the model.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from msa_memory.errors import ConfigError, ModelLoadError
from msa_memory.routing.config import RouterConfig
from msa_memory.data import SHIPPED_ADAPTERS
from msa_memory.routing.files import (ADAPTER_JSON, ADAPTER_SUBSET, ADAPTER_WEIGHTS, is_subset_folder,
                                      shipped_adapter)

__all__ = ["RouterAdapter", "UntrainedRouterWarning"]


class UntrainedRouterWarning(UserWarning):
    """Router projections were copied from the model's own q/k projections: routing will be weak."""


def _q_key(layer: int) -> str:
    return f"model.layers.{layer}.self_attn.router_q_proj.0.weight"


def _k_key(layer: int) -> str:
    return f"model.layers.{layer}.self_attn.router_k_proj.0.weight"


def _sq_key(layer: int) -> str:
    return f"model.layers.{layer}.self_attn.router_suffix_q_proj.0.weight"


class RouterAdapter(nn.Module):
    """Router projections for the layers of a :class:`RouterConfig` (fp32 ``nn.Linear``, no bias).

    Examples
    --------
    >>> cfg = RouterConfig((2, 3), n_q_heads=4, n_kv_heads=2, head_dim=16, hidden_size=64)
    >>> r = RouterAdapter(cfg)
    >>> r.router_k(3, torch.zeros(5, 64)).shape
    torch.Size([5, 2, 16])
    """

    def __init__(self, config: RouterConfig):
        super().__init__()
        self.config = config
        c = config
        self.q_proj = nn.ModuleDict({str(l): nn.Linear(c.hidden_size, c.n_q_heads * c.head_dim, bias=False)
                                     for l in c.router_layers})
        self.k_proj = nn.ModuleDict({str(l): nn.Linear(c.hidden_size, c.n_kv_heads * c.head_dim, bias=False)
                                     for l in c.router_layers})
        self.sq_proj = nn.ModuleDict({str(l): nn.Linear(c.hidden_size, c.n_q_heads * c.head_dim, bias=False)
                                      for l in c.suffix_layers})
        self.float()

    # -- maths -------------------------------------------------------------------------------
    def _check_layer(self, layer: int) -> str:
        if int(layer) not in self.config.router_layers:
            raise ConfigError(f"Layer {layer!r} is not a router layer; router layers are {self.config.router_layers}.")
        return str(int(layer))

    def router_q(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """(…, E) router-layer inputs -> (…, Hq, D) router queries (fp32, not normalised)."""
        w = self.q_proj[self._check_layer(layer)].weight
        return (x.to(w.dtype) @ w.T).unflatten(-1, (self.config.n_q_heads, self.config.head_dim))

    def router_sq(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """(…, E) router-layer inputs at the suffix's last token -> (…, Hq, D) suffix queries (``suffix_layers``)."""
        key = self._check_layer(layer)
        if key not in self.sq_proj:
            raise ConfigError(f"Layer {layer!r} has no suffix query; suffix layers are {self.config.suffix_layers}.")
        w = self.sq_proj[key].weight
        return (x.to(w.dtype) @ w.T).unflatten(-1, (self.config.n_q_heads, self.config.head_dim))

    def router_k(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """(…, E) router-layer inputs -> (…, Hkv, D) router keys (fp32, not normalised)."""
        w = self.k_proj[self._check_layer(layer)].weight
        return (x.to(w.dtype) @ w.T).unflatten(-1, (self.config.n_kv_heads, self.config.head_dim))

    def keys_from_pooled(self, layer: int, x_pooled: torch.Tensor) -> torch.Tensor:
        """(C, E) chunk-mean router inputs -> (C, Hkv, D) stored router keys K̄ᵣ (fp32).

        Normalised per head iff ``config.score == "cosine"`` (reference: only for INFONCE).
        """
        # fp64 GEMM: the stored keys must not depend on how the BLAS blocks the reduction (thread
        # count, batch shape, worker layout), so that any job layout commits bit-identical keys.
        w = self.k_proj[self._check_layer(layer)].weight
        k = (x_pooled.to(torch.float64) @ w.to(torch.float64).T).unflatten(
            -1, (self.config.n_kv_heads, self.config.head_dim))
        if self.config.score == "cosine":
            k = torch.nn.functional.normalize(k, dim=-1)
        return k.to(torch.float32)

    # -- identity / io -----------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Weights under the reference state-dict names (contiguous fp32 CPU tensors)."""
        out = {}
        for l in self.config.router_layers:
            out[_q_key(l)] = self.q_proj[str(l)].weight.detach().float().cpu().contiguous()
            out[_k_key(l)] = self.k_proj[str(l)].weight.detach().float().cpu().contiguous()
        for l in self.config.suffix_layers:
            out[_sq_key(l)] = self.sq_proj[str(l)].weight.detach().float().cpu().contiguous()
        return out

    def fingerprint(self) -> str:
        """sha256 (hex, 16 chars) of the config (minus provenance) and the weights' bytes."""
        h = hashlib.sha256()
        cfg = self.config.to_dict()
        cfg.pop("extra", None)
        cfg.pop("source", None)
        h.update(json.dumps(cfg, sort_keys=True).encode())
        for k, t in sorted(self.state_tensors().items()):
            h.update(k.encode())
            h.update(t.numpy().tobytes())
        return h.hexdigest()[:16]

    def subset(self, layers) -> RouterAdapter:
        """A new adapter with only ``layers`` (same config and provenance, copied weights, same device)."""
        import dataclasses

        layers = tuple(sorted(int(l) for l in layers))
        missing = [l for l in layers if l not in self.config.router_layers]
        if missing or not layers:
            raise ConfigError(f"Layers {missing or list(layers)} are not a subset of the adapter's router layers "
                              f"{list(self.config.router_layers)}.")
        shifted = tuple(l for l in self.config.shifted_layers if l in layers)
        sfx = tuple(l for l in self.config.suffix_layers if l in layers)
        new = RouterAdapter(dataclasses.replace(self.config, router_layers=layers, shifted_layers=shifted,
                                                suffix_layers=sfx,
                                                query_suffix=self.config.query_suffix
                                                if sfx or self.config.query_reduce == "last" else "",
                                                shifted_window=self.config.shifted_window if shifted else None,
                                                extra=dict(self.config.extra)))
        new.load_tensors(self.state_tensors(), where="adapter subset")
        return new.to(self.q_proj[str(layers[0])].weight.device)

    def with_shifted_layers(self, layers, window: int | None | str = "keep") -> RouterAdapter:
        """The same projections with keys also over the shifted grid at ``layers`` (router layers; empty:
        the aligned grid alone), its windows ``window`` tokens long (``RouterConfig.shifted_window``; None:
        the chunks' P from P/2; default: this adapter's). A new adapter, so a new router id: stores keep the
        grid they were built with."""
        import dataclasses

        layers = tuple(sorted(int(l) for l in layers))
        w = self.config.shifted_window if window == "keep" else window
        new = RouterAdapter(dataclasses.replace(self.config, shifted_layers=layers, shifted_window=w if layers else None,
                                                extra=dict(self.config.extra)))
        new.load_tensors(self.state_tensors(), where="adapter with shifted layers")
        return new.to(self.q_proj[str(self.config.router_layers[0])].weight.device)

    @classmethod
    def merge(cls, adapters, extra: dict[str, Any] | None = None) -> RouterAdapter:
        """One adapter holding the layers of all ``adapters`` (their layers must not overlap).

        Their configs must agree on everything but the layers and the provenance (heads, sizes,
        score mode, reducers, top-k). Routing sums the per-layer scores (``Memory.route``), so the
        merged adapter ranks by the sum of its parts' scores. ``extra`` becomes the provenance
        (default: ``{"trained_by": "RouterAdapter.merge", "merged_from": [each part's fingerprint, layers
        and extra], "model_fingerprint": the parts' own when they agree}``).
        """
        import dataclasses

        parts = list(adapters)
        if len(parts) < 2:
            raise ConfigError(f"merge needs at least two adapters, got {len(parts)}.")
        def shared(a: RouterAdapter) -> dict[str, Any]:   # what merged parts must agree on
            return {k: v for k, v in a.config.to_dict().items()
                    if k not in ("router_layers", "shifted_layers", "shifted_window", "suffix_layers", "extra",
                                 "source")}

        base = shared(parts[0])
        seen: dict[int, int] = {}
        for i, a in enumerate(parts):
            cfg = shared(a)
            if cfg != base:
                diff = sorted(k for k in base if cfg.get(k) != base[k])
                raise ConfigError(f"Adapter {i} differs from adapter 0 in {diff}; only adapters that agree on "
                                  "everything but their layers can be merged.")
            for l in a.config.router_layers:
                if l in seen:
                    raise ConfigError(f"Layer {l} is in adapters {seen[l]} and {i}; merged adapters must not overlap.")
                seen[l] = i
        prov = extra
        if prov is None:
            prov = {"trained_by": "RouterAdapter.merge", "merged_from": [
                {"router_id": a.fingerprint(), "router_layers": list(a.config.router_layers), "extra": a.config.extra}
                for a in parts]}
            fps = {a.config.extra.get("model_fingerprint") for a in parts}
            if len(fps) == 1 and None not in fps:   # reindex checks an adapter's backbone by it
                prov["model_fingerprint"] = fps.pop()
        shifted = tuple(sorted(l for a in parts for l in a.config.shifted_layers))
        windows = {a.config.shifted_window for a in parts if a.config.shifted_layers}
        if len(windows) > 1:
            raise ConfigError(f"The adapters' shifted grids have different windows {sorted(windows, key=str)}; merged "
                              "adapters must share one (RouterAdapter.with_shifted_layers(..., window=...)).")
        sfx = tuple(sorted(l for a in parts for l in a.config.suffix_layers))
        merged = cls(dataclasses.replace(parts[0].config, router_layers=tuple(sorted(seen)), shifted_layers=shifted,
                                         suffix_layers=sfx,
                                         shifted_window=windows.pop() if windows else None, extra=prov,
                                         source="adapter"))
        tensors: dict[str, torch.Tensor] = {}
        for a in parts:
            tensors.update(a.state_tensors())
        merged.load_tensors(tensors, where="merged adapters")
        return merged

    def with_suffix_queries(self, source: RouterAdapter, layers=None, extra: dict[str, Any] | None = None
                            ) -> RouterAdapter:
        """This adapter plus suffix queries (``RouterConfig.suffix_layers``) at ``layers`` (default: all of
        ``source``'s), taken from ``source``: an adapter trained with ``query_reduce = "last"`` and a query
        suffix, started from this one with its keys frozen (``msa train-router --init-adapter THIS --layers L
        --query-reduce last --query-suffix S --freeze-keys``), so that its query at the suffix's end is scored
        against these very keys. A new adapter (a new router id); its keys equal this one's, so stores built
        with this adapter serve it after ``msa store reindex-router`` (a copy of the keys)."""
        import dataclasses

        sc = source.config
        layers = tuple(sorted(int(l) for l in (sc.router_layers if layers is None else layers)))
        if sc.query_reduce != "last" or not sc.query_suffix or sc.suffix_layers:
            raise ConfigError(f"Suffix queries come from an adapter trained for them: query_reduce 'last' and a query "
                              f"suffix, without suffix queries of its own; this one has query_reduce "
                              f"{sc.query_reduce!r}, query suffix {sc.query_suffix!r}, suffix layers "
                              f"{list(sc.suffix_layers)}.",
                              hint="Train it with msa train-router --query-reduce last --query-suffix TEXT "
                                   "--init-adapter THIS --freeze-keys.")
        same = ("n_q_heads", "n_kv_heads", "head_dim", "hidden_size", "chunk_tokens", "score", "head_reduce",
                "chunk_reduce")
        diff = [k for k in same if getattr(sc, k) != getattr(self.config, k)]
        if diff:
            raise ConfigError(f"The suffix queries' adapter differs from this one in {diff}; a suffix query is scored "
                              "like this adapter's own queries.")
        if self.config.suffix_layers and self.config.query_suffix != sc.query_suffix:
            raise ConfigError(f"This adapter's suffix queries read {self.config.query_suffix!r}; the new ones read "
                              f"{sc.query_suffix!r}. One adapter has one suffix.")
        for l in layers:
            if l not in sc.router_layers or l not in self.config.router_layers:
                raise ConfigError(f"Layer {l} is not a router layer of both adapters ({list(self.config.router_layers)} "
                                  f"and the suffix queries' {list(sc.router_layers)}).")
            if not torch.equal(source.k_proj[str(l)].weight.detach().cpu(), self.k_proj[str(l)].weight.detach().cpu()):
                raise ConfigError(f"The suffix queries' adapter has other router keys at layer {l} than this one: its "
                                  "queries were trained against keys this adapter's stores do not hold.",
                                  hint="Train it from this adapter with its keys frozen: msa train-router "
                                       "--init-adapter THIS --freeze-keys ...")
        sfx = tuple(sorted(set(self.config.suffix_layers) | set(layers)))
        prov = extra if extra is not None else {
            **self.config.extra, "suffix_queries_from": {"router_id": source.fingerprint(), "router_layers": list(layers),
                                                         "extra": sc.extra}}
        new = RouterAdapter(dataclasses.replace(self.config, suffix_layers=sfx, query_suffix=sc.query_suffix,
                                                extra=dict(prov)))
        tensors = self.state_tensors()
        tensors.update({_sq_key(l): source.q_proj[str(l)].weight.detach().float().cpu() for l in layers})
        new.load_tensors(tensors, where="adapter with suffix queries")
        return new

    def without_suffix_queries(self) -> RouterAdapter:
        """The same router without its suffix queries (``suffix_layers``): the router that makes its keys (the
        query suffix goes too, unless its own queries read it, ``query_reduce = "last"``)."""
        import dataclasses

        if not self.config.suffix_layers:
            return self
        keep = self.config.query_suffix if self.config.query_reduce == "last" else ""
        new = RouterAdapter(dataclasses.replace(self.config, suffix_layers=(), query_suffix=keep,
                                                extra=dict(self.config.extra)))
        new.load_tensors(self.state_tensors(), where="adapter without suffix queries")
        return new

    def save(self, directory: str | Path) -> Path:
        """Write ``router_adapter.json`` + ``router_adapter.safetensors`` into ``directory``."""
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_file(self.state_tensors(), str(d / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (d / ADAPTER_JSON).write_text(json.dumps(self.config.to_dict(), indent=2, sort_keys=True))
        return d

    @classmethod
    def load(cls, directory: str | Path) -> RouterAdapter:
        """Read an adapter written by :meth:`save`, from a folder or a shipped adapter's name.

        ``directory`` may name a shipped adapter of the default model (``"default"``, ``"aligned"``,
        ``"shallow"``: :data:`msa_memory.data.SHIPPED_ADAPTERS`, :func:`~msa_memory.routing.files.shipped_adapter`) when no folder of that name exists.

        Raises
        ------
        ModelLoadError
            The directory lacks either file, or a tensor is missing or has the wrong shape.
        """
        from safetensors.torch import load_file

        d = Path(directory)
        if not d.exists():
            d = shipped_adapter(str(directory)) or d
        if is_subset_folder(d):
            return cls._load_subset(d)
        if not (d / ADAPTER_JSON).is_file() or not (d / ADAPTER_WEIGHTS).is_file():
            raise ModelLoadError(
                f"No router adapter at {str(d)!r}: expected {ADAPTER_JSON} and {ADAPTER_WEIGHTS} (or {ADAPTER_SUBSET}) "
                "there.",
                hint="Save one with RouterAdapter.save(dir) (router training does), pass adapter=None, or name a "
                     f"shipped adapter of the default model: {', '.join(sorted(SHIPPED_ADAPTERS))}.")
        try:
            cfg = RouterConfig.from_dict(json.loads((d / ADAPTER_JSON).read_text()))
        except (ValueError, TypeError) as e:
            raise ModelLoadError(f"Router adapter config {str(d / ADAPTER_JSON)!r} is invalid: {e}") from e
        adapter = cls(cfg)
        adapter.load_tensors(load_file(str(d / ADAPTER_WEIGHTS)), where=str(d / ADAPTER_WEIGHTS))
        return adapter

    @classmethod
    def _load_subset(cls, d: Path) -> RouterAdapter:
        f = d / ADAPTER_SUBSET
        try:
            spec = json.loads(f.read_text())
            layers, rid = [int(l) for l in spec["router_layers"]], str(spec["router_id"])
            parts = ([(d / spec["of"], layers)] if "parts" not in spec else
                     [(d / p["of"], [int(l) for l in p["router_layers"]]) for p in spec["parts"]])
            extra = dict(spec.get("extra", {}))
            shifted = [int(l) for l in spec.get("shifted_layers", [])]
            window = spec.get("shifted_window")
            window = None if window is None else int(window)
            sfx = spec.get("suffix")
            sfx = None if sfx is None else (d / sfx["of"], [int(l) for l in sfx["router_layers"]])
            keep_sfx = spec.get("suffix_queries", True)
            if not isinstance(keep_sfx, bool):
                raise TypeError(f"'suffix_queries' must be true or false, got {keep_sfx!r}")
        except (ValueError, TypeError, KeyError) as e:
            raise ModelLoadError(f"Router subset file {str(f)!r} is invalid ({e!r}): it needs 'of' (or 'parts': "
                                 "[{'of', 'router_layers'}, ...]), 'router_layers' and 'router_id'.") from e
        if not layers or sorted(l for _, ls in parts for l in ls) != sorted(layers):
            raise ModelLoadError(f"{str(f)!r}: its parts' layers {[ls for _, ls in parts]} are not its router_layers "
                                 f"{layers}.")
        pieces = []
        for of, ls in parts:
            if is_subset_folder(of):
                raise ModelLoadError(f"{str(f)!r} names {str(of)!r}, itself a subset; name the full adapter folder.")
            try:
                pieces.append(cls.load(of).subset(ls))
            except (ConfigError, ValueError, TypeError) as e:
                raise ModelLoadError(f"{str(f)!r}: {e}") from e
        try:
            adapter = pieces[0] if len(pieces) == 1 else cls.merge(pieces)
            if not keep_sfx and adapter.config.suffix_layers:
                adapter = adapter.without_suffix_queries()                 # the folder's router without them
            if list(adapter.config.shifted_layers) != shifted or adapter.config.shifted_window != window:
                adapter = adapter.with_shifted_layers(shifted, window)   # the subset file says which layers shift
            if sfx is not None:                                            # suffix queries from another folder
                if is_subset_folder(sfx[0]):
                    raise ModelLoadError(f"{str(f)!r}: its suffix queries' folder {str(sfx[0])!r} is itself a subset; "
                                         "name the full adapter folder.")
                adapter = adapter.with_suffix_queries(cls.load(sfx[0]), sfx[1])
        except ConfigError as e:
            raise ModelLoadError(f"{str(f)!r}: {e}") from e
        adapter.config.extra.clear()
        adapter.config.extra.update(extra)
        got = adapter.fingerprint()
        if got != rid:
            where = " + ".join(f"layers {ls} of {str(of)!r}" for of, ls in parts)
            raise ModelLoadError(f"{str(f)!r}: {where} have router id {got}, the file says {rid}: "
                                 "the weights there are not the ones this subset was made from.",
                                 hint="Restore the adapter folder it names, or remove the subset folder.")
        return adapter

    def load_tensors(self, tensors: dict[str, torch.Tensor], where: str = "checkpoint") -> None:
        """Copy reference-named router weights (see :meth:`state_tensors`) into this adapter."""
        c = self.config
        with torch.no_grad():
            pairs = [(key, lin) for l in c.router_layers
                     for key, lin in ((_q_key(l), self.q_proj[str(l)]), (_k_key(l), self.k_proj[str(l)]))]
            pairs += [(_sq_key(l), self.sq_proj[str(l)]) for l in c.suffix_layers]
            for key, lin in pairs:
                if key not in tensors:
                    raise ModelLoadError(f"{where} has no tensor {key!r} (router layers {c.router_layers}"
                                         + (f", suffix layers {c.suffix_layers}" if c.suffix_layers else "") + ").")
                t = tensors[key]
                if tuple(t.shape) != tuple(lin.weight.shape):
                    raise ModelLoadError(
                        f"{where}: {key!r} has shape {tuple(t.shape)}, expected {tuple(lin.weight.shape)}.")
                lin.weight.copy_(t.float())
