"""What a model is, as a fingerprint: sha256 over its weights, architecture config and tokenizer.

Weights are hashed by file bytes (memoised per path + size + mtime in
``$MSA_CACHE_DIR/fingerprints.json``, default ``~/.cache/msa_memory``: the only file of the encode
part's that it writes, best effort), by the tensors' bytes for a model object, or named by a verified
GGUF file's sha256. :func:`model_fingerprint` is what a store records as ``model_fingerprint``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["cache_dir", "hash_files", "hash_tensors", "hash_tokenizer", "model_fingerprint"]

_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "_commit_hash", "quantization_config",
                         "dtype", "torch_dtype", "architectures", "use_cache", "_attn_implementation_autoset",
                         "output_attentions", "output_hidden_states", "return_dict", "id2label", "label2id"}


def cache_dir() -> Path:
    """``$MSA_CACHE_DIR`` (default ``~/.cache/msa_memory``): fingerprints and de-quantised GGUF copies."""
    return Path(os.environ.get("MSA_CACHE_DIR", Path.home() / ".cache" / "msa_memory"))


def _fingerprints_file() -> Path:
    return cache_dir() / "fingerprints.json"


def _canonical_config(cfg: Any) -> str:
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    d = {k: v for k, v in d.items() if k not in _VOLATILE_CONFIG_KEYS and not k.startswith("_")}
    return json.dumps(d, sort_keys=True, default=str)


_MEMO: dict[str, str] = {}


def hash_files(files: list[Path]) -> str:
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
        cache = json.loads(_fingerprints_file().read_text())
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
            _fingerprints_file().parent.mkdir(parents=True, exist_ok=True)
            tmp = _fingerprints_file().with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache))
            tmp.replace(_fingerprints_file())
        except OSError:
            pass
    _MEMO[key] = cache[key]
    return cache[key]


def hash_tensors(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    seen: set[int] = set()
    for name, t in sorted(model.state_dict().items()):
        if t.data_ptr() in seen:  # tied weights
            continue
        seen.add(t.data_ptr())
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def hash_tokenizer(tokenizer: Any, directory: Path | None) -> str:
    if directory is not None:
        files = [directory / n for n in ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt",
                                         "tokenizer_config.json", "special_tokens_map.json")]
        files = [f for f in files if f.is_file()]
        if files:
            return hash_files(files)
    vocab = tokenizer.get_vocab()
    return hashlib.sha256(json.dumps(sorted(vocab.items(), key=lambda kv: kv[1])).encode()).hexdigest()


def model_fingerprint(weights: str, cfg: Any, tok_hash: str) -> str:
    payload = json.dumps({"weights": weights, "config": _canonical_config(cfg), "tokenizer": tok_hash})
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
