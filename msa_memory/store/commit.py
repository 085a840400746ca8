"""Publishing versions: create, commit (add / delete / replace), restore, reserve ids, tags, resume.

Commit protocol (docs/store-format.md): take the cross-process writer lock (where the backend has
one); find the latest version; if it is not the one the writer read, *rebase* when every version
published since is a compaction (same live documents in other shards: the change applies on top of
it), else raise VersionConflictError (nothing published); validate the added shards (complete, same
identity, ids reserved and never used) and the deletions (live ids, known paths) against that base;
write a small deletion file; then publish ``versions/{N+1:08d}.json`` by conditional publish
(``Backend.publish``, create-if-absent). That publish is the only commit point: a crash anywhere
before it leaves version N intact and at most orphan files (staging dirs, uncommitted shards,
deletion files) that ``gc`` removes. On a backend without locks two writers can reach the publish
together; the loser re-reads the latest version and rebases or raises exactly as above.
A commit's cost is O(shards in the manifest + documents it touches), not O(documents in the store).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator, Sequence
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
from msa_memory.schemas.records import FORMAT_VERSION, ShardRecord, identity_sha256
from msa_memory.store import _ids, _manifest, shards
from msa_memory.store._layout import (
    LOCK_FILE,
    RECORD_FILE,
    SHARDS_DIR,
    STAGING_DIR,
    check_inside,
    check_layout,
    check_name,
    now_iso,
    os_write_error,
    token,
)
from msa_memory.store.backend import Backend
from msa_memory.store.reader import Snapshot

DEFAULT_LOCK_TIMEOUT = 60.0
#: A commit that would leave more deletion files than this folds them into one.
MAX_DELETION_FILES = 32
#: operations a commit rebases over (they keep the parent's live documents, router and ids)
REBASE_OVER = ("compact",)


@contextlib.contextmanager
def writer_lock(be: Backend, timeout: float = DEFAULT_LOCK_TIMEOUT, action: str = "a write") -> Iterator[None]:
    """Hold the store's cross-process writer lock (re-entrant within one thread; nothing to hold on a
    backend without locks, where the conditional publish alone decides).

    Refuses a store whose folders or lock file are links (StoreLayoutError) before opening the lock
    file; a read-only store or a full disk, on taking the lock or in the body, raises
    StoreNotWritableError / DiskFullError naming ``action`` instead of a bare OSError.
    """
    check_layout(be, action)
    lock = be.lock(LOCK_FILE, timeout) if be.supports_locks else contextlib.nullcontext()
    try:
        lock.__enter__()
    except TimeoutError:
        raise LockTimeoutError(
            f"Could not take the writer lock of store {str(be)!r} within {timeout:g} s: another process is "
            "committing or maintaining it.",
            hint=f"Wait and retry, or pass a larger lock_timeout. If no writer runs, remove {be}/{LOCK_FILE}.",
        ) from None
    except OSError as e:
        err = os_write_error(be, e, action)
        if err is None:
            raise
        raise err from None
    try:
        yield
    except OSError as e:
        err = os_write_error(be, e, action)
        if err is None:
            raise
        raise err from e
    finally:
        lock.__exit__(None, None, None)


def shard_entry(be: Backend, rec: ShardRecord) -> dict[str, Any]:
    data = be.read(f"{SHARDS_DIR}/{rec.shard_id}/{RECORD_FILE}")
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


def _publish(be: Backend, manifest: dict[str, Any]) -> bool:
    """The commit point, between its two fault points; False when another writer has the number."""
    shards.fault_hook("commit:before_publish")
    if not _manifest.publish_manifest(be, manifest):
        return False
    shards.fault_hook("commit:published")
    return True


def publish(base: Snapshot, manifest: dict[str, Any]) -> Any:
    """Publish ``manifest`` (made from ``base``); returns its snapshot, of ``base``'s class."""
    if not _publish(base.backend, manifest):
        raise VersionConflictError(
            f"Version {manifest['version']} of {str(base.backend)!r} was published by another writer; nothing was "
            "published.", hint="Re-open the store and retry the commit.")
    return base._published(manifest["version"])


def publish_first(be: Backend, message: str, cls: type[Snapshot]) -> Any:
    """Publish version 0 (empty) of a store whose identity record was just written; returns ``cls`` of it."""
    identity = _manifest.read_identity(be)
    m = new_manifest(0, None, "create", message, identity_sha256(identity), [], [], [],
                     {"n_docs": 0, "n_chunks": 0, "n_tokens": 0, "n_bytes": 0},
                     {"added_docs": 0, "deleted_docs": 0, "added_shards": [], "removed_shards": []})
    if not _publish(be, m):
        raise StoreExistsError(f"A store was created concurrently at {str(be)!r}.")
    return cls(be, 0)


def _check_added(base: Snapshot, add: Sequence[ShardRecord]) -> list[dict[str, Any]]:
    root, entries = base.backend, []
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
        for rel, f in rec.files.items():
            info = root.stat(f"{SHARDS_DIR}/{rec.shard_id}/{rel}")
            size = info.size if info is not None else None
            if info is None or info.kind != "file":
                raise ShardMissingError(f"File {rel!r} of shard {rec.shard_id!r} is missing.",
                                        hint="Rewrite the shard with write_shard.")
            if size != f["size"]:
                raise ShardCorruptError(f"File {rel!r} of shard {rec.shard_id!r} has {size} bytes, "
                                        f"its record says {f['size']}.", hint="Rewrite the shard with write_shard.")
        entries.append(shard_entry(root, rec))
    if add:
        shards.check_ids(root, np.concatenate([r.doc_ids for r in add]), used=base.manifest["used_id_ranges"])
    return entries


def _resolve_deletes(base: Snapshot, delete_ids: Iterable[int], delete_paths: Iterable[str]) -> np.ndarray:
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


def _checkpoint_deletions(base: Snapshot, new: dict[str, list[int]], removed: list[str],
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
    return [_manifest.write_deletions(base.backend, version, {k: sorted(v) for k, v in sorted(merged.items())})]


def commit(store: Snapshot, add: Sequence[ShardRecord] = (), delete_ids: Iterable[int] = (),
           delete_paths: Iterable[str] = (), message: str = "", read_version: int | None = None, *,
           lock_timeout: float = DEFAULT_LOCK_TIMEOUT, extra: dict[str, Any] | None = None) -> Any:
    """Publish version N+1 = ``read_version`` (default: ``store.version``) + ``add`` - deletions.

    When the versions published after ``read_version`` are all compactions, the commit is rebased on
    the latest one (its deletions resolved there; the manifest's ``extra.rebased_over`` lists them).
    Raises VersionConflictError when any other change was published after ``read_version`` (nothing is
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
    be = store.backend
    add = list(add)
    rv = store.version if read_version is None else int(read_version)
    with writer_lock(be, lock_timeout, "a commit"):
        shards.fault_hook("commit:locked")
        while True:  # once under a lock; again only when a lock-free backend let another writer publish first
            latest = _manifest.latest_version(be)
            over = rebase_over(be, rv, latest, "commit")
            base = store if store.version == latest else store.checkout_version(latest, lease=False)
            more = {**(extra or {}), "rebased_over": over} if over else extra
            m = _build_commit(base, latest + 1, add, delete_ids, delete_paths, message, more)
            if _publish(be, m):
                return store._published(m["version"])


def rebase_over(be: Backend, rv: int, latest: int, what: str) -> list[int]:
    """The versions after ``rv`` up to ``latest`` that a change prepared against ``rv`` is rebased over; raises
    VersionConflictError unless each is an operation of ``REBASE_OVER`` (a compaction)."""
    over = list(range(rv + 1, latest + 1))
    for v in over:
        op = _manifest.read_manifest(be, v)["operation"]
        if op not in REBASE_OVER:
            raise VersionConflictError(
                f"Store {str(be)!r} is at version {latest}, but this {what} was prepared against version {rv} and "
                f"version {v} ({op}) changed it since; nothing was published.",
                hint="Re-open the store (open_store), redo the change and commit again.")
    return over


def _build_commit(base: Snapshot, version: int, add: list[ShardRecord], delete_ids: Iterable[int],
                  delete_paths: Iterable[str], message: str, extra: dict[str, Any] | None) -> dict[str, Any]:
    """Manifest of version ``version`` = ``base`` + ``add`` - deletions (written: its deletion file)."""
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
        deletions = _checkpoint_deletions(base, deleted, removed, version)
    elif deleted:
        deletions.append(_manifest.write_deletions(base.backend, version, deleted))
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
        version, base.version, op, message, base._identity_sha,
        [e for e in base.manifest["shards"] if e["shard_id"] not in removed] + added, deletions,
        _ids.union_ranges(base.manifest["used_id_ranges"], new_ids), stats,
        {"added_docs": sum(r.n_docs for r in add), "deleted_docs": d_docs,
         "added_shards": [r.shard_id for r in add], "removed_shards": removed}, extra,
        router=base.manifest.get("router"))
    return m


def restore(store: Snapshot, version: int | str, message: str | None = None, *,
            lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> Any:
    """Publish a new version whose content equals ``version`` (ids used since stay used)."""
    be = store.backend
    with writer_lock(be, lock_timeout, "restore"):
        old = store.checkout_version(version, lease=False)
        check_version_files(old, "restore")
        latest = _manifest.latest_version(be)
        cur = _manifest.read_manifest(be, latest)
        m = new_manifest(
            latest + 1, latest, "restore", message if message is not None else f"restore version {old.version}",
            old._identity_sha, old.manifest["shards"], old.manifest["deletions"],
            _ids.union_ranges(cur["used_id_ranges"], old.manifest["used_id_ranges"]), dict(old.manifest["stats"]),
            {"added_docs": 0, "deleted_docs": 0, "added_shards": [], "removed_shards": [],
             "restored_from": old.version}, router=old.manifest.get("router"))
        return publish(store, m)


def check_version_files(old: Snapshot, action: str) -> None:
    """Raise unless every shard, router-key array, lexical sidecar and deletion file version ``old`` names is in the store,
    reached without a link (StoreLayoutError) and present (ShardMissingError): what a new version made
    from it will read."""
    be = old.backend

    def need(present: bool, what: str) -> None:
        if not present:
            raise ShardMissingError(f"Version {old.version} needs {what}, which gc removed.",
                                    hint="Restore a version that gc kept (see `msa store versions`).")

    for e in old.manifest["shards"]:
        record = f"{SHARDS_DIR}/{e['shard_id']}/{RECORD_FILE}"
        check_inside(be, record, action)
        need(be.exists(record), f"shard {e['shard_id']!r}")
        # sidecars: re-keyed router keys (a folder) and lexical postings (a file)
        for key, kind, what in (("router_keys", "folder", "router keys"), ("lexical", "file", "lexical postings")):
            side = e.get(key)
            if side is not None:
                check_inside(be, side["path"], action)
                info = be.stat(side["path"])
                need(info is not None and info.kind == kind, f"{what} {side['path']!r}")
    for d in old.manifest["deletions"]:
        check_inside(be, d["path"], action)


def reserve_ids(store: Snapshot, n: int, *, lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> np.ndarray:
    """Hand out ``n`` fresh document ids (durable before return; never handed out again)."""
    if not isinstance(n, (int, np.integer)) or n < 0:
        raise ConfigError(f"reserve_ids(n) needs a non-negative int, got {n!r}.")
    be = store.backend
    with writer_lock(be, lock_timeout, "reserving ids"):
        latest = _manifest.read_manifest(be, _manifest.latest_version(be))
        used = latest["used_id_ranges"]
        floor = used[-1][1] if used else 0
        if be.supports_locks:
            start, stop = _ids.bump_next_id(be, int(n), floor=floor)
        else:  # no lock to serialise a counter: claim the range by conditional publish (_ids.py)
            start, stop = _ids.claim_ids(be, int(n), floor=floor)
    return np.arange(start, stop, dtype=np.int64)


def tag(store: Snapshot, name: str, version: int | None = None, *, force: bool = False) -> None:
    """Point tag ``name`` at ``version`` (default: this snapshot's version)."""
    be = store.backend
    v = store.version if version is None else int(version)
    if not be.exists(_manifest.version_key(v)):
        raise VersionNotFoundError(f"Cannot tag version {v}: it does not exist in {str(be)!r}.")
    with writer_lock(be, action="tagging"):
        if name in _manifest.read_tags(be) and not force:
            raise StoreExistsError(f"Tag {name!r} already exists (version {_manifest.read_tags(be)[name]}).",
                                   hint="Pass force=True to move it, or delete it first.")
        _manifest.write_tag(be, name, v, now_iso())


def find_shard(store: Snapshot, shard_id: str) -> ShardRecord | None:
    """The record of a complete, checksum-verified, uncommitted shard ``shard_id``; None otherwise.

    A damaged uncommitted shard is moved to ``staging/`` (for gc) so the id can be written again
    (removed, on a backend without atomic rename).
    """
    be = store.backend
    check_name("shard id", shard_id)
    if not be.exists(f"{SHARDS_DIR}/{shard_id}/{RECORD_FILE}"):
        return None
    try:
        rec = shards.read_record(be, shard_id)
    except Exception:  # noqa: BLE001 - unreadable record: treat as damaged
        rec = None
    latest = _manifest.read_manifest(be, _manifest.latest_version(be))
    if rec is not None:
        if any(e["shard_id"] == shard_id for e in latest["shards"]) or _ids.in_ranges(
                rec.doc_ids, latest["used_id_ranges"]).any():
            return None  # committed (or its ids were committed through another shard)
        if rec.identity_sha256 == store._identity_sha and not shards.verify_files(be, rec):
            return rec
    with writer_lock(be, action="setting a damaged shard aside"):
        src = f"{SHARDS_DIR}/{shard_id}"
        try:
            if not be.supports_atomic_rename:
                raise OSError("no atomic rename")
            be.rename_prefix(src, f"{STAGING_DIR}/{shard_id}.damaged-{token()}")
        except FileNotFoundError:
            pass
        except OSError:
            try:
                be.delete_prefix(src)
            except OSError:
                pass
    return None
