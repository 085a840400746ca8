"""MemoryStore: a read snapshot (``reader.Snapshot``) with the writer verbs bound, and the two ways in.

The reader reads and the writer modules write: ``commit.py`` (commit, restore, tag, reserve_ids,
find_shard), ``rekey.py`` (router and lexical reindexes), ``maintenance.py`` (compact, gc, verify).
None of them imports this module; they take a snapshot and return ``snapshot.checkout_version(N)``,
so a verb called on a MemoryStore returns a MemoryStore. This module sits on top of all of them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from msa_memory.errors import StoreExistsError
from msa_memory.schemas.records import ShardRecord, StoreIdentity
from msa_memory.store import _manifest, commit, maintenance, rekey
from msa_memory.store._layout import IDENTITY_FILE, SHARDS_DIR, STAGING_DIR, TAGS_DIR, VERSIONS_DIR, now_iso, open_backend
from msa_memory.store.backend import Backend
from msa_memory.store.reader import Snapshot

__all__ = ["MemoryStore", "create_store", "open_store"]


class MemoryStore(Snapshot):
    """Snapshot of version ``version`` of the store at ``root``, with the verbs that publish new versions
    (see docs/design.md, section store; ``reader.Snapshot`` for the reading side)."""

    def reserve_ids(self, n: int, *, lock_timeout: float = 60.0) -> np.ndarray:
        """(n,) int64 fresh document ids, durable before return and never handed out again."""
        return commit.reserve_ids(self, n, lock_timeout=lock_timeout)

    def commit(self, add: Sequence[ShardRecord] = (), delete_ids: Iterable[int] = (),
               delete_paths: Iterable[str] = (), message: str = "", read_version: int | None = None, *,
               lock_timeout: float = 60.0, extra: dict[str, Any] | None = None) -> MemoryStore:
        """Publish version N+1 (add shards, delete ids/paths; both = replace). See ``commit.commit``."""
        return commit.commit(self, add, delete_ids, delete_paths, message, read_version, lock_timeout=lock_timeout,
                             extra=extra)

    def rekey(self, router: dict[str, Any], keys_fn: Any, *, message: str = "", read_version: int | None = None,
              lock_timeout: float = 60.0, log: Any = None, shifted_keys_fn: Any = None) -> MemoryStore:
        """Publish version N+1 with every shard's router keys recomputed from its kept router inputs
        by ``keys_fn(shard_id, x_router)`` (and ``shifted_keys_fn(shard_id, x_router_s)`` for a shifted
        grid) under ``router`` (see ``rekey.rekey``)."""
        return rekey.rekey(self, router, keys_fn, message=message, read_version=read_version,
                           lock_timeout=lock_timeout, log=log, shifted_keys_fn=shifted_keys_fn)

    def relabel(self, router: dict[str, Any], *, message: str = "", read_version: int | None = None,
                lock_timeout: float = 60.0) -> MemoryStore:
        """Publish version N+1 under ``router``, a router with the version's key projections, every shard's
        router keys kept (see ``rekey.relabel``; no router inputs needed)."""
        return rekey.relabel(self, router, message=message, read_version=read_version, lock_timeout=lock_timeout)

    def reindex_lexical(self, *, message: str = "", read_version: int | None = None, lock_timeout: float = 60.0,
                        log: Any = None) -> MemoryStore:
        """Publish version N+1 with lexical postings for every shard that lacks them (sidecars written from the
        stored text, no re-encoding); this snapshot when none lacks them (see ``lexical.reindex_lexical``)."""
        return rekey.reindex_lexical(self, message=message, read_version=read_version, lock_timeout=lock_timeout,
                                       log=log)

    def restore(self, version: int | str, message: str | None = None) -> MemoryStore:
        """Publish a new version equal to ``version``."""
        return commit.restore(self, version, message)

    def tag(self, name: str, version: int | None = None, *, force: bool = False) -> None:
        """Tag ``version`` (default: this snapshot's) as ``name``."""
        commit.tag(self, name, version, force=force)

    def delete_tag(self, name: str) -> None:
        """Remove tag ``name`` (VersionNotFoundError when there is none)."""
        _manifest.delete_tag(self.backend, name)

    def find_shard(self, shard_id: str) -> ShardRecord | None:
        """An uncommitted, checksum-verified shard's record (to resume a job), else None."""
        return commit.find_shard(self, shard_id)

    def compact(self, min_dead_fraction: float = 0.0, message: str = "compact", *,
                merge_below_chunks: int = 0) -> MemoryStore:
        """Rewrite shards holding deleted documents (and merge small ones); see maintenance.compact."""
        return maintenance.compact(self, min_dead_fraction, message, merge_below_chunks=merge_below_chunks)

    def gc(self, dry_run: bool = True, *, keep_last: int | None = None, grace_s: float = 3600.0) -> dict[str, Any]:
        """List (dry run) or remove files no kept version references (see maintenance.gc)."""
        return maintenance.gc(self, dry_run, keep_last=keep_last, grace_s=grace_s)

    def verify(self) -> dict[str, Any]:
        """Check every file of this version; report corrupt/missing files and the documents they hold."""
        return maintenance.verify(self)


def create_store(root: str | os.PathLike[str] | Backend, identity: StoreIdentity, message: str = "create", *,
                 exist_ok: bool = False) -> MemoryStore:
    """Create an empty store (version 0) at ``root``; with ``exist_ok`` open a compatible existing one.

    Raises StoreExistsError (a store or other files are already there), IdentityMismatchError
    (``exist_ok`` and the existing store has another identity).
    """
    be = open_backend(root)
    if be.exists(IDENTITY_FILE):
        if exist_ok:
            store = MemoryStore(be)
            store.check_identity(identity)
            return store
        raise StoreExistsError(f"A store already exists at {str(be)!r}.",
                               hint="Open it with open_store(), or pass exist_ok=True / choose another path.")
    if be.list(""):
        raise StoreExistsError(f"{str(be)!r} exists and is not an empty directory; refusing to create a store there.",
                               hint="Choose a new or empty directory.")
    for prefix in (VERSIONS_DIR, SHARDS_DIR, STAGING_DIR, TAGS_DIR):
        be.make_prefix(prefix)
    with commit.writer_lock(be, action="creating a store"):
        if be.exists(IDENTITY_FILE):
            raise StoreExistsError(f"A store was created concurrently at {str(be)!r}.")
        _manifest.write_identity(be, identity, now_iso())
        return commit.publish_first(be, message, MemoryStore)


def open_store(root: str | os.PathLike[str] | Backend, version: int | str | None = None) -> MemoryStore:
    """Open a read snapshot of ``version`` (None = latest, int, or tag name) of the store at ``root``."""
    return MemoryStore(root, version)
