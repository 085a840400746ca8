"""Reader adapters: a LoRA on the question side of the model, trained to answer from pooled K̄V̄.

Design note. The store's K̄V̄ are what the frozen base model encoded; a reader adapter changes only how
the *question and answer tokens* are computed (low-rank updates ``ΔW = B·A·alpha/rank`` on chosen linears
of chosen decoder layers), so every store encoded by the base model stays valid and the store identity
does not name the reader. The updates are forward hooks on the model's own ``nn.Linear`` modules that add
``scale · (x A^T) B^T`` to the output while the adapter is *active* (:meth:`ReaderAdapter.active`, which
:class:`~msa_memory.runtime.engine.MsaEngine` opens for a forward whose state asks for the reader); outside
it the hooks return the output unchanged, so encoding, routing and text mode see the base model. Which
documents a question routes to is decided by a forward without the reader (``Memory`` routes first, then
answers with the routes preset), so a reader can never change routing quality.

File format: ``reader_adapter.json`` (:class:`ReaderConfig`: rank, alpha, targets, layers, the base model's
fingerprint, free-form ``extra`` with the training command and held-out figures) and
``reader_adapter.safetensors`` (``{layer}.{target}.lora_a`` (rank, in) and ``.lora_b`` (out, rank), fp32 or
bf16). :meth:`ReaderAdapter.attach` checks the shapes against the model and refuses a model with another
fingerprint.

What it does not do: train (``msa_memory.train.reader``), or merge the update into the weights (the base
weights are shared with encoding and text mode).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from msa_memory.errors import ConfigError, ModelLoadError

if TYPE_CHECKING:
    import torch

__all__ = ["ReaderConfig", "ReaderAdapter", "READER_TARGETS", "default_reader_adapter", "resolve_reader",
           "check_reader_folder"]

#: Linear modules a reader may adapt, by their name in a HF decoder layer.
READER_TARGETS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
                  "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
_CONFIG = "reader_adapter.json"
_WEIGHTS = "reader_adapter.safetensors"
FORMAT = "msa-reader-lora/1"


def _pname(key: str, factor: str) -> str:
    """The ParameterDict name of factor "a" or "b" of linear ``key`` ("{layer}.{target}"; dots are not allowed)."""
    return f"{key.replace('.', '_')}_{factor}"


@dataclass
class ReaderConfig:
    rank: int
    alpha: float
    targets: list[str]
    layers: list[int]
    model_fingerprint: str = ""
    format: str = FORMAT
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if int(self.rank) < 1:
            raise ConfigError(f"Reader rank must be >= 1, got {self.rank!r}.")
        bad = [t for t in self.targets if t not in READER_TARGETS]
        if bad or not self.targets:
            raise ConfigError(f"Reader targets {bad or self.targets!r} are not among {sorted(READER_TARGETS)}.")
        if not self.layers or any(int(x) < 0 for x in self.layers):
            raise ConfigError(f"Reader layers {self.layers!r} must be a non-empty list of layer indices.")
        self.rank, self.alpha = int(self.rank), float(self.alpha)
        self.targets, self.layers = list(self.targets), sorted(int(x) for x in self.layers)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class ReaderAdapter:
    """LoRA factors of a reader, and the hooks that apply them to one HF model."""

    def __init__(self, config: ReaderConfig, shapes: dict[str, tuple[int, int]] | None = None) -> None:
        import torch

        self.config = config
        self.params = torch.nn.ParameterDict()
        self._active = False
        self._hooks: list[Any] = []
        self.model: Any = None
        for key, (out_f, in_f) in (shapes or {}).items():
            self._new(key, out_f, in_f)

    def _new(self, key: str, out_f: int, in_f: int) -> None:
        import torch

        r = self.config.rank
        a = torch.empty(r, in_f)
        torch.nn.init.kaiming_uniform_(a, a=5 ** 0.5)       # the LoRA paper's init: A random, B zero (ΔW = 0)
        self.params[_pname(key, "a")] = torch.nn.Parameter(a)
        self.params[_pname(key, "b")] = torch.nn.Parameter(torch.zeros(out_f, r))

    @staticmethod
    def _linears(hf_model: Any, config: ReaderConfig) -> dict[str, Any]:
        layers = hf_model.model.layers
        out = {}
        for li in config.layers:
            if li >= len(layers):
                raise ModelLoadError(f"Reader layer {li} does not exist in a model with {len(layers)} decoder layers.",
                                     hint="Use the reader adapter trained for this model.")
            for t in config.targets:
                lin = getattr(getattr(layers[li], READER_TARGETS[t]), t, None)
                if lin is None:
                    raise ModelLoadError(f"Decoder layer {li} has no {READER_TARGETS[t]}.{t} for the reader adapter.",
                                         hint="Use the reader adapter trained for this model family.")
                out[f"{li}.{t}"] = lin
        return out

    @classmethod
    def for_model(cls, hf_model: Any, config: ReaderConfig) -> ReaderAdapter:
        """A new (identity: B = 0) reader for ``hf_model``'s shapes."""
        lins = cls._linears(hf_model, config)
        return cls(config, {k: (lin.out_features, lin.in_features) for k, lin in lins.items()})

    def factors(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.params[_pname(key, "a")], self.params[_pname(key, "b")]

    def keys(self) -> list[str]:
        return [f"{li}.{t}" for li in self.config.layers for t in self.config.targets]

    # ------------------------------------------------------------------ hooks
    def attach(self, hf_model: Any, fingerprint: str | None = None) -> ReaderAdapter:
        """Hook this reader into ``hf_model`` (inactive until :meth:`active`); idempotent for the same model."""
        if self.model is hf_model:
            return self
        if self.model is not None:
            raise ConfigError("This reader adapter is attached to another model; load a second copy for it.")
        want = self.config.model_fingerprint
        if fingerprint and want and fingerprint != want:
            raise ModelLoadError(f"Reader adapter was trained on model {want}, not on this model ({fingerprint}).",
                                 hint="Use the reader adapter trained for this model, or none (reader=False).")
        lins = self._linears(hf_model, self.config)
        dev = next(hf_model.parameters()).device
        for key, lin in lins.items():
            a, b = self.factors(key)
            if tuple(a.shape) != (self.config.rank, lin.in_features) or tuple(b.shape) != (lin.out_features,
                                                                                            self.config.rank):
                raise ModelLoadError(f"Reader factors of {key} have shapes {tuple(a.shape)}/{tuple(b.shape)}; the "
                                     f"model's linear is {lin.out_features}x{lin.in_features}.",
                                     hint="Use the reader adapter trained for this model.")
        self.params.to(dev)
        for key, lin in lins.items():
            self._hooks.append(lin.register_forward_hook(self._hook(key)))
        self.model = hf_model
        return self

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks, self.model = [], None

    def _hook(self, key: str) -> Any:
        scale = self.config.scale

        def hook(module: Any, inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
            if not self._active:
                return None
            a, b = self.factors(key)
            x = inputs[0]
            delta = (x.to(a.dtype) @ a.t()) @ b.t()
            return output + (delta * scale).to(output.dtype)

        return hook

    @contextmanager
    def active(self, on: bool = True) -> Iterator[None]:
        """Apply the reader to forwards inside the block (nested blocks restore the outer state)."""
        old, self._active = self._active, bool(on)
        try:
            yield
        finally:
            self._active = old

    # ------------------------------------------------------------------ files
    def n_params(self) -> int:
        return sum(p.numel() for p in self.params.values())

    def save(self, out_dir: str | Path, dtype: Any = None) -> Path:
        import torch
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        dt = dtype or torch.bfloat16
        tensors = {}
        for key in self.keys():
            a, b = self.factors(key)
            tensors[f"{key}.lora_a"] = a.detach().to("cpu", dt).contiguous()
            tensors[f"{key}.lora_b"] = b.detach().to("cpu", dt).contiguous()
        save_file(tensors, str(out / _WEIGHTS))
        (out / _CONFIG).write_text(json.dumps(asdict(self.config), indent=2, sort_keys=True) + "\n")
        return out

    @classmethod
    def load(cls, path: str | Path) -> ReaderAdapter:
        import torch
        from safetensors.torch import load_file

        p = check_reader_folder(path)
        cfg_f, w_f = p / _CONFIG, p / _WEIGHTS
        try:
            raw = json.loads(cfg_f.read_text())
            if raw.get("format") != FORMAT:
                raise ModelLoadError(f"Reader adapter {str(p)!r} has format {raw.get('format')!r}, not {FORMAT!r}.")
            config = ReaderConfig(**raw)
            tensors = load_file(str(w_f))
        except (ValueError, TypeError, OSError) as e:
            raise ModelLoadError(f"Reader adapter {str(p)!r} cannot be read: {e}",
                                 hint="Re-run `msa train-reader` or pass another folder.") from e
        ad = cls(config)
        for key in ad.keys():
            a, b = tensors.get(f"{key}.lora_a"), tensors.get(f"{key}.lora_b")
            if a is None or b is None:
                raise ModelLoadError(f"Reader adapter {str(p)!r} lacks the factors of {key}.")
            ad.params[_pname(key, "a")] = torch.nn.Parameter(a.float(), requires_grad=False)
            ad.params[_pname(key, "b")] = torch.nn.Parameter(b.float(), requires_grad=False)
        return ad


def check_reader_folder(path: str | Path) -> Path:
    """``path`` as a Path if it holds a reader adapter's two files; ModelLoadError (naming it) otherwise."""
    p = Path(path)
    if not (p / _CONFIG).is_file() or not (p / _WEIGHTS).is_file():
        raise ModelLoadError(f"{str(p)!r} is not a reader adapter (it needs {_CONFIG} and {_WEIGHTS}).",
                             hint="Pass the folder that `msa train-reader --out` wrote, default or none.")
    return p


def default_reader_adapter() -> Path | None:
    """The shipped reader of the default model (``msa_memory/data/gemma3-270m-reader``), or None."""
    p = Path(__file__).resolve().parents[1] / "data" / "gemma3-270m-reader"
    return p if (p / _CONFIG).is_file() else None


_SHIPPED: dict[int, ReaderAdapter] = {}


def resolve_reader(spec: Any, hf_model: Any, fingerprint: str) -> ReaderAdapter | None:
    """The reader a ``Memory`` uses, attached to ``hf_model``.

    ``spec``: None (the shipped reader when it was trained on this model, i.e. its fingerprint matches; else
    none), False (none), True (the shipped reader; an error when it does not fit), a folder, or a
    :class:`ReaderAdapter`. The shipped reader is loaded once per model object.
    """
    if spec is False:
        return None
    if isinstance(spec, ReaderAdapter):
        return spec.attach(hf_model, fingerprint)
    if spec is None or spec is True or spec == "default":
        path = default_reader_adapter()
        if path is None:
            if spec is None:
                return None
            raise ModelLoadError("No reader adapter ships with this package.",
                                 hint="Train one with `msa train-reader` and pass its folder.")
        key = id(hf_model)
        cached = _SHIPPED.get(key)
        if cached is not None and cached.model is hf_model:
            return cached
        ad = ReaderAdapter.load(path)
        if spec is None and ad.config.model_fingerprint != fingerprint:
            return None
        _SHIPPED[key] = ad.attach(hf_model, fingerprint)
        return ad
    return ReaderAdapter.load(spec).attach(hf_model, fingerprint)
