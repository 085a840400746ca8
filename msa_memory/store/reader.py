"""Snapshot: a read snapshot of one version of a store. It reads; it never publishes.

Opening reads the identity record and one manifest: nothing that grows with the corpus except
the manifest's shard list. Everything else is lazy and cached on the object: shard records
(doc ids and chunk offsets) when a document is looked up, deletion files when liveness matters,
router keys when asked for, K̄V̄ of the requested documents only. A snapshot only reads files that
its manifest names, and those never change, so a reader of version N never sees later writes.

A snapshot leases its version (``_leases.py``: at open for an explicit version, after a minute of use
for the latest) and gc keeps leased and recently superseded versions within its grace period, so the
files a snapshot opened within that period reads stay there. The writer verbs (``commit``,
``restore``, ``rekey``, ``compact``, ``gc``, ``tag``, ``reserve_ids``) live in ``commit.py``,
``rekey.py`` and ``maintenance.py``; ``api.MemoryStore`` is a Snapshot with them bound, and each
returns a new snapshot of its own class (``checkout_version``).
``identity`` is the stored identity record with this version's router (``router``; a reindex can
give a version another router than the one the store was created with, see ``rekey.py``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from msa_memory.errors import DocumentNotFoundError, IdentityMismatchError, ManifestCorruptError
from msa_memory.schemas.records import STORAGE_DTYPES, ShardRecord, StoreIdentity, identity_sha256
from msa_memory.store import _manifest
from msa_memory.store._layout import open_backend
from msa_memory.store._leases import Lease
from msa_memory.store._manifest import version_router
from msa_memory.store.backend import Backend
from msa_memory.store.lexical import ANALYZER, LexicalIndex, lexical_source
from msa_memory.store.shards import ShardView, chunk_bytes, keys_reader, read_record


class Snapshot:
    """Read snapshot of version ``version`` (None = latest, int, or tag) of the store at ``root`` (a folder,
    ``memory://NAME`` or a :class:`Backend`). It holds a lease on its version (``_leases.py``; taken at open
    for an explicit version, once in use for a minute for the latest); ``lease=False`` holds none (gc may
    then remove an old version under it)."""

    def __init__(self, root: str | os.PathLike[str] | Backend, version: int | str | None = None, *,
                 lease: bool = True) -> None:
        #: where the store's keys live (``backend.py``); ``root`` is its location as given (a Path for a folder)
        self.backend: Backend = open_backend(root)
        self.root: Any = self.backend.root
        #: the identity record as written at creation (msa_store.json); shard records hash this one
        self.stored_identity: StoreIdentity = _manifest.read_identity(self.backend)
        self.version: int = _manifest.resolve_version(self.backend, version)
        # the lease goes first: a gc that removes this version's manifest after we read it sees the lease
        self._lease = Lease(self, self.backend, self.version, eager=version is not None) if lease else None
        try:
            self.manifest: dict[str, Any] = _manifest.read_manifest(self.backend, self.version)
        except BaseException:
            self.release()
            raise
        self._identity_sha = identity_sha256(self.stored_identity)
        if self.manifest["identity_sha256"] != self._identity_sha:
            raise IdentityMismatchError(
                f"Version {self.version} of {str(self.root)!r} was written for another identity than msa_store.json.",
                hint="The identity record was replaced; restore the original msa_store.json.")
        #: this version's router (``rekey.version_router``): the identity's unless a reindex replaced it
        self.router: dict[str, Any] = version_router(self.manifest, self.stored_identity)
        if [int(x) for x in self.router["router_layers"]] != list(self.stored_identity.router_layers):
            raise ManifestCorruptError(
                f"Version {self.version} of {str(self.root)!r} names router layers {self.router['router_layers']}, "
                f"not the store's {list(self.stored_identity.router_layers)}.",
                hint="The manifest was damaged or written by other software; open an older version.")
        #: the identity of this version: the stored record with this version's router id
        self.identity: StoreIdentity = (self.stored_identity if self.router["router_id"] ==
                                        self.stored_identity.router_id else
                                        dataclasses.replace(self.stored_identity, router_id=self.router["router_id"]))
        self._shard_entries: list[dict[str, Any]] = self.manifest["shards"]
        self._views: dict[str, ShardView] = {}
        self._deleted: dict[str, np.ndarray] | None = None
        self._table_cache: dict[str, Any] = {}
        self._range_index: tuple[np.ndarray, np.ndarray, np.ndarray, bool] | None = None
        self._key_readers: dict[str, Any] = {}
        self._key_cache: Any = None

    # ------------------------------------------------------------------ metadata
    def __repr__(self) -> str:
        s = self.manifest["stats"]
        idt = self.identity
        return (f"{type(self).__name__}({str(self.root)!r}, version={self.version}, docs={s['n_docs']}, chunks={s['n_chunks']}, "
                f"layers={list(idt.router_layers)}, dtype={idt.dtype}, bytes={s['n_bytes']})")

    def _repr_html_(self) -> str:
        import html

        s, idt = self.stats(), self.identity
        rows = [("root", str(self.root)), ("version", f"{self.version} (latest {self.latest_version()})"),
                ("documents", f"{s['n_docs']:,}"), ("chunks", f"{s['n_chunks']:,}"), ("tokens", f"{s['n_tokens']:,}"),
                ("model", idt.model_name), ("router layers", str(list(idt.router_layers))),
                ("shifted grid at", str(list(idt.shifted_layers)) if idt.shifted_layers else "none"),
                ("layout", f"H={idt.n_kv_heads} D={idt.head_dim} P={idt.chunk_tokens} {idt.dtype}"),
                ("bytes", f"{s['n_bytes']:,} live tensors, {s['disk_bytes']:,} on disk, "
                          f"{s['bytes_per_token']:.1f} B/token"), ("shards", str(s["n_shards"]))]
        body = "".join(f"<tr><th style='text-align:left'>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
                       for k, v in rows)
        return f"<table><caption>{type(self).__name__}</caption>{body}</table>"

    def latest_version(self) -> int:
        return _manifest.latest_version(self.backend)

    def versions(self) -> list[dict[str, Any]]:
        """One dict per published version: version, timestamp, message, n_docs, n_chunks, operation, router_id."""
        out = []
        for v in _manifest.list_versions(self.backend):
            m = _manifest.read_manifest(self.backend, v)
            out.append({"version": v, "timestamp": m["timestamp"], "message": m["message"],
                        "n_docs": m["stats"]["n_docs"], "n_chunks": m["stats"]["n_chunks"],
                        "operation": m["operation"],
                        "router_id": version_router(m, self.stored_identity)["router_id"]})
        return out

    def tags(self) -> dict[str, int]:
        return _manifest.read_tags(self.backend)

    def checkout_version(self, version: int | str | None, *, lease: bool = True) -> Any:
        """A snapshot of ``version`` (None = latest) of the same store, of this snapshot's class."""
        return type(self)(self.backend, version, lease=lease)

    def _published(self, version: int) -> Any:
        """The snapshot of ``version``, just published by this process (the latest: its lease is lazy)."""
        snap = type(self)(self.backend, version, lease=False)
        snap._lease = Lease(snap, snap.backend, version, eager=False)
        return snap

    def release(self) -> None:
        """Drop this snapshot's lease now (it is dropped anyway when the snapshot is garbage-collected)."""
        if self._lease is not None:
            self._lease.release()

    def check_identity(self, identity: StoreIdentity) -> None:
        """Raise IdentityMismatchError unless ``identity`` may read/append to this store."""
        diff = self.identity.compatible_with(identity)
        if diff == ["router_id"]:
            match = [v["version"] for v in self.versions() if v["router_id"] == identity.router_id]
            shown = ("[..., " + ", ".join(map(str, match[-8:])) + "]") if len(match) > 8 else str(match)
            where = (f"versions {shown} of this store use router {identity.router_id[:16]}: open one of them "
                     f"(open_store(root, version={match[-1]})) or reindex with this router's adapter"
                     if match else "no version of this store uses it: reindex the store with this router's adapter "
                     "(`msa store reindex-router STORE --adapter DIR`)")
            raise IdentityMismatchError(
                f"Version {self.version} of store {str(self.root)!r} is routed by router {self.identity.router_id[:16]}, "
                f"the model given has router {identity.router_id[:16]}.",
                hint=f"Load the model with the adapter of router {self.identity.router_id[:16]}; {where}.")
        if diff:
            raise IdentityMismatchError(
                f"Store {str(self.root)!r} was built with a different model/router: fields {diff} differ "
                f"(store: { {k: getattr(self.identity, k) for k in diff} }, "
                f"given: { {k: getattr(identity, k) for k in diff} }).",
                hint="Use the model and router adapter the store was built with, or encode into a new store.")

    def stats(self) -> dict[str, Any]:
        s = dict(self.manifest["stats"])
        s["bytes_per_token"] = s["n_bytes"] / s["n_tokens"] if s["n_tokens"] else 0.0
        s["bytes_per_chunk"] = chunk_bytes(self.identity)
        s["disk_bytes"] = int(sum(e["n_bytes"] for e in self._shard_entries)
                              + sum(f["size"] for e in self._shard_entries if "router_keys" in e
                                    for f in e["router_keys"]["files"].values())
                              + sum(e["lexical"]["size"] for e in self._shard_entries if "lexical" in e))
        s["n_shards"] = len(self._shard_entries)
        s["n_deletion_files"] = len(self.manifest["deletions"])
        s["version"] = self.version
        return s

    def router_key_bytes(self) -> int:
        """Bytes of this version's live router keys: every router layer's aligned chunks plus, at the shifted
        layers, the shifted grid's (section 11 of store-format.md). ``runtime.Memory`` holds them all resident."""
        ident = self.identity
        rows = int(self.manifest["stats"]["n_chunks"]) * ident.n_layers
        if ident.shifted_layers:   # live documents' shifted chunks, from the shard records' token counts
            live_s = sum(int(np.diff(self._view(e["shard_id"]).shifted_offsets)[self._live_mask(e["shard_id"])].sum())
                         for e in self._shard_entries)
            rows += live_s * len(ident.shifted_layers)
        return rows * ident.n_kv_heads * ident.head_dim * STORAGE_DTYPES[ident.dtype].itemsize

    # ------------------------------------------------------------------ shard / doc lookup
    def _view(self, shard_id: str) -> ShardView:
        if self._lease is not None:
            self._lease.renew()
        v = self._views.get(shard_id)
        if v is None:
            entry = next(e for e in self._shard_entries if e["shard_id"] == shard_id)
            rec = read_record(self.backend, shard_id, expect_crc=entry["record_crc32c"])
            v = self._views[shard_id] = ShardView(self.backend, rec, self.identity)
        return v

    def _keys(self, entry: dict[str, Any], shifted: bool = False) -> Any:
        """Reader of a shard's router keys under this version's router (reindexed ones, rekey.py)."""
        key = ("rks:" if shifted else "rk:") + entry["shard_id"]
        r = self._key_readers.get(key)
        if r is None:
            view = self._view(entry["shard_id"])
            n = int(view.shifted_offsets[-1]) if shifted else view.record.n_chunks
            r = self._key_readers[key] = keys_reader(self.backend, entry, self.identity, n, shifted=shifted)
        return r

    def shard_router_keys(self, shard_id: str, shifted: bool = False) -> Any:
        """ArrayReader of shard ``shard_id``'s (L, C, H, D) router keys as this version routes them
        (``shifted``: its (Ls, Cs, H, D) keys over the shifted grid)."""
        entry = next(e for e in self._shard_entries if e["shard_id"] == shard_id)
        if "router_keys" in entry:
            return self._keys(entry, shifted)
        return self._view(shard_id).array("k_router_s" if shifted else "k_router")

    def _records(self) -> list[ShardRecord]:
        return [self._view(e["shard_id"]).record for e in self._shard_entries]

    def deleted(self) -> dict[str, np.ndarray]:
        """shard_id -> sorted int64 ids deleted from that shard (only shards of this version)."""
        if self._deleted is None:
            live_shards = {e["shard_id"] for e in self._shard_entries}
            acc: dict[str, list[int]] = {}
            for entry in self.manifest["deletions"]:
                for sid, ids in _manifest.read_deletions(self.backend, entry).items():
                    if sid in live_shards:
                        acc.setdefault(sid, []).extend(ids)
            self._deleted = {k: np.unique(np.asarray(v, dtype=np.int64)) for k, v in acc.items()}
        return self._deleted

    def _live_mask(self, shard_id: str) -> np.ndarray:
        """(N_shard,) bool over the shard's documents."""
        rec = self._view(shard_id).record
        dead = self.deleted().get(shard_id)
        if dead is None or dead.size == 0:
            return np.ones(rec.n_docs, dtype=bool)
        return ~np.isin(rec.doc_ids, dead)

    def _candidates(self, ids: np.ndarray) -> Iterator[tuple[dict[str, Any], np.ndarray]]:
        """(shard entry, indices into ``ids`` whose id lies in the shard's id range), per shard."""
        if self._range_index is None:
            mins = np.array([e["doc_id_min"] for e in self._shard_entries], dtype=np.int64)
            maxs = np.array([e["doc_id_max"] for e in self._shard_entries], dtype=np.int64)
            order = np.argsort(mins, kind="stable")
            disjoint = bool(np.all(mins[order][1:] > maxs[order][:-1]))
            self._range_index = (mins[order], maxs[order], order, disjoint)
        mins, maxs, order, disjoint = self._range_index
        if not disjoint:  # overlapping id ranges (interleaved reservations): test every shard
            for e in self._shard_entries:
                cand = np.flatnonzero((ids >= e["doc_id_min"]) & (ids <= e["doc_id_max"]))
                if cand.size:
                    yield e, cand
            return
        slot = np.searchsorted(mins, ids, side="right") - 1  # the only shard whose range may hold each id
        inside = slot >= 0
        inside[inside] = ids[inside] <= maxs[slot[inside]]
        for s in np.unique(slot[inside]):
            yield self._shard_entries[int(order[s])], np.flatnonzero(inside & (slot == s))

    def locate(self, doc_ids: Iterable[int]) -> list[tuple[str, int]]:
        """(shard_id, position in shard) of each live id; DocumentNotFoundError for any other."""
        ids = np.asarray(list(doc_ids) if not isinstance(doc_ids, np.ndarray) else doc_ids, dtype=np.int64).reshape(-1)
        out: list[tuple[str, int] | None] = [None] * ids.size
        deleted = self.deleted()
        for e, cand in self._candidates(ids):
            view = self._view(e["shard_id"])
            pos = view.positions(ids[cand])
            dead = deleted.get(e["shard_id"])
            ok = pos >= 0
            if dead is not None:
                ok &= ~np.isin(ids[cand], dead)
            for i, p in zip(cand[ok], pos[ok]):
                if out[i] is None:
                    out[i] = (e["shard_id"], int(p))
        missing = [int(ids[i]) for i, o in enumerate(out) if o is None]
        if missing:
            raise DocumentNotFoundError(
                f"Document ids {missing[:10]}{' ...' if len(missing) > 10 else ''} are not live in version "
                f"{self.version} of {str(self.root)!r}.",
                hint="List live documents with store.documents(columns=['doc_id']) or `msa store docs`.")
        return out  # type: ignore[return-value]

    # ------------------------------------------------------------------ tensors
    def router_keys(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """Live router keys of router-layer position ``layer``: ((C, H, D) storage dtype, (C,) int64 doc ids)."""
        return self._per_layer("k_router", layer)

    def router_keys_shifted(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        """Live router keys over the shifted grid at the j-th shifted layer (``identity.shifted_layers[j]``):
        ((Cs, H, D) storage dtype, (Cs,) int64 doc ids), documents in the order of :meth:`router_keys`."""
        return self._per_layer("k_router_s", j)

    def router_inputs(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """Live pooled router-layer inputs ((C, E) storage dtype, (C,) doc ids); needs identity.hidden_size > 0."""
        self._need_inputs()
        return self._per_layer("x_router", layer)

    def router_inputs_shifted(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        """Live pooled inputs over the shifted grid at the j-th shifted layer ((Cs, E), (Cs,) doc ids)."""
        self._need_inputs()
        return self._per_layer("x_router_s", j)

    def _need_inputs(self) -> None:
        if self.identity.hidden_size <= 0:
            from msa_memory.errors import ConfigError

            raise ConfigError(f"Store {str(self.root)!r} keeps no router inputs (identity.hidden_size=0).",
                              hint="Encode with keep_router_inputs=True into a new store to have them.")

    def _per_layer(self, name: str, layer: int) -> tuple[np.ndarray, np.ndarray]:
        idt = self.identity
        shifted = name.endswith("_s")
        L = len(idt.shifted_layers) if shifted else idt.n_layers
        if not isinstance(layer, (int, np.integer)) or not 0 <= int(layer) < L:
            from msa_memory.errors import ConfigError

            what = (f"{L} shifted router layers (decoder layers {list(idt.shifted_layers)})" if shifted else
                    f"{L} router layers (decoder layers {list(idt.router_layers)})")
            raise ConfigError(f"{'Shifted' if shifted else 'Router'} layer position {layer!r} out of range: the store "
                              f"has {what}" + (f"; pass 0..{L - 1}." if L else "."))
        tail = ((idt.n_kv_heads, idt.head_dim) if name.startswith("k_router") else (idt.hidden_size,))
        keys, docs = [], []
        for e in self._shard_entries:
            view = self._view(e["shard_id"])
            rec = view.record
            counts = np.diff(view.shifted_offsets if shifted else rec.chunk_offsets)
            # this version's keys: a reindexed shard's router_keys arrays, else the shard's own (entry at hand:
            # shard_router_keys would look it up again, once per shard)
            src = self._keys(e, shifted) if name.startswith("k_router") and "router_keys" in e else view.array(name)
            if name.startswith("k_router") and getattr(self.backend, "remote", False):  # object storage: cached
                rk = e.get("router_keys", {}).get("path", "")
                block = self.key_cache().block(f"{src.key}|{e['record_crc32c']}|{rk}|{int(layer)}",
                                               (int(counts.sum()), *tail), STORAGE_DTYPES[idt.dtype],
                                               lambda src=src: src.read(int(layer), int(layer) + 1)[0])
            else:
                block = src.read(int(layer), int(layer) + 1)[0]  # (C_shard, *tail)
            chunk_doc = np.repeat(rec.doc_ids, counts)
            live = self._live_mask(e["shard_id"])
            if not live.all():
                keep = np.repeat(live, counts)
                block, chunk_doc = block[keep], chunk_doc[keep]
            keys.append(block)
            docs.append(chunk_doc)
        st = STORAGE_DTYPES[self.identity.dtype]
        if not keys:
            return np.empty((0, *tail), dtype=st), np.empty((0,), dtype=np.int64)
        return np.concatenate(keys), np.concatenate(docs)

    def key_cache(self) -> Any:
        """The local cache of this store's router keys (``_cache.RouterKeyCache``; used on remote backends)."""
        if self._key_cache is None:
            from msa_memory.store._cache import RouterKeyCache

            self._key_cache = RouterKeyCache(str(self.root))
        return self._key_cache

    def io_stats(self) -> dict[str, Any]:
        """What reading this store cost so far in this process: the backend's requests and bytes (remote
        backends count them; {} otherwise) and the router-key cache's hits and bytes (None when unused)."""
        return {"store": str(self.root), "backend": dict(getattr(self.backend, "stats", {})),
                "router_key_cache": self._key_cache.info() if self._key_cache is not None else None}

    def load_kv(self, doc_ids: Sequence[int] | np.ndarray) -> list[np.ndarray]:
        """Content K̄V̄ of each id, in the given order: (C_d, L, 2, H, D) storage dtype, one read per doc."""
        locs = self.locate(doc_ids)
        out: list[np.ndarray | None] = [None] * len(locs)
        by_shard: dict[str, list[int]] = {}
        for i, (sid, _) in enumerate(locs):
            by_shard.setdefault(sid, []).append(i)
        for sid, members in by_shard.items():  # one open per shard, one pread per document
            view = self._view(sid)
            offs = view.record.chunk_offsets
            ranges = [(int(offs[locs[i][1]]), int(offs[locs[i][1] + 1])) for i in members]
            for i, arr in zip(members, view.array("kv").read_many(ranges)):
                out[i] = arr
        return out  # type: ignore[return-value]

    def texts(self, doc_ids: Sequence[int] | np.ndarray) -> list[str]:
        """Raw text of each id, in the given order."""
        locs = self.locate(doc_ids)
        out: list[str] = []
        for sid, pos in locs:
            col = self._table_cache.get(sid)
            if col is None:
                if len(self._table_cache) >= 16:
                    self._table_cache.pop(next(iter(self._table_cache)))
                tab = self._view(sid).table(["doc_id", "text"])
                rec = self._view(sid).record
                if not np.array_equal(tab.column("doc_id").to_numpy(), rec.doc_ids):
                    from msa_memory.errors import ShardCorruptError

                    raise ShardCorruptError(f"Document table of shard {sid!r} does not match its record.",
                                            hint="Run `msa store verify`.")
                col = self._table_cache[sid] = tab.column("text")
            out.append(col[pos].as_py())
        return out

    def documents(self, columns: Sequence[str] | None = None) -> Any:
        """Live documents as a ``pyarrow.Table`` (columns of ``schemas.arrow.DOCUMENT_SCHEMA``)."""
        import pyarrow as pa

        from msa_memory.schemas.arrow import DOCUMENT_COLUMNS, DOCUMENT_SCHEMA

        cols = list(columns) if columns is not None else list(DOCUMENT_COLUMNS)
        unknown = [c for c in cols if c not in DOCUMENT_COLUMNS]
        if unknown:
            from msa_memory.errors import ConfigError

            raise ConfigError(f"Unknown document columns {unknown}; available: {list(DOCUMENT_COLUMNS)}.")
        schema = pa.schema([DOCUMENT_SCHEMA.field(c) for c in cols])
        parts = []
        for e in self._shard_entries:
            view = self._view(e["shard_id"])
            tab = view.table(cols)
            live = self._live_mask(e["shard_id"])
            if not live.all():
                tab = tab.filter(pa.array(live))
            parts.append(tab.cast(schema))
        if not parts:
            return schema.empty_table()
        return pa.concat_tables(parts)

    # ------------------------------------------------------------------ lexical index (read side)
    def lexical_index(self, doc_ids: np.ndarray | None = None) -> Any:
        """BM25 over this version's live documents (``lexical.LexicalIndex``; ``doc_ids`` their order, default
        sorted ids). ConfigError when a shard has no lexical postings: ``reindex_lexical`` adds them."""
        return LexicalIndex.from_store(self, doc_ids)

    def lexical_info(self) -> dict[str, Any]:
        """``{"analyzer", "n_shards", "indexed_shards", "complete"}``: how many shards of this version have
        lexical postings of the analyzer this release reads (``complete``: all, what hybrid retrieval needs)."""
        n = sum(1 for e in self._shard_entries if (src := lexical_source(self, e)) is not None
                and src.analyzer == ANALYZER)
        return {"analyzer": ANALYZER, "n_shards": len(self._shard_entries), "indexed_shards": n,
                "complete": n == len(self._shard_entries)}
