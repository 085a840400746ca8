"""Writing and reading one immutable shard: Zarr v3 arrays + Parquet document rows + a record.

``write_shard`` is what a worker calls: it checks the arrays against the store identity, writes
everything into ``staging/{shard_id}.{hex}/``, fsyncs it, writes ``_record.json`` (the
:class:`ShardRecord`, with the size and crc32c of every file) last, and renames the directory to
``shards/{shard_id}/`` in one step. A shard directory under ``shards/`` is therefore complete; it
becomes part of the store only when a commit lists it. On a backend without atomic rename (object
storage) the files go straight to ``shards/{shard_id}/`` and the record is written last, exclusively:
there a shard exists once its record does (readers and commits only ever start from the record). Shards are never modified afterwards
(compaction writes new ones). No manifest, lock or id counter is touched here except to read.

Arrays of a shard (C chunks of the shard, L router layers; dtype = identity storage dtype)::

    kv         (C, L, 2, H, D)  inner chunk (1, L, 2, H, D): one document = one contiguous byte range
    k_router   (L, C, H, D)     inner chunk (1, C, H, D): one layer of router keys = one read
    x_router   (L, C, E)        optional (identity.hidden_size > 0), inner chunk (1, C, E)
    chunk_doc  (C,) int64       document id of each chunk
    k_router_s (Ls, Cs, H, D)   only with identity.shifted_layers: router keys over the shifted grid
    x_router_s (Ls, Cs, E)      ... and its pooled inputs when x_router is kept

Beside them ``docs.parquet`` (document rows with the text) and ``postings.lex2.parquet`` (the lexical
postings of that text under the analyzer this release writes, ``lexical.ANALYZER``: stemmed terms,
``store/lexical.py``; unless ``write_shard(..., lexical=False)``; releases before wrote
``postings.lex1.parquet``, unstemmed, which the reader still reads).

Cs chunks of the shifted grid: document i owns ``shifted_offsets(record)[i:i+2]`` of them
(``schemas.records.shifted_chunk_counts`` of its token count).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import crc32c
import numpy as np

from msa_memory.errors import (
    DuplicateDocumentError,
    IdNotReservedError,
    ManifestCorruptError,
    SchemaMismatchError,
    ShardMissingError,
    StoreExistsError,
)
from msa_memory.schemas.records import (
    STORAGE_DTYPES,
    EncodedChunks,
    Passage,
    ShardRecord,
    StoreIdentity,
    identity_sha256,
    shifted_chunk_counts,
)
from msa_memory.store import _ids, _manifest
from msa_memory.store._layout import (
    DOCS_FILE,
    RECORD_FILE,
    SHARDS_DIR,
    STAGING_DIR,
    check_files,
    check_layout,
    check_name,
    dumps,
    is_rel_path,
    now_iso,
    open_backend,
    os_write_error,
    read_parquet,
    token,
)
from msa_memory.store._zarrshard import ArrayReader, shard_file, write_array
from msa_memory.store.backend import Backend
from msa_memory.store import lexical as _lexical

def _no_fault(point: str) -> None:
    """Default fault hook: does nothing."""


#: Test hook: called with a point name at each step of a write/commit (crash tests kill there).
fault_hook: Callable[[str], None] = _no_fault

GROUP_META = {"attributes": {"msa_memory": "shard"}, "zarr_format": 3, "node_type": "group"}


def chunk_bytes(identity: StoreIdentity) -> int:
    """Bytes of stored tensors per chunk (K̄V̄ + router keys + router inputs)."""
    item = STORAGE_DTYPES[identity.dtype].itemsize
    L, H, D = identity.n_layers, identity.n_kv_heads, identity.head_dim
    return item * (L * 2 * H * D + L * H * D + L * identity.hidden_size)


def shifted_chunk_bytes(identity: StoreIdentity) -> int:
    """Bytes of stored tensors per chunk of the shifted grid (router keys + router inputs; 0 without one)."""
    Ls = len(identity.shifted_layers)
    return STORAGE_DTYPES[identity.dtype].itemsize * Ls * (identity.n_kv_heads * identity.head_dim + identity.hidden_size)


def tensor_bytes(identity: StoreIdentity, n_tokens: np.ndarray) -> int:
    """Bytes of stored tensors of documents of ``n_tokens`` tokens (both grids)."""
    n = np.asarray(n_tokens, dtype=np.int64)
    out = int((-(-n // identity.chunk_tokens)).sum()) * chunk_bytes(identity)
    if identity.shifted_layers:
        out += int(shifted_chunk_counts(n, identity.chunk_tokens, identity.shifted_window).sum()) * shifted_chunk_bytes(identity)
    return out


def shifted_offsets(identity: StoreIdentity, record: ShardRecord) -> np.ndarray:
    """(N+1,) int64 offsets of each document's chunks in the shard's shifted-grid arrays."""
    return np.concatenate([[0], np.cumsum(shifted_chunk_counts(record.n_tokens, identity.chunk_tokens, identity.shifted_window))])


def check_encoded(identity: StoreIdentity, passages: Sequence[Passage], enc: EncodedChunks) -> None:
    """Raise SchemaMismatchError unless ``enc`` fits ``identity`` (shapes, dtypes, counts)."""
    _check_counts(identity, passages, enc)
    st = STORAGE_DTYPES[identity.dtype]
    for name, a, shape in _expected_arrays(identity, enc) + _expected_shifted_arrays(identity, enc):
        if not isinstance(a, np.ndarray) or a.shape != shape:
            raise _mismatch(f"EncodedChunks.{name} has shape {getattr(a, 'shape', None)}; the store expects {shape} "
                            "(C chunks, L router layers, H kv heads, D head dim, E hidden).")
        if a.dtype != st:
            raise _mismatch(f"EncodedChunks.{name} has dtype {a.dtype}; logical {identity.dtype!r} is stored as {st}.")


def _mismatch(msg: str) -> SchemaMismatchError:
    return SchemaMismatchError(msg, hint="Encode with the model/router this store was built with (see `msa store info`).")


def _check_int_array(name: str, a: Any, n: int) -> None:
    if not isinstance(a, np.ndarray) or a.shape != (n,) or a.dtype.kind not in "iu":
        raise _mismatch(f"EncodedChunks.{name} must be an integer array of shape ({n},), got "
                        f"{getattr(a, 'dtype', type(a))} {getattr(a, 'shape', '')}.")


def _check_counts(identity: StoreIdentity, passages: Sequence[Passage], enc: EncodedChunks) -> None:
    """The dtype, the document count and each document's token and chunk counts."""
    if enc.dtype != identity.dtype:
        raise _mismatch(f"EncodedChunks.dtype is {enc.dtype!r}; the store keeps {identity.dtype!r}.")
    n = enc.n_docs
    if n == 0:
        raise _mismatch("A shard needs at least one document; got 0.")
    if len(passages) != n:
        raise _mismatch(f"{len(passages)} passages for {n} encoded documents; pass one Passage per doc id.")
    for name in ("doc_ids", "n_tokens", "n_chunks"):
        _check_int_array(name, getattr(enc, name), n)
    if np.any(enc.n_tokens <= 0):
        raise _mismatch(f"Every document needs at least one token; n_tokens has {int((enc.n_tokens <= 0).sum())} "
                        "non-positive entries.")
    want_chunks = -(-enc.n_tokens // identity.chunk_tokens)
    if not np.array_equal(enc.n_chunks, want_chunks):
        i = int(np.flatnonzero(enc.n_chunks != want_chunks)[0])
        raise _mismatch(f"Document {int(enc.doc_ids[i])}: n_chunks={int(enc.n_chunks[i])} but ceil(n_tokens="
                        f"{int(enc.n_tokens[i])} / chunk_tokens={identity.chunk_tokens}) = {int(want_chunks[i])}.")


def _expected_arrays(identity: StoreIdentity, enc: EncodedChunks) -> list[tuple[str, Any, tuple[int, ...]]]:
    """(name, array, expected shape) of the aligned grid's arrays (content K̄V̄, router keys and inputs)."""
    L, H, D, E = identity.n_layers, identity.n_kv_heads, identity.head_dim, identity.hidden_size
    C = int(enc.n_chunks.sum())
    shapes: list[tuple[str, Any, tuple[int, ...]]] = [
        ("kv", enc.kv, (C, L, 2, H, D)), ("k_router", enc.k_router, (L, C, H, D))]
    if E > 0:
        if enc.x_router is None:
            raise _mismatch(f"The store keeps router inputs x_router (hidden_size={E}); EncodedChunks.x_router is None.")
        shapes.append(("x_router", enc.x_router, (L, C, E)))
    elif enc.x_router is not None:
        raise _mismatch("EncodedChunks.x_router was given but the store keeps no router inputs (identity.hidden_size=0).")
    return shapes


def _expected_shifted_arrays(identity: StoreIdentity, enc: EncodedChunks) -> list[tuple[str, Any, tuple[int, ...]]]:
    """(name, array, expected shape) of the shifted grid's router keys and inputs; its chunk counts checked."""
    Ls, H, D, E = len(identity.shifted_layers), identity.n_kv_heads, identity.head_dim, identity.hidden_size
    if not Ls:
        if enc.k_router_s is not None or enc.x_router_s is not None:
            raise _mismatch("EncodedChunks has shifted-grid router keys but the store keeps none "
                            "(identity.shifted_layers is empty).")
        return []
    want_s = shifted_chunk_counts(enc.n_tokens, identity.chunk_tokens, identity.shifted_window)
    ns = enc.n_chunks_s
    if ns is None or enc.k_router_s is None:
        raise _mismatch(f"The store keeps router keys over the shifted grid at layers {list(identity.shifted_layers)}; "
                        "EncodedChunks.n_chunks_s / k_router_s are None.")
    _check_int_array("n_chunks_s", ns, enc.n_docs)
    if not np.array_equal(ns, want_s):
        i = int(np.flatnonzero(ns != want_s)[0])
        raise _mismatch(f"Document {int(enc.doc_ids[i])}: its shifted-grid chunk count is {int(ns[i])}, not the "
                        f"{int(want_s[i])} its {int(enc.n_tokens[i])} tokens give (shifted_chunk_counts).")
    Cs = int(want_s.sum())
    shapes: list[tuple[str, Any, tuple[int, ...]]] = [("k_router_s", enc.k_router_s, (Ls, Cs, H, D))]
    if E > 0:
        if enc.x_router_s is None:
            raise _mismatch("The store keeps router inputs; EncodedChunks.x_router_s (the shifted grid's) is None.")
        shapes.append(("x_router_s", enc.x_router_s, (Ls, Cs, E)))
    elif enc.x_router_s is not None:
        raise _mismatch("EncodedChunks.x_router_s was given but the store keeps no router inputs "
                        "(identity.hidden_size=0).")
    return shapes


def check_ids(root: Backend, doc_ids: np.ndarray, used: _ids.Ranges | None = None) -> None:
    """Ids must be distinct, reserved (< next_id) and never committed (not in ``used`` ranges)."""
    ids = np.asarray(doc_ids, dtype=np.int64)
    uniq, counts = np.unique(ids, return_counts=True)
    if np.any(counts > 1):
        raise DuplicateDocumentError(f"Document ids {uniq[counts > 1][:10].tolist()} appear more than once in "
                                     "one write.", hint="Give every document its own id from store.reserve_ids().")
    nxt = _ids.read_next_id(root)
    bad = ids[(ids < 0) | (ids >= nxt)]
    if bad.size:
        raise IdNotReservedError(f"Document ids {bad[:10].tolist()} were never reserved in store {str(root)!r} "
                                 f"(ids below {nxt} have been handed out).",
                                 hint="Get ids from store.reserve_ids(n) before encoding.")
    if used is None:
        used = _manifest.read_manifest(root, _manifest.latest_version(root))["used_id_ranges"]
    hit = ids[_ids.in_ranges(ids, used)]
    if hit.size:
        raise DuplicateDocumentError(f"Document ids {hit[:10].tolist()} are already used by a committed version "
                                     "(ids are never reused, also after deletion).",
                                     hint="Reserve fresh ids with store.reserve_ids(n) and re-encode.")


def _docs_table(passages: Sequence[Passage], enc: EncodedChunks, shard_id: str) -> Any:
    import hashlib

    import pyarrow as pa

    from msa_memory.schemas.arrow import DOCUMENT_SCHEMA

    offs = enc.offsets
    cols = {
        "doc_id": np.asarray(enc.doc_ids, dtype=np.int64),
        "source_path": [p.source_path for p in passages],
        "passage_index": [int(p.passage_index) for p in passages],
        "byte_start": [int(p.byte_start) for p in passages],
        "byte_end": [int(p.byte_end) for p in passages],
        "file_sha256": [p.file_sha256 for p in passages],
        "text_sha256": [hashlib.sha256(p.text.encode()).hexdigest() for p in passages],
        "n_tokens": np.asarray(enc.n_tokens, dtype=np.int64),
        "n_chunks": np.asarray(enc.n_chunks, dtype=np.int64),
        "chunk_start": offs[:-1].astype(np.int64),
        "shard_id": [shard_id] * enc.n_docs,
        "text": [p.text for p in passages],
    }
    return pa.table(cols, schema=DOCUMENT_SCHEMA)


def write_shard(root: str | os.PathLike[str], shard_id: str, passages: Sequence[Passage],
                encoded: EncodedChunks, *, lexical: bool = True) -> ShardRecord:
    """Write one immutable shard of ``encoded`` documents; touches no manifest.

    ``lexical`` (default True) also writes the lexical postings of the passages' text into the shard
    (``store/lexical.py``); False writes a shard as releases before the lexical index did.

    Raises SchemaMismatchError (shapes/dtypes vs the identity), IdNotReservedError,
    DuplicateDocumentError (ids repeated or already committed), StoreExistsError (``shard_id``
    already written: use ``store.find_shard`` to resume), StoreNotFoundError.
    """
    be = open_backend(root)
    identity = _manifest.read_identity(be)
    check_name("shard id", shard_id)
    check_layout(be, f"writing shard {shard_id!r}")
    check_encoded(identity, passages, encoded)
    check_ids(be, encoded.doc_ids)
    try:
        return write_shard_unchecked(be, identity, shard_id, passages, encoded, lexical=lexical)
    except OSError as e:
        err = os_write_error(be, e, f"writing shard {shard_id!r}")
        if err is None:
            raise
        raise err from e


def write_shard_unchecked(be: Backend, identity: StoreIdentity, shard_id: str, passages: Sequence[Passage],
                          encoded: EncodedChunks, *, lexical: bool = True) -> ShardRecord:
    """write_shard without the id checks (compaction rewrites ids that are already committed)."""
    check_layout(be, f"writing shard {shard_id!r}")
    final = f"{SHARDS_DIR}/{shard_id}"
    rename = be.supports_atomic_rename
    if (be.stat(final) is not None) if rename else be.exists(f"{final}/{RECORD_FILE}"):
        raise StoreExistsError(f"Shard {shard_id!r} already exists in store {str(be)!r}.",
                               hint="Use store.find_shard(shard_id) to reuse it, or choose another shard id.")
    # without rename the files go in place: a leftover of a crashed writer (no record) is not a shard
    stage = f"{STAGING_DIR}/{shard_id}.{token()}" if rename else final
    if not rename:
        be.delete_prefix(final)
    be.make_prefix(stage)
    try:
        record = _write_files(be, identity, shard_id, passages, encoded, stage, lexical)
        fault_hook("shard:record")
        if rename:
            be.sync_prefix(stage)
            try:
                be.rename_prefix(stage, final)
            except FileExistsError:
                raise StoreExistsError(f"Shard {shard_id!r} was written concurrently by another writer.",
                                       hint="Use a distinct shard id per writer task.") from None
            be.sync_prefix(SHARDS_DIR)
    except BaseException:
        if rename:
            be.delete_prefix(stage)  # our own fresh folder: nothing names it
        raise
    fault_hook("shard:published")
    return record


def _write_files(be: Backend, identity: StoreIdentity, shard_id: str, passages: Sequence[Passage],
                 encoded: EncodedChunks, stage: str, lexical: bool = True) -> ShardRecord:
    """Write the shard's files under ``stage``, its record last (exclusively); returns the record."""
    fault_hook("shard:staged")
    files = _write_arrays(be, identity, encoded, stage)
    files.update(_write_tables(be, passages, encoded, shard_id, stage, lexical))
    record = ShardRecord(
        shard_id=shard_id, doc_ids=np.asarray(encoded.doc_ids, dtype=np.int64), chunk_offsets=encoded.offsets,
        n_tokens=np.asarray(encoded.n_tokens, dtype=np.int64), files=dict(sorted(files.items())),
        identity_sha256=identity_sha256(identity), created=now_iso(),
    )
    try:
        be.write(f"{stage}/{RECORD_FILE}", dumps(record.to_dict()), exclusive=True)
    except FileExistsError:
        raise StoreExistsError(f"Shard {shard_id!r} was written concurrently by another writer.",
                               hint="Use a distinct shard id per writer task.") from None
    return record


def _write_arrays(be: Backend, identity: StoreIdentity, encoded: EncodedChunks, stage: str) -> dict[str, dict[str, int]]:
    """The shard's zarr group and arrays under ``stage``; returns {relative path: {size, crc32c}} of their files."""
    st = STORAGE_DTYPES[identity.dtype]
    attrs = {"msa_logical_dtype": identity.dtype}
    C = int(encoded.n_chunks.sum())
    L, H, D, E = identity.n_layers, identity.n_kv_heads, identity.head_dim, identity.hidden_size
    files: dict[str, dict[str, int]] = {}

    def put(name: str, data: np.ndarray, chunks: tuple[int, ...], dims: list[str], logical: bool = True) -> None:
        written = write_array(be, f"{stage}/{name}", data.astype(st, copy=False) if logical else data, chunks,
                              {**(attrs if logical else {}), "dims": dims})
        for rel, (size, crc) in written.items():
            files[f"{name}/{rel}"] = {"size": size, "crc32c": crc}

    group = json.dumps(GROUP_META, indent=2).encode()
    be.write(f"{stage}/zarr.json", group, exclusive=True)
    files["zarr.json"] = {"size": len(group), "crc32c": crc32c.crc32c(group)}
    put("kv", encoded.kv, (1, L, 2, H, D), ["chunk", "layer", "kv", "head", "dim"])
    fault_hook("shard:kv")
    put("k_router", encoded.k_router, (1, C, H, D), ["layer", "chunk", "head", "dim"])
    fault_hook("shard:k_router")
    if E > 0:
        assert encoded.x_router is not None
        put("x_router", encoded.x_router, (1, C, E), ["layer", "chunk", "hidden"])
    chunk_doc = np.repeat(np.asarray(encoded.doc_ids, dtype=np.int64), encoded.n_chunks)  # (C,)
    put("chunk_doc", chunk_doc, (C,), ["chunk"], logical=False)
    if identity.shifted_layers:
        assert encoded.k_router_s is not None
        Cs = int(encoded.k_router_s.shape[1])
        put("k_router_s", encoded.k_router_s, (1, Cs, H, D), ["shifted_layer", "shifted_chunk", "head", "dim"])
        if E > 0:
            assert encoded.x_router_s is not None
            put("x_router_s", encoded.x_router_s, (1, Cs, E), ["shifted_layer", "shifted_chunk", "hidden"])
        fault_hook("shard:k_router_s")
    return files


def _write_tables(be: Backend, passages: Sequence[Passage], encoded: EncodedChunks, shard_id: str, stage: str,
                  lexical: bool) -> dict[str, dict[str, int]]:
    """The shard's document table (Parquet) and, with ``lexical``, its BM25 postings under ``stage``; returns
    {relative path: {size, crc32c}} of the files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(_docs_table(passages, encoded, shard_id), sink, write_page_checksum=True, compression="zstd")
    docs = sink.getvalue()
    be.write(f"{stage}/{DOCS_FILE}", memoryview(docs), exclusive=True)
    fault_hook("shard:docs")
    files = {DOCS_FILE: {"size": docs.size, "crc32c": crc32c.crc32c(memoryview(docs))}}
    if lexical:
        data = _lexical.postings_bytes(encoded.doc_ids, [p.text for p in passages])
        be.write(f"{stage}/{_lexical.postings_file()}", data, exclusive=True)
        files[_lexical.postings_file()] = {"size": len(data), "crc32c": crc32c.crc32c(data)}
        fault_hook("shard:lexical")
    return files


def read_record(root: Backend | str | os.PathLike[str], shard_id: str, expect_crc: int | None = None) -> ShardRecord:
    be = open_backend(root)
    path = f"{be}/{SHARDS_DIR}/{shard_id}/{RECORD_FILE}"
    try:
        data = be.read(f"{SHARDS_DIR}/{shard_id}/{RECORD_FILE}")
    except (FileNotFoundError, NotADirectoryError):
        raise ShardMissingError(f"Shard {shard_id!r} is missing from store {str(be)!r} ({path}).",
                                hint="Restore the shard directory from a backup, or open an older version.") from None
    if expect_crc is not None and crc32c.crc32c(data) != expect_crc:
        from msa_memory.errors import ShardCorruptError

        raise ShardCorruptError(f"Shard record {path} fails its checksum.",
                                hint="Run `msa store verify` to see the damage; re-encode the shard's documents.")
    try:
        rec = ShardRecord.from_dict(json.loads(data))
    except Exception as e:  # noqa: BLE001
        raise ManifestCorruptError(f"Shard record {path} is corrupt ({e}).",
                                   hint="Run `msa store verify STORE`; re-encode the shard's documents.") from None
    # ids and paths a record gives are used to build paths: refuse any that could lead elsewhere
    if rec.shard_id != shard_id:
        raise ManifestCorruptError(f"Shard record {path}: field shard_id is {rec.shard_id!r}, not the shard's "
                                   f"folder name {shard_id!r}.",
                                   hint="The record was damaged or copied from another shard; run `msa store verify STORE`.")
    bad = next((k for k in rec.files if not is_rel_path(k)), None)
    if bad is not None:
        raise ManifestCorruptError(f"Shard record {path}: field files names {bad!r}, not a path inside the shard "
                                   "folder (components of A-Z a-z 0-9 . _ -, none empty, '.', '..' or hidden).",
                                   hint="The record was damaged or written by other software; run `msa store verify STORE`.")
    return rec


def verify_files(be: Backend, record: ShardRecord) -> list[tuple[str, str]]:
    """(relative path, problem) for every file of the shard that is missing or fails its checksum."""
    return check_files(be, f"{SHARDS_DIR}/{record.shard_id}", record.files)


class ShardView:
    """Read access to one committed shard (arrays opened lazily, indexes cached)."""

    def __init__(self, be: Backend, record: ShardRecord, identity: StoreIdentity) -> None:
        self.be, self.record, self.identity = be, record, identity
        self.base = f"{SHARDS_DIR}/{record.shard_id}"
        self._arrays: dict[str, ArrayReader] = {}
        self._sorted: tuple[np.ndarray, np.ndarray] | None = None

    def array(self, name: str) -> ArrayReader:
        if name not in self._arrays:
            idt, C = self.identity, self.record.n_chunks
            L, H, D, E = idt.n_layers, idt.n_kv_heads, idt.head_dim, idt.hidden_size
            Ls, Cs = len(idt.shifted_layers), int(self.shifted_offsets[-1])
            st = STORAGE_DTYPES[idt.dtype]
            spec: dict[str, tuple[tuple[int, ...], tuple[int, ...], Any]] = {
                "kv": ((C, L, 2, H, D), (1, L, 2, H, D), st),
                "k_router": ((L, C, H, D), (1, C, H, D), st),
                "x_router": ((L, C, E), (1, C, E), st),
                "chunk_doc": ((C,), (C,), np.dtype(np.int64)),
                "k_router_s": ((Ls, Cs, H, D), (1, Cs, H, D), st),
                "x_router_s": ((Ls, Cs, E), (1, Cs, E), st),
            }
            shape, chunk, dt = spec[name]
            key = shard_file(f"{self.base}/{name}", len(shape))
            self._arrays[name] = ArrayReader(self.be, key, shape, chunk, dt,
                                             f"shard {self.record.shard_id!r} array {name!r}")
        return self._arrays[name]

    @property
    def shifted_offsets(self) -> np.ndarray:
        """(N+1,) offsets of each document's chunks in ``k_router_s`` / ``x_router_s``."""
        return shifted_offsets(self.identity, self.record)

    def positions(self, doc_ids: np.ndarray) -> np.ndarray:
        """(N,) index of each id in the shard, -1 where absent."""
        if self._sorted is None:
            order = np.argsort(self.record.doc_ids, kind="stable")
            self._sorted = (self.record.doc_ids[order], order)
        keys, order = self._sorted
        pos = np.searchsorted(keys, doc_ids)
        pos = np.minimum(pos, keys.size - 1)
        return np.where(keys[pos] == doc_ids, order[pos], -1)

    def table(self, columns: list[str] | None = None) -> Any:
        """The shard's document rows (Parquet page checksums verified)."""
        from msa_memory.errors import ShardCorruptError

        path = f"{self.be}/{self.base}/{DOCS_FILE}"
        tab = read_parquet(self.be, f"{self.base}/{DOCS_FILE}", f"Document table {path}",
                           "Run `msa store verify`; re-encode the shard's documents.", columns,
                           missing_hint="Restore the shard directory from a backup, or open an older version.")
        if tab.num_rows != self.record.n_docs:
            raise ShardCorruptError(f"Document table {path} has {tab.num_rows} rows, its record {self.record.n_docs}.",
                                    hint="Run `msa store verify`; re-encode the shard's documents.")
        return tab


def keys_reader(be: Backend, entry: dict[str, Any], identity: StoreIdentity, n_chunks: int,
                shifted: bool = False) -> ArrayReader:
    """Reader of the (L, C, H, D) router-key array a shard entry's ``router_keys`` names (a reindexed version's
    keys, ``rekey.py``; ``shifted``: its (Ls, Cs, H, D) ``k_router_s`` beside it)."""
    L = len(identity.shifted_layers) if shifted else identity.n_layers
    H, D = identity.n_kv_heads, identity.head_dim
    name = "k_router_s" if shifted else "k_router"
    key = shard_file(f"{entry['router_keys']['path']}/{name}", 4)
    return ArrayReader(be, key, (L, n_chunks, H, D), (1, n_chunks, H, D), STORAGE_DTYPES[identity.dtype],
                       f"router keys {entry['router_keys']['path']!r}/{name} of shard {entry['shard_id']!r}")
