"""Publishing versions: create, commit (add / delete / replace), restore, reserve ids, tags, resume.

Commit protocol (docs/store-format.md): take the cross-process writer lock; check that the latest
version is the one the writer read (else VersionConflictError, nothing published); validate the
added shards (complete, same identity, ids reserved and never used) and the deletions (live ids,
known paths); write a small deletion file; then publish ``versions/{N+1:08d}.json`` by exclusive
create. That create is the only commit point: a crash anywhere before it leaves version N intact
and at most orphan files (staging dirs, uncommitted shards, deletion files) that ``gc`` removes.
A commit's cost is O(shards in the manifest + documents it touches), not O(documents in the store).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import crc32c
import numpy as np

from msa_memory.errors import (
    ConfigError,
    DocumentNotFoundError,
    DuplicateDocumentError,
    IdentityMismatchError,
    LockTimeoutError,
    ShardCorruptError,
    ShardMissingError,
    StoreExistsError,
    VersionConflictError,
    VersionNotFoundError,
)
from msa_memory.schemas.records import FORMAT_VERSION, ShardRecord, StoreIdentity, identity_sha256
from msa_memory.store import _ids, _manifest, shards
from msa_memory.store._layout import (
    IDENTITY_FILE,
    LOCK_FILE,
    RECORD_FILE,
    SHARDS_DIR,
    STAGING_DIR,
    TAGS_DIR,
    VERSIONS_DIR,
    check_inside,
    check_layout,
    check_name,
    now_iso,
    os_write_error,
    token,
)
from msa_memory.store.reader import MemoryStore

DEFAULT_LOCK_TIMEOUT = 60.0
#: A commit that would leave more deletion files than this folds them into one.
MAX_DELETION_FILES = 32
_locks: dict[str, Any] = {}
_locks_guard = threading.Lock()


@contextlib.contextmanager
def writer_lock(root: Path, timeout: float = DEFAULT_LOCK_TIMEOUT, action: str = "a write") -> Iterator[None]:
    """Hold the store's cross-process writer lock (re-entrant within one thread).

    Refuses a store whose folders or lock file are links (StoreLayoutError) before opening the lock
    file; a read-only store or a full disk, on taking the lock or in the body, raises
    StoreNotWritableError / DiskFullError naming ``action`` instead of a bare OSError.
    """
    import filelock

    check_layout(root, action)
    key = str(root.resolve() / LOCK_FILE)
    with _locks_guard:
        lock = _locks.get(key)
        if lock is None:
            lock = _locks[key] = filelock.FileLock(key)
    try:
        lock.acquire(timeout=timeout)
    except filelock.Timeout:
        raise LockTimeoutError(
            f"Could not take the writer lock of store {str(root)!r} within {timeout:g} s: another process is "
            "committing or maintaining it.",
            hint=f"Wait and retry, or pass a larger lock_timeout. If no writer runs, remove {key}.",
        ) from None
    except OSError as e:
        err = os_write_error(root, e, action)
        if err is None:
            raise
        raise err from None
    try:
        yield
    except OSError as e:
        err = os_write_error(root, e, action)
        if err is None:
            raise
        raise err from e
    finally:
        lock.release()


def shard_entry(root: Path, rec: ShardRecord) -> dict[str, Any]:
    data = (root / SHARDS_DIR / rec.shard_id / RECORD_FILE).read_bytes()
    return {"shard_id": rec.shard_id, "n_docs": rec.n_docs, "n_chunks": rec.n_chunks,
            "n_tokens": rec.n_tokens_total, "n_bytes": rec.n_bytes + len(data),
            "doc_id_min": int(rec.doc_ids.min()), "doc_id_max": int(rec.doc_ids.max()),
            "record_crc32c": crc32c.crc32c(data)}


def new_manifest(version: int, parent: int | None, operation: str, message: str, identity_sha: str,
                 shard_entries: list[dict[str, Any]], deletions: list[dict[str, Any]],
                 used: _ids.Ranges, stats: dict[str, int], changes: dict[str, Any],
                 extra: dict[str, Any] | None = None, router: dict[str, Any] | None = None) -> dict[str, Any]:
    m = {"format_version": FORMAT_VERSION, "version": version, "parent_version": parent,
         "timestamp": now_iso(), "message": str(message), "operation": operation,
         "identity_sha256": identity_sha, "shards": shard_entries, "deletions": deletions,
         "used_id_ranges": used, "stats": stats, "changes": changes, "extra": extra or {}}
    if router is not None:  # the version's router, when a reindex replaced the identity's (rekey.py)
        m["router"] = router
    return m


def publish(root: Path, manifest: dict[str, Any]) -> MemoryStore:
    shards.fault_hook("commit:before_publish")
    if not _manifest.publish_manifest(root, manifest):
        raise VersionConflictError(
            f"Version {manifest['version']} of {str(root)!r} was published by another writer; nothing was published.",
            hint="Re-open the store and retry the commit.")
    shards.fault_hook("commit:published")
    return MemoryStore(root, manifest["version"])


def create_store(root: str | os.PathLike[str], identity: StoreIdentity, message: str = "create", *,
                 exist_ok: bool = False) -> MemoryStore:
    """Create an empty store (version 0) at ``root``; with ``exist_ok`` open a compatible existing one.

    Raises StoreExistsError (a store or other files are already there), IdentityMismatchError
    (``exist_ok`` and the existing store has another identity).
    """
    root = Path(root)
    if (root / IDENTITY_FILE).exists():
        if exist_ok:
            store = MemoryStore(root)
            store.check_identity(identity)
            return store
        raise StoreExistsError(f"A store already exists at {str(root)!r}.",
                               hint="Open it with open_store(), or pass exist_ok=True / choose another path.")
    if root.exists() and any(root.iterdir()):
        raise StoreExistsError(f"{str(root)!r} exists and is not an empty directory; refusing to create a store there.",
                               hint="Choose a new or empty directory.")
    root.mkdir(parents=True, exist_ok=True)
    for d in (VERSIONS_DIR, SHARDS_DIR, STAGING_DIR, TAGS_DIR):
        (root / d).mkdir(exist_ok=True)
    with writer_lock(root, action="creating a store"):
        if (root / IDENTITY_FILE).exists():
            raise StoreExistsError(f"A store was created concurrently at {str(root)!r}.")
        _manifest.write_identity(root, identity, now_iso())
        m = new_manifest(0, None, "create", message, identity_sha256(identity), [], [], [],
                         {"n_docs": 0, "n_chunks": 0, "n_tokens": 0, "n_bytes": 0},
                         {"added_docs": 0, "deleted_docs": 0, "added_shards": [], "removed_shards": []})
        return publish(root, m)


def open_store(root: str | os.PathLike[str], version: int | str | None = None) -> MemoryStore:
    """Open a read snapshot of ``version`` (None = latest, int, or tag name) of the store at ``root``."""
    return MemoryStore(root, version)


def _check_added(base: MemoryStore, add: Sequence[ShardRecord]) -> list[dict[str, Any]]:
    root, entries = base.root, []
    have = {e["shard_id"] for e in base.manifest["shards"]}
    seen: set[str] = set()
    for rec in add:
        if not isinstance(rec, ShardRecord):
            raise ConfigError(f"commit(add=...) takes ShardRecord objects from write_shard, got {type(rec).__name__}.")
        if rec.shard_id in have or rec.shard_id in seen:
            raise DuplicateDocumentError(f"Shard {rec.shard_id!r} is already part of version {base.version} "
                                         "(or listed twice in this commit).", hint="Commit each shard once.")
        seen.add(rec.shard_id)
        check_inside(root, f"{SHARDS_DIR}/{rec.shard_id}/{RECORD_FILE}", "a commit")
        on_disk = shards.read_record(root, rec.shard_id)
        if on_disk.to_dict() != rec.to_dict():
            raise ShardCorruptError(f"Shard {rec.shard_id!r} on disk does not match the record given to commit.",
                                    hint="Use the record returned by write_shard/find_shard for this store.")
        if rec.identity_sha256 != base._identity_sha:
            raise IdentityMismatchError(f"Shard {rec.shard_id!r} was written for another store identity.",
                                        hint="Encode with the model/router of this store (see `msa store info`).")
        base_dir = root / SHARDS_DIR / rec.shard_id
        for rel, f in rec.files.items():
            try:
                size = (base_dir / rel).stat().st_size
            except FileNotFoundError:
                raise ShardMissingError(f"File {rel!r} of shard {rec.shard_id!r} is missing.",
                                        hint="Rewrite the shard with write_shard.") from None
            if size != f["size"]:
                raise ShardCorruptError(f"File {rel!r} of shard {rec.shard_id!r} has {size} bytes, "
                                        f"its record says {f['size']}.", hint="Rewrite the shard with write_shard.")
        entries.append(shard_entry(root, rec))
    if add:
        shards.check_ids(root, np.concatenate([r.doc_ids for r in add]), used=base.manifest["used_id_ranges"])
    return entries


def _resolve_deletes(base: MemoryStore, delete_ids: Iterable[int], delete_paths: Iterable[str]) -> np.ndarray:
    ids = np.unique(np.asarray(list(delete_ids), dtype=np.int64))
    paths = sorted(set(map(str, delete_paths)))
    if paths:
        tab = base.documents(["doc_id", "source_path"])
        src = np.asarray(tab.column("source_path").to_pylist(), dtype=object)
        hit = np.isin(src, np.asarray(paths, dtype=object))
        missing = sorted(set(paths) - set(src[hit].tolist()))
        if missing:
            raise DocumentNotFoundError(f"No live documents with source paths {missing[:10]} in version "
                                        f"{base.version} of {str(base.root)!r}.",
                                        hint="List sources with store.documents(columns=['source_path']).")
        ids = np.union1d(ids, tab.column("doc_id").to_numpy()[hit])
    return ids


def _checkpoint_deletions(base: MemoryStore, new: dict[str, list[int]], removed: list[str],
                          version: int) -> list[dict[str, Any]]:
    """Fold all deletion files of ``base`` plus ``new`` into one file (Delta-style checkpoint).

    Keeps a version's deletion files few, so opening and the first lookup stay cheap; costs
    O(deleted ids), not O(documents).
    """
    merged: dict[str, set[int]] = {sid: {int(x) for x in ids} for sid, ids in base.deleted().items()
                                   if sid not in removed}
    for sid, ids in new.items():
        merged.setdefault(sid, set()).update(ids)
    merged = {k: v for k, v in merged.items() if v}
    if not merged:
        return []
    return [_manifest.write_deletions(base.root, version, {k: sorted(v) for k, v in sorted(merged.items())})]


def commit(store: MemoryStore, add: Sequence[ShardRecord] = (), delete_ids: Iterable[int] = (),
           delete_paths: Iterable[str] = (), message: str = "", read_version: int | None = None, *,
           lock_timeout: float = DEFAULT_LOCK_TIMEOUT, extra: dict[str, Any] | None = None) -> MemoryStore:
    """Publish version N+1 = ``read_version`` (default: ``store.version``) + ``add`` - deletions.

    Raises VersionConflictError when another commit published after ``read_version`` (nothing is
    published), DocumentNotFoundError (deleting a non-live id or unknown path),
    DuplicateDocumentError / IdNotReservedError (bad ids), IdentityMismatchError, ShardMissingError.
    On any error no manifest was published; leftovers are orphans for ``gc``. ``extra`` (JSON-able
    provenance: job config, package version...) is stored in the manifest's ``extra``.
    """
    if extra is not None:
        try:
            json.dumps(extra)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"commit(extra=...) must be JSON-serialisable: {e}") from None
    root = store.root
    add = list(add)
    rv = store.version if read_version is None else int(read_version)
    with writer_lock(root, lock_timeout, "a commit"):
        shards.fault_hook("commit:locked")
        latest = _manifest.latest_version(root)
        if latest != rv:
            raise VersionConflictError(
                f"Store {str(root)!r} is at version {latest}, but this commit was prepared against version {rv}; "
                "nothing was published.", hint="Re-open the store (open_store), redo the change and commit again.")
        base = store if store.version == rv else MemoryStore(root, rv)
        added = _check_added(base, add)
        del_ids = _resolve_deletes(base, delete_ids, delete_paths)
        deleted: dict[str, list[int]] = {}
        d_docs = d_chunks = d_tokens = d_bytes = 0
        removed: list[str] = []
        if del_ids.size:
            locs = base.locate(del_ids)
            by_shard: dict[str, list[int]] = {}
            for sid, pos in locs:
                by_shard.setdefault(sid, []).append(pos)
                rec = base._view(sid).record
                d_chunks += int(rec.chunk_offsets[pos + 1] - rec.chunk_offsets[pos])
                d_tokens += int(rec.n_tokens[pos])
                d_bytes += shards.tensor_bytes(base.identity, rec.n_tokens[pos:pos + 1])
            d_docs = int(del_ids.size)
            for sid, poss in by_shard.items():
                live_after = base._live_mask(sid)
                live_after[poss] = False
                if not live_after.any():
                    removed.append(sid)  # the whole shard is dead: drop it instead of listing deletions
                else:
                    deleted[sid] = sorted(int(x) for x in base._view(sid).record.doc_ids[poss])
        deletions = list(base.manifest["deletions"])
        if len(deletions) + bool(deleted) > MAX_DELETION_FILES:
            deletions = _checkpoint_deletions(base, deleted, removed, latest + 1)
        elif deleted:
            deletions.append(_manifest.write_deletions(root, latest + 1, deleted))
        shards.fault_hook("commit:deletions")
        old = base.manifest["stats"]
        a_chunks = sum(r.n_chunks for r in add)
        a_tokens = sum(r.n_tokens_total for r in add)
        n_chunks = old["n_chunks"] + a_chunks - d_chunks
        stats = {"n_docs": old["n_docs"] + sum(r.n_docs for r in add) - d_docs, "n_chunks": n_chunks,
                 "n_tokens": old["n_tokens"] + a_tokens - d_tokens,
                 "n_bytes": old["n_bytes"] + sum(shards.tensor_bytes(base.identity, r.n_tokens) for r in add) - d_bytes}
        op = ("replace" if add and del_ids.size else "add" if add else "delete" if del_ids.size else "noop")
        new_ids = _ids.ids_to_ranges(np.concatenate([r.doc_ids for r in add])) if add else []
        m = new_manifest(
            latest + 1, latest, op, message, base._identity_sha,
            [e for e in base.manifest["shards"] if e["shard_id"] not in removed] + added, deletions,
            _ids.union_ranges(base.manifest["used_id_ranges"], new_ids), stats,
            {"added_docs": sum(r.n_docs for r in add), "deleted_docs": d_docs,
             "added_shards": [r.shard_id for r in add], "removed_shards": removed}, extra,
            router=base.manifest.get("router"))
        return publish(root, m)


def restore(store: MemoryStore, version: int | str, message: str | None = None, *,
            lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> MemoryStore:
    """Publish a new version whose content equals ``version`` (ids used since stay used)."""
    root = store.root
    with writer_lock(root, lock_timeout, "restore"):
        old = MemoryStore(root, version)
        check_version_files(old, "restore")
        latest = _manifest.latest_version(root)
        cur = _manifest.read_manifest(root, latest)
        m = new_manifest(
            latest + 1, latest, "restore", message if message is not None else f"restore version {old.version}",
            old._identity_sha, old.manifest["shards"], old.manifest["deletions"],
            _ids.union_ranges(cur["used_id_ranges"], old.manifest["used_id_ranges"]), dict(old.manifest["stats"]),
            {"added_docs": 0, "deleted_docs": 0, "added_shards": [], "removed_shards": [],
             "restored_from": old.version}, router=old.manifest.get("router"))
        return publish(root, m)


def check_version_files(old: MemoryStore, action: str) -> None:
    """Raise unless every shard, router-key array, lexical sidecar and deletion file version ``old`` names is in the store,
    reached without a link (StoreLayoutError) and present (ShardMissingError): what a new version made
    from it will read."""
    root = old.root

    def need(present: bool, what: str) -> None:
        if not present:
            raise ShardMissingError(f"Version {old.version} needs {what}, which gc removed.",
                                    hint="Restore a version that gc kept (see `msa store versions`).")

    for e in old.manifest["shards"]:
        record = f"{SHARDS_DIR}/{e['shard_id']}/{RECORD_FILE}"
        check_inside(root, record, action)
        need((root / record).exists(), f"shard {e['shard_id']!r}")
        # sidecars: re-keyed router keys (a folder) and lexical postings (a file)
        for key, is_present, what in (("router_keys", Path.is_dir, "router keys"),
                                      ("lexical", Path.is_file, "lexical postings")):
            side = e.get(key)
            if side is not None:
                check_inside(root, side["path"], action)
                need(is_present(root / side["path"]), f"{what} {side['path']!r}")
    for d in old.manifest["deletions"]:
        check_inside(root, d["path"], action)


def reserve_ids(store: MemoryStore, n: int, *, lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> np.ndarray:
    """Hand out ``n`` fresh document ids (durable before return; never handed out again)."""
    if not isinstance(n, (int, np.integer)) or n < 0:
        raise ConfigError(f"reserve_ids(n) needs a non-negative int, got {n!r}.")
    with writer_lock(store.root, lock_timeout, "reserving ids"):
        latest = _manifest.read_manifest(store.root, _manifest.latest_version(store.root))
        used = latest["used_id_ranges"]
        start, stop = _ids.bump_next_id(store.root, int(n), floor=used[-1][1] if used else 0)
    return np.arange(start, stop, dtype=np.int64)


def tag(store: MemoryStore, name: str, version: int | None = None, *, force: bool = False) -> None:
    """Point tag ``name`` at ``version`` (default: this snapshot's version)."""
    v = store.version if version is None else int(version)
    if not _manifest.version_file(store.root, v).exists():
        raise VersionNotFoundError(f"Cannot tag version {v}: it does not exist in {str(store.root)!r}.")
    with writer_lock(store.root, action="tagging"):
        if name in _manifest.read_tags(store.root) and not force:
            raise StoreExistsError(f"Tag {name!r} already exists (version {_manifest.read_tags(store.root)[name]}).",
                                   hint="Pass force=True to move it, or delete it first.")
        _manifest.write_tag(store.root, name, v, now_iso())


def find_shard(store: MemoryStore, shard_id: str) -> ShardRecord | None:
    """The record of a complete, checksum-verified, uncommitted shard ``shard_id``; None otherwise.

    A damaged uncommitted shard is moved to ``staging/`` (for gc) so the id can be written again.
    """
    root = store.root
    check_name("shard id", shard_id)
    if not (root / SHARDS_DIR / shard_id / RECORD_FILE).exists():
        return None
    try:
        rec = shards.read_record(root, shard_id)
    except Exception:  # noqa: BLE001 - unreadable record: treat as damaged
        rec = None
    latest = _manifest.read_manifest(root, _manifest.latest_version(root))
    if rec is not None:
        if any(e["shard_id"] == shard_id for e in latest["shards"]) or _ids.in_ranges(
                rec.doc_ids, latest["used_id_ranges"]).any():
            return None  # committed (or its ids were committed through another shard)
        if rec.identity_sha256 == store._identity_sha and not shards.verify_files(root, rec):
            return rec
    with writer_lock(root, action="setting a damaged shard aside"):
        dst = root / STAGING_DIR / f"{shard_id}.damaged-{token()}"
        (root / STAGING_DIR).mkdir(exist_ok=True)
        try:
            os.rename(root / SHARDS_DIR / shard_id, dst)
        except FileNotFoundError:
            pass
        except OSError:
            shutil.rmtree(root / SHARDS_DIR / shard_id, ignore_errors=True)
    return None
