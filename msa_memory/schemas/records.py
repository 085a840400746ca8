"""Plain records that cross the package's layer boundaries.

Folder → ``Passage`` (``encode/`` splits files) → ``EncodedChunks`` (``encode/`` runs the model)
→ shard + document rows (``store/`` writes) → version N (``store/`` commits).

No I/O and no torch here: arrays are numpy. bf16 has no numpy dtype, so arrays whose logical
dtype is ``"bfloat16"`` carry the raw 16-bit patterns as ``uint16``; ``logical_dtype`` says how to
read them (``torch.from_numpy(a).view(torch.bfloat16)``, or :func:`to_float32`).

Dimension letters: N documents, C chunks, L router layers, H kv-heads, D head-dim, E hidden size.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

__all__ = [
    "LogicalDtype",
    "STORAGE_DTYPES",
    "FORMAT_VERSION",
    "READ_FORMAT_VERSION",
    "SHIFTED_GRID_FORMAT_VERSION",
    "FINE_GRID_FORMAT_VERSION",
    "StoreIdentity",
    "Passage",
    "EncodedChunks",
    "to_float32",
    "from_float32",
    "ShardRecord",
    "identity_sha256",
    "shifted_chunk_counts",
    "check_shifted_window",
]

LogicalDtype = Literal["bfloat16", "float16", "float32"]
#: numpy dtype used on disk / in memory for each logical dtype (bf16 keeps its bit pattern).
STORAGE_DTYPES: dict[str, np.dtype[Any]] = {
    "bfloat16": np.dtype(np.uint16),
    "float16": np.dtype(np.float16),
    "float32": np.dtype(np.float32),
}
#: On-disk format version this code writes (manifests, shard records, the identity record of a store without a
#: shifted router-key grid); readers refuse versions above ``READ_FORMAT_VERSION``.
FORMAT_VERSION = 1
#: The identity record of a store with a shifted router-key grid (``StoreIdentity.shifted_layers``) says 2, so
#: that releases before the grid refuse such a store as a newer format instead of misreading its identity.
SHIFTED_GRID_FORMAT_VERSION = 2
#: ... and 3 when that grid has windows finer than the chunks (``StoreIdentity.shifted_window``), which
#: releases reading version 2 do not know.
FINE_GRID_FORMAT_VERSION = 3
#: The newest format version this code reads.
READ_FORMAT_VERSION = 3


def shifted_chunk_counts(n_tokens: Any, chunk_tokens: int, window: int | None = None) -> np.ndarray:
    """(N,) int64 chunks of each document on the shifted router-key grid.

    With ``window`` None (or P), the grid's chunks of a document of n tokens are its P-token windows
    that start at token P // 2 (tokens P/2 .. 3P/2 - 1, 3P/2 .. 5P/2 - 1, ..., the last one partial),
    ceil((n - P/2) / P) of them; a document of at most P/2 tokens has one, its whole text (the same
    tokens as its one aligned chunk, so routing's max over both grids is unchanged by it).

    With a finer ``window`` W (even, 2 <= W < P: :func:`check_shifted_window`), a document's chunks are
    its W-token windows from token 0 (0 .. W-1, W .. 2W-1, ...: ceil(n / W)), then its W-token windows
    from token W/2 (the rule above with W for P): windows of W tokens at a stride of W/2.
    """
    n = np.asarray(n_tokens, dtype=np.int64)
    p = int(chunk_tokens) if window is None else int(window)
    h = p // 2
    shifted = np.where(n <= h, 1, -(-(n - h) // p)).astype(np.int64)
    if window is None or int(window) == int(chunk_tokens):
        return shifted
    return (-(-n // p) + shifted).astype(np.int64)


def check_shifted_window(window: Any, chunk_tokens: int, where: str = "shifted_window") -> int | None:
    """``window`` as stored: None for the default grid (P-token windows from P/2; ``window`` None or P),
    else an even W with 2 <= W < P (:func:`shifted_chunk_counts`). Anything else: ConfigError."""
    from msa_memory.errors import ConfigError

    if window is None:
        return None
    try:
        w = int(window)
    except (TypeError, ValueError):
        w = -1
    p = int(chunk_tokens)
    if w == p:
        return None
    if isinstance(window, bool) or w != window or w < 2 or w >= p or w % 2:
        raise ConfigError(f"{where} must be an even number of tokens from 2 to {p - 2} (finer than the "
                          f"{p}-token chunks), or {p} / none for the default shifted grid; got {window!r}.")
    return w


def to_float32(a: np.ndarray, logical_dtype: str) -> np.ndarray:
    """Widen stored values to float32 exactly (bf16 bit patterns are shifted into the high half)."""
    if logical_dtype == "bfloat16":
        return (np.ascontiguousarray(a, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
    return np.asarray(a, dtype=np.float32)


def from_float32(a: np.ndarray, logical_dtype: str) -> np.ndarray:
    """Narrow float32 values to the storage form of ``logical_dtype`` (bf16: round to nearest even)."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    if logical_dtype == "bfloat16":
        bits = a.view(np.uint32)
        rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
        out = ((bits + rounding) >> 16).astype(np.uint16)
        nan = np.isnan(a)
        if nan.any():
            out[nan] = np.uint16(0x7FC0)
        return out
    return a.astype(STORAGE_DTYPES[logical_dtype])


@dataclass(frozen=True, slots=True)
class StoreIdentity:
    """What produced a store; written once at creation and compared on every append and open."""

    model_name: str
    """Human name of the model (``"gemma-3-270m (gguf q4_k_m)"``, a path, ...)."""
    model_fingerprint: str
    """Hash of weights + config (+ tokenizer); appending with another fingerprint is refused."""
    router_id: str
    """Hash of the router projections (adapter) that produced ``k_router``."""
    router_layers: tuple[int, ...]
    """Decoder layer indices whose pooled state is kept, ascending."""
    chunk_tokens: int
    """Pooling size P (tokens per chunk); 64 in MSA."""
    n_kv_heads: int
    """KV heads H of content K̄/V̄ and of router keys."""
    head_dim: int
    """Head dimension D of content K̄/V̄ and router keys."""
    dtype: LogicalDtype = "bfloat16"
    """Logical dtype of every stored tensor."""
    hidden_size: int = 0
    """E of the optional pooled router-layer inputs (``x_router``); 0 when the store keeps none."""
    wrap: str = "plain"
    """How passages were wrapped before encoding (``"msa"``: ``<|im_start|>[ID]. text[ID]<|im_end|>``)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form, JSON-serialisable provenance (tokenizer name, score mode, package version...)."""
    shifted_layers: tuple[int, ...] = ()
    """Router layers that also keep router keys over the shifted chunk grid (``k_router_s``, see
    :func:`shifted_chunk_counts`); a subset of ``router_layers``, empty for MSA's aligned grid alone.
    Left out of :meth:`to_dict` when empty, so stores without it keep their identity hash."""
    shifted_window: int | None = None
    """Tokens per window of the shifted grid when finer than ``chunk_tokens`` (windows of W tokens at a
    stride of W/2, :func:`shifted_chunk_counts`); None for P-token windows from token P/2. Left out of
    :meth:`to_dict` when None."""

    def __post_init__(self) -> None:
        from msa_memory.errors import ConfigError

        if self.shifted_window is not None:
            if not self.shifted_layers:
                raise ConfigError(f"shifted_window {self.shifted_window!r} needs shifted_layers (the layers that keep "
                                  "the shifted grid).")
            if check_shifted_window(self.shifted_window, self.chunk_tokens) is None:
                raise ConfigError(f"shifted_window {self.shifted_window!r} equals chunk_tokens: leave it None.")

        if not self.router_layers or list(self.router_layers) != sorted(set(self.router_layers)):
            raise ConfigError(
                f"router_layers must be a non-empty ascending list of distinct layer indices, got {self.router_layers!r}."
            )
        s = list(self.shifted_layers)
        if s != sorted(set(s)) or not set(s) <= set(self.router_layers):
            raise ConfigError(f"shifted_layers must be ascending distinct router layers (router layers "
                              f"{list(self.router_layers)}), got {s!r}.")
        for name in ("chunk_tokens", "n_kv_heads", "head_dim"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)!r}.")
        if self.dtype not in STORAGE_DTYPES:
            raise ConfigError(f"dtype must be one of {sorted(STORAGE_DTYPES)}, got {self.dtype!r}.")

    @property
    def n_layers(self) -> int:
        return len(self.router_layers)

    @property
    def shifted_positions(self) -> tuple[int, ...]:
        """Router-layer positions (0..L-1) of the shifted layers; position j of ``k_router_s`` is the
        j-th of them."""
        return tuple(self.router_layers.index(l) for l in self.shifted_layers)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["router_layers"] = list(self.router_layers)
        if self.shifted_layers:
            d["shifted_layers"] = list(self.shifted_layers)
        else:
            del d["shifted_layers"]
        if self.shifted_window is None:
            del d["shifted_window"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StoreIdentity:
        d = dict(d)
        d["router_layers"] = tuple(int(x) for x in d["router_layers"])
        d["shifted_layers"] = tuple(int(x) for x in d.get("shifted_layers", ()))
        return cls(**d)

    def compatible_with(self, other: StoreIdentity) -> list[str]:
        """Names of the fields that make ``other`` unable to share a store with ``self`` (empty if none)."""
        keys = ("model_fingerprint", "router_id", "router_layers", "chunk_tokens", "n_kv_heads",
                "head_dim", "dtype", "hidden_size", "wrap", "shifted_layers", "shifted_window")
        return [k for k in keys if getattr(self, k) != getattr(other, k)]


@dataclass(frozen=True, slots=True)
class Passage:
    """A piece of a source file that the model encodes as one MSA document."""

    text: str
    """The passage text exactly as encoded (before model-specific wrapping)."""
    source_path: str
    """Path of the source file, as given to the job (relative to the corpus root when known)."""
    passage_index: int = 0
    """0-based index of this passage within its source file."""
    byte_start: int = 0
    """Offset of the passage's first byte in the source file's UTF-8 text."""
    byte_end: int = 0
    """Offset one past the passage's last byte."""
    file_sha256: str = ""
    """sha256 of the whole source file's bytes (what incremental updates compare)."""
    token_ids: tuple[int, ...] | None = None
    """The passage as token ids, when it was given so (``encode_token_ids``): the encoder wraps these
    instead of tokenising ``text``, which then holds their decoded text. None: tokenise ``text``."""


@dataclass(frozen=True)
class EncodedChunks:
    """Pooled state of N documents (passages) as produced by the encoder, ready to be written as a shard.

    Documents are in order; document i owns chunks ``offsets[i]:offsets[i+1]`` of every array.
    """

    doc_ids: np.ndarray
    """(N,) int64 store document ids (reserved from the store before encoding)."""
    n_tokens: np.ndarray
    """(N,) int64 tokens of each wrapped document."""
    n_chunks: np.ndarray
    """(N,) int64 chunks of each document = ceil(n_tokens / chunk_tokens)."""
    k_router: np.ndarray
    """(L, C, H, D) pooled router keys K̄ᵣ, storage dtype."""
    kv: np.ndarray
    """(C, L, 2, H, D) pooled content K̄ (index 0) and V̄ (index 1), storage dtype."""
    dtype: LogicalDtype = "bfloat16"
    """Logical dtype of ``k_router``/``kv``/``x_router``."""
    x_router: np.ndarray | None = None
    """(L, C, E) optional pooled router-layer inputs (input_layernorm outputs), for re-indexing."""
    n_chunks_s: np.ndarray | None = None
    """(N,) int64 chunks of each document on the shifted grid (:func:`shifted_chunk_counts`), or None
    when the store keeps no shifted grid; the two arrays below are then None too."""
    k_router_s: np.ndarray | None = None
    """(Ls, Cs, H, D) router keys over the shifted grid at the store's shifted layers, storage dtype."""
    x_router_s: np.ndarray | None = None
    """(Ls, Cs, E) pooled router-layer inputs over the shifted grid (when ``x_router`` is kept)."""

    @property
    def offsets(self) -> np.ndarray:
        """(N+1,) int64 chunk offsets of each document."""
        return np.concatenate([[0], np.cumsum(self.n_chunks, dtype=np.int64)])

    @property
    def offsets_s(self) -> np.ndarray:
        """(N+1,) int64 offsets of each document's chunks on the shifted grid (empty grid: all 0)."""
        n = self.n_chunks_s if self.n_chunks_s is not None else np.zeros(self.n_docs, np.int64)
        return np.concatenate([[0], np.cumsum(n, dtype=np.int64)])

    @property
    def n_docs(self) -> int:
        return int(self.doc_ids.shape[0])

    @property
    def n_chunks_total(self) -> int:
        return int(self.kv.shape[0])


def identity_sha256(identity: StoreIdentity) -> str:
    """sha256 of the identity's canonical JSON (sorted keys): what shard records and manifests pin."""
    import hashlib
    import json

    blob = json.dumps(identity.to_dict(), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


@dataclass(frozen=True, eq=False)
class ShardRecord:
    """What ``store.write_shard`` wrote: one immutable shard, complete on disk, not yet committed.

    Written last into the shard (``_record.json``), so a shard with a record is complete; the
    commit that lists it makes its documents live. Document i owns shard chunks
    ``chunk_offsets[i]:chunk_offsets[i+1]``.
    """

    shard_id: str
    """Caller-chosen name, unique in the store (``[A-Za-z0-9][A-Za-z0-9._-]*``)."""
    doc_ids: np.ndarray
    """(N,) int64 document ids, in shard order."""
    chunk_offsets: np.ndarray
    """(N+1,) int64 chunk offsets of each document inside the shard."""
    n_tokens: np.ndarray
    """(N,) int64 tokens of each document."""
    files: dict[str, dict[str, int]]
    """Shard-relative path -> ``{"size": bytes, "crc32c": whole-file checksum}`` of every data file."""
    identity_sha256: str
    """:func:`identity_sha256` of the store identity the arrays were checked against."""
    created: str = ""
    """ISO-8601 UTC time the shard was finished."""
    format_version: int = FORMAT_VERSION

    @property
    def n_docs(self) -> int:
        return int(self.doc_ids.shape[0])

    @property
    def n_chunks(self) -> int:
        return int(self.chunk_offsets[-1]) if self.chunk_offsets.size else 0

    @property
    def n_tokens_total(self) -> int:
        return int(self.n_tokens.sum())

    @property
    def n_bytes(self) -> int:
        """Bytes of all files of the shard on disk."""
        return int(sum(f["size"] for f in self.files.values()))

    def to_dict(self) -> dict[str, Any]:
        return {
            "shard_id": self.shard_id,
            "format_version": int(self.format_version),
            "identity_sha256": self.identity_sha256,
            "created": self.created,
            "doc_ids": [int(x) for x in self.doc_ids],
            "chunk_offsets": [int(x) for x in self.chunk_offsets],
            "n_tokens": [int(x) for x in self.n_tokens],
            "files": {k: {"size": int(v["size"]), "crc32c": int(v["crc32c"])} for k, v in self.files.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShardRecord:
        return cls(
            shard_id=str(d["shard_id"]),
            doc_ids=np.asarray(d["doc_ids"], dtype=np.int64).reshape(-1),
            chunk_offsets=np.asarray(d["chunk_offsets"], dtype=np.int64).reshape(-1),
            n_tokens=np.asarray(d["n_tokens"], dtype=np.int64).reshape(-1),
            files={str(k): {"size": int(v["size"]), "crc32c": int(v["crc32c"])} for k, v in d["files"].items()},
            identity_sha256=str(d["identity_sha256"]),
            created=str(d.get("created", "")),
            format_version=int(d.get("format_version", FORMAT_VERSION)),
        )
