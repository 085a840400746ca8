"""Repair: the way out of damaged or lost version manifests (``msa store repair STORE``).

What it fixes: manifests that do not parse or validate (truncated, emptied, overwritten, a field that
could lead outside the store, a symbolic link), a latest manifest that is gone while
``versions/_latest.json`` still names it, and a damaged hint. What it does, under the writer lock:

1. moves each damaged manifest into ``damaged/{name}.{hex}`` (a rename: nothing is deleted, and
   ``gc`` never looks there);
2. when the newest version is damaged or lost, publishes version ``top + 1`` (``top`` the highest
   number ever published, so a damaged or lost number is never reused) equal to the newest good
   version: the newest one whose manifest reads and whose shards, router keys and deletion files are
   all there. Its ``used_id_ranges`` also cover the ids of every shard on disk, so ids a lost version
   committed are never handed out again;
3. points the hint at the latest version.

What it does not do: repair shards (``verify`` reports those), links of store folders
(``check_layout`` refuses them), the identity record, or manifests of a newer format (upgrade). A
dry run (the default) takes no lock and writes nothing. Shards no good version names may hold
documents of a lost version; they are reported (``unreferenced_shards``) and, like any unreferenced
shard, removed by ``gc`` after its grace period. Re-encoding the corpus brings those documents back.
"""

from __future__ import annotations

import os
from typing import Any

from msa_memory.errors import ManifestCorruptError, ShardMissingError, StoreLayoutError
from msa_memory.store import _ids, _manifest, commit as _commit, shards
from msa_memory.store._layout import (
    DAMAGED_DIR,
    LATEST_HINT,
    SHARDS_DIR,
    VERSIONS_DIR,
    check_layout,
    dumps,
    is_name,
    open_backend,
    token,
    version_key,
)
from msa_memory.store.backend import Backend
from msa_memory.store.reader import Snapshot

__all__ = ["repair"]


def _readable(root: Backend, v: int) -> tuple[Any, str | None]:
    """(snapshot, None) if version ``v`` opens, else (None, why): damage that repair sets aside."""
    try:
        return Snapshot(root, v, lease=False), None
    except (ManifestCorruptError, StoreLayoutError) as e:
        return None, str(e)


def _usable(snap: Any) -> str | None:
    """Why a new version made from ``snap`` could not be read (a file it names is gone or linked), or None."""
    try:
        _commit.check_version_files(snap, "repair")
    except (ShardMissingError, StoreLayoutError) as e:
        return str(e)
    return None


def _plan(root: Backend) -> dict[str, Any]:
    """What is wrong with the store's manifests and what repair would do about it (reads only)."""
    problems: list[dict[str, str]] = []
    hint_bad = False
    try:
        hinted = _manifest.read_hint(root)
    except ManifestCorruptError as e:
        problems.append({"path": f"{VERSIONS_DIR}/{LATEST_HINT}", "problem": str(e)})
        hinted, hint_bad = None, True
    listed = _manifest.list_versions(root)
    snaps: dict[int, Any] = {}
    damaged: list[int] = []
    for v in listed:
        snap, why = _readable(root, v)
        if snap is None:
            damaged.append(v)
            problems.append({"path": version_key(v), "problem": str(why)})
        else:
            snaps[v] = snap
    lost = _manifest.latest_problem(root) if not hint_bad else None
    if lost is not None:
        problems.append({"path": lost[0], "problem": lost[1]})
    top = max(listed + ([hinted] if hinted is not None else []), default=None)
    newest = max(snaps, default=None)
    good, skipped = None, []
    if top is not None and top not in snaps:  # the newest version is damaged or lost: find one to publish again
        for v in sorted(snaps, reverse=True):
            why = _usable(snaps[v])
            if why is None:
                good = v
                break
            skipped.append({"version": v, "problem": why})
        if good is None:
            raise ManifestCorruptError(
                f"Store {str(root)!r} has no readable version to repair from: the manifests of versions "
                f"{damaged or 'none'} are damaged{' and version ' + str(top) + ' is lost' if top not in listed else ''}"
                f"{', and the readable ones name files that are gone' if snaps else ''}; repair changed nothing.",
                hint=f"Restore {root}/{VERSIONS_DIR} from a backup, or encode into a new store.")
    unreferenced: list[str] = []
    if damaged or lost is not None:
        named = {e["shard_id"] for s in snaps.values() for e in s.manifest["shards"]}
        on_disk = [n for n in root.list(SHARDS_DIR) if is_name(n)]
        unreferenced = [n for n in on_disk if n not in named]
    return {"problems": problems, "damaged": damaged, "hint_bad": hint_bad, "top": top, "good": good,
            "newest_readable": newest, "skipped_versions": skipped, "snaps": snaps, "unreferenced": unreferenced}


def _used_ranges(root: Backend, plan: dict[str, Any]) -> _ids.Ranges:
    """Every id any readable version or any shard on disk holds (a lost version's ids stay used)."""
    import numpy as np

    used: _ids.Ranges = []
    for snap in plan["snaps"].values():
        used = _ids.union_ranges(used, snap.manifest["used_id_ranges"])
    for sid in plan["unreferenced"]:
        try:
            rec = shards.read_record(root, sid)
        except Exception:  # noqa: BLE001 - an unreadable orphan holds no ids we could honour
            continue
        used = _ids.union_ranges(used, _ids.ids_to_ranges(np.asarray(rec.doc_ids)))
    return used


def _publish_good(root: Backend, plan: dict[str, Any], message: str | None) -> int:
    """Publish version top + 1 equal to the newest good version; returns its number."""
    good = plan["snaps"][plan["good"]]
    version = plan["top"] + 1
    what = ", ".join(p["path"] for p in plan["problems"])
    m = _commit.new_manifest(
        version, plan["good"], "restore",
        message if message is not None else f"repair: version {plan['good']} published again ({what})",
        good._identity_sha, good.manifest["shards"], good.manifest["deletions"], _used_ranges(root, plan),
        dict(good.manifest["stats"]),
        {"added_docs": 0, "deleted_docs": 0, "added_shards": [], "removed_shards": [], "restored_from": plan["good"]},
        {"repair": {"problems": [p["path"] for p in plan["problems"]]}}, router=good.manifest.get("router"))
    _commit.publish(good, m)
    return version


def repair(root: str | os.PathLike[str], dry_run: bool = True, *, message: str | None = None,
           lock_timeout: float = 60.0) -> dict[str, Any]:
    """Find (``dry_run=True``, the default) or repair damaged and lost version manifests (module docstring).

    Returns ``{"store", "dry_run", "ok", "problems": [{"path", "problem"}], "newest_good_version",
    "version", "moved": [{"from", "to"}], "hint_rewritten", "unreferenced_shards", "skipped_versions"}``:
    ``version`` is the version published (a dry run: that would be), None when no new version is needed;
    ``ok`` is True when nothing was wrong. Raises ManifestCorruptError when no version is readable
    (nothing is changed then), StoreLayoutError (a store folder is a link), StoreNotFoundError,
    StoreFormatError (a manifest of a newer format: upgrade msa-memory).

    Examples
    --------
    >>> report = repair("mem.msa")                 # doctest: +SKIP
    >>> report = repair("mem.msa", dry_run=False)  # doctest: +SKIP
    """
    root = open_backend(root)
    _manifest.read_identity(root)  # not a store, or a damaged identity record: nothing repair can do
    if dry_run:
        check_layout(root, "repair")
        return _report(root, _plan(root), True, [], False, None)
    with _commit.writer_lock(root, lock_timeout, "repair"):
        plan = _plan(root)
        moved: list[dict[str, str]] = []
        for v in plan["damaged"]:  # set aside, never delete: a person may still read what is left in them
            src = version_key(v)
            dst = f"{DAMAGED_DIR}/{src.rsplit('/', 1)[1]}.{token()}"
            _set_aside(root, src, dst)
            moved.append({"from": src, "to": dst})
        version = _publish_good(root, plan, message) if plan["good"] is not None else None
        hint_rewritten = False
        if version is None and (plan["hint_bad"] or _manifest.latest_problem(root) is not None):
            listed = _manifest.list_versions(root)
            if listed:
                root.replace(f"{VERSIONS_DIR}/{LATEST_HINT}", dumps({"version": listed[-1]}))
                hint_rewritten = True
        return _report(root, plan, False, moved, hint_rewritten, version)


def _set_aside(be: Backend, src: str, dst: str) -> None:
    """Move a damaged manifest (it may be a link: moved, never followed) to ``dst`` (a rename where the
    backend has one, else copy then delete)."""
    if be.supports_atomic_rename:
        be.rename_prefix(src, dst)
        return
    be.write(dst, be.read(src), exclusive=True)
    be.delete(src)


def _report(root: Backend, plan: dict[str, Any], dry_run: bool, moved: list[dict[str, str]], hint_rewritten: bool,
            version: int | None) -> dict[str, Any]:
    if dry_run:
        moved = [{"from": version_key(v), "to": f"{DAMAGED_DIR}/{version_key(v).rsplit('/', 1)[1]}.HEX"}
                 for v in plan["damaged"]]
        version = plan["top"] + 1 if plan["good"] is not None else None
        hint_rewritten = version is None and bool(plan["problems"]) and not plan["damaged"]
    return {"store": str(root), "dry_run": dry_run, "ok": not plan["problems"], "problems": plan["problems"],
            "newest_good_version": plan["good"] if plan["good"] is not None else plan["newest_readable"],
            "version": version, "moved": moved, "hint_rewritten": hint_rewritten,
            "unreferenced_shards": plan["unreferenced"], "skipped_versions": plan["skipped_versions"]}
