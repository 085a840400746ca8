"""Query centring: a hubness correction for routing, calibrated on a store's own text.

Design note. Routing scores chunk c for a question's token t by ``s(t, c) = q'_t · k_c`` (``q'`` the prepared
router query: L2-normalised per head under ``score="cosine"``, raw under ``"dot"``; head mean, then the
question's best token and the document's best chunk). Router queries share a large common direction, so a
chunk whose key leans towards it (a *hub*) scores high against nearly every question, and a document with
many chunks holds more chances of one. Query centring scores ``(q'_t - mu_l) · k_c`` instead, ``mu_l`` the
mean prepared query of router layer l over *reference questions* (suffix queries get their own mean): each
chunk's score minus its mean score against the reference questions. ``RouterIndex.set_query_centres`` keeps
``mu_l · k_c`` as one float per chunk and takes it off before the document reduce, so routing costs the same.

Reference questions (``Memory.centre_queries("store")``): the first sentence (at most ``MAX_CHARS``
characters) of ``n`` passages drawn with a fixed seed from the store version's live documents, the store's
own unlabeled text; each is read by the model's routing forward once (``MsaEngine.query_sums``), n short
forwards in all (about half a minute for 256 on a 2-core CPU). Centres of a store version are cached under
``$MSA_CACHE_DIR/query-centres/`` (else ``$XDG_CACHE_HOME/msa-memory/``, else ``~/.cache/msa-memory/``), by
store location, version, router id and ``n``, so a later ``Memory`` of the same version loads them.
Explicit texts (``Memory.centre_queries([...])``) are used as given and not cached.

Not in MSA: off unless asked for. Measured by ``benchmarks/bench_retrieval.py`` (its "routing, centred" row).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from msa_memory.errors import ConfigError

__all__ = ["MAX_CHARS", "SEED", "first_sentence", "reference_texts", "add_sums", "centres_of", "cache_path",
           "load_cached", "save_cached", "describe", "check_source"]

#: longest reference question, in characters (the first sentence of a passage, cut)
MAX_CHARS = 300
#: seed of the passages drawn as reference questions
SEED = 0
_SENTENCE = re.compile(r"(?<=[.?!])\s")


def first_sentence(text: str) -> str:
    """The first sentence of ``text``, whitespace collapsed, at most ``MAX_CHARS`` characters."""
    flat = " ".join(text.split())
    return _SENTENCE.split(flat, maxsplit=1)[0][:MAX_CHARS].strip()


def reference_texts(store: Any, doc_ids: np.ndarray, n: int) -> list[str]:
    """First sentences of ``n`` passages (all, if fewer) drawn with :data:`SEED` from ``doc_ids`` of ``store``."""
    if int(n) < 1:
        raise ConfigError(f"Query centres need at least one reference question; got n={n!r}.")
    ids = np.asarray(doc_ids)
    pick = np.sort(np.random.default_rng(SEED).choice(len(ids), size=min(int(n), len(ids)), replace=False))
    return [t for t in (first_sentence(x) for x in store.texts(ids[pick])) if t]


def add_sums(total: dict[tuple[bool, int], tuple[Any, int]], part: dict[tuple[bool, int], tuple[Any, int]]) -> None:
    """Add one forward's ``MsaEngine.query_sums`` into ``total``."""
    for key, (s, n) in part.items():
        t, m = total.get(key, (0, 0))
        total[key] = (t + s, m + n)


def centres_of(total: dict[tuple[bool, int], tuple[Any, int]]) -> dict[str, dict[int, Any]]:
    """{"q": {router position: (Hq, D) float32 mean}, "sq": {...}} of summed queries."""
    import torch

    out: dict[str, dict[int, Any]] = {"q": {}, "sq": {}}
    for (is_suffix, pos), (s, n) in sorted(total.items()):
        out["sq" if is_suffix else "q"][int(pos)] = (s / max(n, 1)).to(torch.float32)
    return out


def _cache_dir() -> Path:
    from msa_memory.store._cache import cache_root

    return cache_root().parent / "query-centres"


def cache_path(store: Any, router_id: str, n: int) -> Path:
    """Where the centres of ``store``'s open version, routed by ``router_id``, from ``n`` passages are kept."""
    key = json.dumps([str(store.root), int(store.version), str(router_id), int(n), SEED, MAX_CHARS])
    return _cache_dir() / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".safetensors")


def save_cached(path: Path, centres: dict[str, dict[int, Any]], n_texts: int) -> None:
    """Write ``centres`` (from ``n_texts`` reference questions) to ``path`` (temp file + rename, so a reader
    never sees half a file)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"{kind}.{pos}": t.contiguous() for kind, table in centres.items() for pos, t in table.items()}
    tmp = path.with_suffix(f".tmp{np.random.default_rng().integers(1 << 30)}")
    save_file(tensors, str(tmp), metadata={"reference_questions": str(int(n_texts))})
    tmp.replace(path)


def load_cached(path: Path) -> tuple[dict[str, dict[int, Any]], int] | None:
    """(centres, reference questions) saved by :func:`save_cached`, or None when there are none (or the file
    is unreadable)."""
    if not path.is_file():
        return None
    from safetensors import safe_open

    out: dict[str, dict[int, Any]] = {"q": {}, "sq": {}}
    try:
        with safe_open(str(path), framework="pt") as f:
            n_texts = int((f.metadata() or {})["reference_questions"])
            for name in f.keys():
                kind, pos = name.split(".")
                out[kind][int(pos)] = f.get_tensor(name)
    except Exception:  # noqa: BLE001  (a damaged cache entry is recomputed, never trusted)
        return None
    return out, n_texts


def describe(centres: dict[str, dict[int, Any]], source: str, n_texts: int, cached: bool) -> dict[str, Any]:
    """What ``Memory.centre_queries`` reports."""
    return {"centred": bool(centres["q"] or centres["sq"]), "source": source, "reference_questions": n_texts, "cached": cached,
            "layers": sorted(centres["q"]), "suffix_layers": sorted(centres["sq"]),
            "centre_norms": {int(p): round(float(t.norm()), 4) for p, t in centres["q"].items()}}


def check_source(source: Any) -> str | Sequence[str] | None:
    """``source`` if ``Memory.centre_queries`` takes it, else ConfigError."""
    if source is None or source == "store":
        return source
    if isinstance(source, (list, tuple)) and source and all(isinstance(t, str) and t.strip() for t in source):
        return source
    raise ConfigError(f"centre_queries takes 'store', a non-empty list of non-blank texts, or None; got {source!r}.",
                      hint="'store' draws reference questions from the store's own passages; None turns centring off.")
