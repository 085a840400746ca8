"""Maintenance: compact (rewrite shards that hold deleted documents), gc (remove unreferenced
files, orphans of crashed writers included; dry run by default) and verify (whole-file checksums).

compact publishes a new version through the normal commit point; old shards stay on disk for the
versions that still name them until gc removes them. gc removes under the writer lock, so it never
races a commit (a dry run takes no lock: it only lists); files younger than ``grace_s`` are only
reported, never removed, so a running job's not-yet-committed shards survive a gc run.

gc removes only what it proved is the store's own: an entry of a store folder whose name is one
the store gives (``_layout.*_RE``), that is a regular file or a real folder holding only folders and
regular files (a shard folder must also carry the shard group's ``zarr.json``). Links are never
followed nor removed; anything else is left alone and reported under ``skipped``. A store whose
folders are links or lead outside its root is refused before anything is listed. verify never
raises for damage: it reports it (links on the way to a file included, and a lost latest version).
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np

from msa_memory.errors import ConfigError, MsaError
from msa_memory.schemas.records import EncodedChunks, Passage
from msa_memory.store import _leases, _manifest, commit as _commit, shards
from msa_memory.store._layout import (
    DELETION_RE,
    DELETIONS_DIR,
    LEASES_DIR,
    LEXICAL_DIR,
    LEXICAL_RE,
    RECORD_FILE,
    ROUTER_KEYS_DIR,
    ROUTER_KEYS_RE,
    SHARDS_DIR,
    STAGING_DIR,
    STAGING_RE,
    TAGS_DIR,
    TEMP_RE,
    VERSIONS_DIR,
    check_layout,
    dumps,
    is_name,
    layout_problems,
    token,
    version_key,
)
from msa_memory.store.backend import Backend
from msa_memory.store.lexical import sidecar_paths, verify_postings
from msa_memory.store.reader import Snapshot
from msa_memory.store.rekey import router_key_paths, verify_keys


def _read_live(store: Snapshot, sid: str) -> tuple[list[Passage], EncodedChunks]:
    """Live documents of shard ``sid`` as passages + encoded arrays (what write_shard takes)."""
    view = store._view(sid)
    rec = view.record
    live = np.flatnonzero(store._live_mask(sid))
    tab = view.table().take(live).to_pylist()
    offs = rec.chunk_offsets
    chunk_idx = np.concatenate([np.arange(offs[i], offs[i + 1]) for i in live])  # (C_live,)
    kv = view.array("kv").read(0, rec.n_chunks)[chunk_idx]  # (C_live, L, 2, H, D)
    idt = store.identity
    L, keep_x = idt.n_layers, idt.hidden_size > 0
    k_router = store.shard_router_keys(sid).read(0, L)[:, chunk_idx]  # (L, C_live, H, D), this version's router
    x_router = view.array("x_router").read(0, L)[:, chunk_idx] if keep_x else None
    shifted: dict[str, np.ndarray | None] = {}
    if idt.shifted_layers:                                              # the same for the shifted grid
        Ls, s_offs = len(idt.shifted_layers), view.shifted_offsets
        s_idx = np.concatenate([np.arange(s_offs[i], s_offs[i + 1]) for i in live])
        shifted = {"n_chunks_s": np.diff(s_offs)[live],
                   "k_router_s": store.shard_router_keys(sid, shifted=True).read(0, Ls)[:, s_idx],
                   "x_router_s": view.array("x_router_s").read(0, Ls)[:, s_idx] if keep_x else None}
    passages = [Passage(text=r["text"], source_path=r["source_path"], passage_index=r["passage_index"],
                        byte_start=r["byte_start"], byte_end=r["byte_end"], file_sha256=r["file_sha256"])
                for r in tab]
    enc = EncodedChunks(doc_ids=rec.doc_ids[live], n_tokens=rec.n_tokens[live],
                        n_chunks=np.diff(offs)[live], k_router=k_router, kv=kv, dtype=idt.dtype,
                        x_router=x_router, **shifted)  # type: ignore[arg-type]
    return passages, enc


def _concat(parts: list[tuple[list[Passage], EncodedChunks]], dtype: str) -> tuple[list[Passage], EncodedChunks]:
    """Several shards' live documents as one write_shard input, in order."""
    encs = [e for _, e in parts]

    def cat(name: str, axis: int) -> np.ndarray | None:   # None where the store keeps no such array
        return None if getattr(encs[0], name) is None else np.concatenate([getattr(e, name) for e in encs], axis=axis)

    enc = EncodedChunks(doc_ids=np.concatenate([e.doc_ids for e in encs]),
                        n_tokens=np.concatenate([e.n_tokens for e in encs]),
                        n_chunks=np.concatenate([e.n_chunks for e in encs]),
                        k_router=cat("k_router", 1),  # (L, C, H, D)
                        kv=cat("kv", 0),  # (C, L, 2, H, D)
                        dtype=dtype, x_router=cat("x_router", 1), n_chunks_s=cat("n_chunks_s", 0),
                        k_router_s=cat("k_router_s", 1), x_router_s=cat("x_router_s", 1))  # type: ignore[arg-type]
    return [p for ps, _ in parts for p in ps], enc


def _plan_compaction(base: Snapshot, min_dead_fraction: float, merge_below_chunks: int) -> list[list[str]]:
    """Groups of shard ids to rewrite; each group becomes one new shard."""
    deleted = base.deleted()
    groups: list[list[str]] = []
    small: list[tuple[str, int]] = []
    for e in base.manifest["shards"]:
        sid = e["shard_id"]
        rec = base._view(sid).record
        live = base._live_mask(sid)
        live_chunks = int(np.diff(rec.chunk_offsets)[live].sum())
        dead = deleted.get(sid)
        dirty = dead is not None and dead.size > 0 and (rec.n_chunks - live_chunks) / rec.n_chunks > min_dead_fraction
        if live_chunks < merge_below_chunks:
            small.append((sid, live_chunks))
        elif dirty:
            groups.append([sid])
    group: list[str] = []
    total = 0
    for sid, n in small:  # pack small shards together until a group reaches the threshold
        group.append(sid)
        total += n
        if total >= merge_below_chunks:
            groups.append(group)
            group, total = [], 0
    if group:
        groups.append(group)
    # a "group" of one small shard without deletions would be rewritten unchanged: skip it
    return [g for g in groups if len(g) > 1 or deleted.get(g[0]) is not None and deleted[g[0]].size > 0]


def compact(store: Snapshot, min_dead_fraction: float = 0.0, message: str = "compact", *,
            merge_below_chunks: int = 0) -> Any:
    """Rewrite shards of the latest version: every shard whose deleted share of chunks exceeds
    ``min_dead_fraction`` (default 0.0: any deletion), and, with ``merge_below_chunks=n > 0``,
    shards holding fewer than n live chunks merged together (many small incremental commits).
    Publishes a new version with the same live documents (bit-identical arrays and rows) and fewer
    dead bytes / shards. Returns the new snapshot, or the latest one unchanged when nothing qualifies.
    """
    if not 0.0 <= float(min_dead_fraction) < 1.0:
        raise ConfigError(f"min_dead_fraction must be in [0, 1), got {min_dead_fraction!r}.")
    if int(merge_below_chunks) < 0:
        raise ConfigError(f"merge_below_chunks must be >= 0, got {merge_below_chunks!r}.")
    root = store.backend
    with _commit.writer_lock(root, action="compact"):
        latest = _manifest.latest_version(root)
        base = store.checkout_version(latest)
        _commit.check_version_files(base, "compact")
        groups = _plan_compaction(base, float(min_dead_fraction), int(merge_below_chunks))
        if not groups:
            return base
        new_entries = []
        for k, group in enumerate(groups):
            passages, enc = _concat([_read_live(base, sid) for sid in group], base.identity.dtype)
            new_id = f"compact-{latest + 1:08d}-{k:04d}-{token()}"
            rec = shards.write_shard_unchecked(root, base.stored_identity, new_id, passages, enc)
            new_entries.append(_commit.shard_entry(root, rec))
        shards.fault_hook("compact:written")
        victims = [sid for g in groups for sid in g]
        gone = set(victims)
        keep_shards = [e for e in base.manifest["shards"] if e["shard_id"] not in gone]
        live_ids = {e["shard_id"] for e in keep_shards}
        deletions = [d for d in base.manifest["deletions"]
                     if live_ids & set(_manifest.read_deletions(root, d))]
        m = _commit.new_manifest(
            latest + 1, latest, "compact", message, base._identity_sha, keep_shards + new_entries, deletions,
            base.manifest["used_id_ranges"], dict(base.manifest["stats"]),
            {"added_docs": 0, "deleted_docs": 0, "added_shards": [e["shard_id"] for e in new_entries],
             "removed_shards": victims}, router=base.manifest.get("router"))
        return _commit.publish(base, m)


_SHARD_GROUP = {"msa_memory": "shard"}


def _scan(be: Backend, rel: str) -> tuple[int, str | None]:
    """(bytes, None) for an entry the store could have made: a regular file, or a real folder holding
    only folders and regular files; (0, why not) for anything else (gc leaves it alone)."""
    info = be.stat(rel)
    if info is None:
        return 0, "vanished while gc ran"
    if info.kind == "link":
        return 0, f"a symbolic link (to {info.target!r}); the store never makes links"
    if info.kind == "file":
        return info.size, None
    if info.kind != "folder":
        return 0, "not a regular file or folder"
    total = 0
    for sub in be.walk(rel):  # links are listed, never entered
        inner = sub.key[len(rel) + 1:]
        if sub.kind == "link":
            return 0, f"holds a symbolic link ({inner}); the store never makes links"
        if sub.kind == "file":
            total += sub.size
        elif sub.kind != "folder":
            return 0, f"holds {inner}, not a regular file or folder"
    return total, None


def _is_shard_folder(be: Backend, rel: str) -> bool:
    """True if ``rel`` carries the shard group's zarr.json (written first into every shard)."""
    info = be.stat(f"{rel}/zarr.json")
    if info is None or info.kind != "file" or info.size > 1 << 16:
        return False
    try:
        return json.loads(be.read(f"{rel}/zarr.json")).get("attributes") == _SHARD_GROUP
    except (OSError, ValueError, AttributeError):
        return False


#: kind -> (name pattern, must be a folder, what the store names such entries)
_KINDS: dict[str, tuple[Any, bool, str]] = {
    "shard": (is_name, True, "a shard id"),
    "staging": (STAGING_RE.match, True, "SHARD.HEX, SHARD.damaged-HEX or rk-NAME.HEX"),
    "router_keys": (ROUTER_KEYS_RE.match, True, "SHARD.ROUTER.HEX"),
    "lexical": (LEXICAL_RE.match, False, "SHARD.ANALYZER.HEX.parquet"),
    "deletion": (DELETION_RE.match, False, "NNNNNNNN-HEX.json"),
    "temp": (TEMP_RE.match, False, ".NAME.HEX.tmp"),
    "manifest": (lambda n: True, False, "NNNNNNNN.json"),
}


def _own(be: Backend, rel: str, kind: str) -> tuple[int, str | None]:
    """(bytes, None) if ``rel`` is provably a ``kind`` entry the store made, else (0, why not)."""
    name = rel.rsplit("/", 1)[-1]
    match, folder, scheme = _KINDS[kind]
    if not match(name):
        return 0, f"name {name!r} is not one the store gives ({scheme})"
    size, why = _scan(be, rel)
    if why is not None:
        return 0, why
    info = be.stat(rel)
    if info is not None and folder != (info.kind == "folder"):
        return 0, "a file where the store keeps folders" if folder else "a folder where the store keeps files"
    if kind == "shard" and not _is_shard_folder(be, rel):
        return 0, "no shard group zarr.json (attributes.msa_memory = 'shard') in it"
    return size, None


def _candidates(be: Backend, versions: list[int], kept: set[int], refs: tuple[set[str], set[str], set[str]]
                ) -> list[tuple[str, str]]:
    """(store-relative path, kind) of every entry no kept version references (not yet proved the store's own)."""
    ref_shards, ref_dels, ref_keys = refs
    cands = [(version_key(v), "manifest") for v in versions if v not in kept]
    cands += [(f"{SHARDS_DIR}/{n}", "shard") for n in be.list(SHARDS_DIR) if n not in ref_shards]
    cands += [(f"{STAGING_DIR}/{n}", "staging") for n in be.list(STAGING_DIR)]
    cands += [(f"{ROUTER_KEYS_DIR}/{n}", "router_keys") for n in be.list(ROUTER_KEYS_DIR)
              if f"{ROUTER_KEYS_DIR}/{n}" not in ref_keys]
    cands += [(f"{LEXICAL_DIR}/{n}", "lexical") for n in be.list(LEXICAL_DIR)
              if not n.endswith(".tmp") and f"{LEXICAL_DIR}/{n}" not in ref_keys]
    cands += [(f"{DELETIONS_DIR}/{n}", "deletion") for n in be.list(DELETIONS_DIR)
              if f"{DELETIONS_DIR}/{n}" not in ref_dels]
    for sub in ("", VERSIONS_DIR, TAGS_DIR, LEXICAL_DIR, LEASES_DIR):
        cands += [(f"{sub}/{n}".lstrip("/"), "temp") for n in be.list(sub) if n.endswith(".tmp")]
    return cands


def _remove(be: Backend, rel: str) -> str | None:
    """Remove a proved store entry (folders without following links); None, or why it is still there."""
    try:
        be.delete_prefix(rel)
    except OSError as e:
        return str(e)
    return None


def gc(store: Snapshot, dry_run: bool = True, *, keep_last: int | None = None,
       grace_s: float = 3600.0) -> dict[str, Any]:
    """Find (``dry_run=True``, the default) or remove files that no kept version references.

    Kept versions: all, or with ``keep_last=k`` the latest k plus every tagged version (the
    manifests of the others are removed too). Removable: shard directories no kept manifest lists
    (committed-then-dropped shards and orphans of crashed or abandoned writers), ``staging/``
    leftovers, router-key arrays (``router_keys/``) and lexical sidecars (``lexical/``) that no kept
    version names, unreferenced
    deletion files and temp files, each only once proved the store's own (module docstring);
    others are reported under ``skipped`` and left alone. Anything younger than ``grace_s``
    seconds (default 1 h; a job may still be about to commit it) is reported under ``young`` and
    left alone. A dry run takes no lock and writes nothing (it works on a read-only store).

    Returns ``{"dry_run", "kept_versions", "removed_versions", "orphans": [{"path", "kind", "bytes",
    "age_s"}], "young": [...], "skipped": [{"path", "kind", "reason"}], "failed": [{..., "error"}],
    "bytes", "removed"}``: ``orphans`` and ``bytes`` are what was removed (a dry run: would be),
    ``failed`` what could not be removed. Raises StoreLayoutError (a store folder is a link or leads
    outside the root), ManifestCorruptError (a damaged manifest: gc deletes nothing until
    ``msa store repair`` set it aside).
    """
    if keep_last is not None and int(keep_last) < 1:
        raise ConfigError(f"keep_last must be >= 1 (the latest version is always kept), got {keep_last!r}.")
    be = store.backend
    if dry_run:
        check_layout(be, "gc")
        return _gc(be, True, keep_last, grace_s)
    with _commit.writer_lock(be, action="gc"):
        return _gc(be, False, keep_last, grace_s)


_Refs = tuple[set[str], set[str], set[str]]


def _refs(manifests: list[dict[str, Any]]) -> _Refs:
    """(shard ids, deletion paths, router-key and lexical sidecar paths) the manifests name."""
    refs: _Refs = (set(), set(), set())
    for m in manifests:
        refs[0].update(e["shard_id"] for e in m["shards"])
        refs[1].update(d["path"] for d in m["deletions"])
        refs[2].update(router_key_paths(m) | sidecar_paths(m))
    return refs


def _named_by(item: dict[str, Any], refs: _Refs) -> bool:
    path = str(item["path"])
    return (item["kind"] == "shard" and path.split("/", 1)[1] in refs[0]) or path in refs[1] or path in refs[2]


def _gc(be: Backend, dry_run: bool, keep_last: int | None, grace_s: float) -> dict[str, Any]:
    now = time.time()
    _manifest.latest_version(be)  # refuses a store whose latest manifest was lost
    versions = _manifest.list_versions(be)
    leases = _leases.young_leases(be, grace_s, now)
    kept = set(versions)
    if keep_last is not None:  # the latest k, tagged versions, and versions a snapshot opened within grace_s reads
        kept = (set(versions[-int(keep_last):]) | set(_manifest.read_tags(be).values()) | set(leases)
                | _superseded_within(be, versions, grace_s, now)) & set(versions)
    manifests: dict[int, dict[str, Any]] = {}
    for v in versions:
        if v not in kept and be.link_in_path(version_key(v)) is not None:
            continue  # a linked manifest to drop: reported as skipped below, never read
        manifests[v] = _manifest.read_manifest(be, v)  # a damaged manifest (kept or not) stops gc here
    refs = _refs([manifests[v] for v in sorted(kept) if v in manifests])
    orphans: list[dict[str, Any]] = []
    young: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    for rel, kind in _candidates(be, versions, kept, refs):
        size, why = _own(be, rel, kind)
        if why is not None:
            skipped.append({"path": rel, "kind": kind, "reason": why})
            continue
        info = be.stat(rel)
        if info is None:
            continue
        item = {"path": rel, "kind": kind, "bytes": size, "age_s": round(now - info.mtime, 3)}
        (orphans if kind == "manifest" or item["age_s"] >= grace_s else young).append(item)
    failed: list[dict[str, Any]] = []
    expired = _leases.expired_leases(be, max(grace_s, _leases.EXPIRE_S), now)
    if not dry_run:
        for key in expired:  # leases of readers that crashed or idled for a day: nothing honours them
            be.delete(key)
        orphans, failed, late = _remove_orphans(be, orphans, manifests, grace_s)
        kept |= late
        if keep_last is not None:
            _fix_hint(be)
    removed_versions = sorted(int(i["path"][len(VERSIONS_DIR) + 1:-5]) for i in orphans if i["kind"] == "manifest")
    return {"dry_run": bool(dry_run), "kept_versions": sorted(kept), "removed_versions": removed_versions,
            "leased_versions": sorted(set(leases) & kept), "expired_leases": len(expired), "orphans": orphans, "young": young, "skipped": skipped,
            "failed": failed, "bytes": int(sum(i["bytes"] for i in orphans)), "removed": not dry_run}


def _superseded_within(be: Backend, versions: list[int], grace_s: float, now: float) -> set[int]:
    """Versions whose successor was published less than ``grace_s`` ago (a snapshot may have opened them as the
    latest version within the grace period)."""
    out: set[int] = set()
    for v, nxt in zip(versions[::-1][1:], versions[::-1]):  # newest first: stop at the first old successor
        info = be.stat(version_key(nxt))
        if info is None or now - info.mtime >= grace_s:
            break
        out.add(v)
    return out


def _remove_orphans(be: Backend, orphans: list[dict[str, Any]], manifests: dict[int, dict[str, Any]],
                    grace_s: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]], set[int]]:
    """Remove ``orphans``: manifests first, then (leases read again) the files. A version a snapshot leased
    while gc ran (it read the manifest before gc removed it) gets its manifest back and keeps its files.
    Returns (removed, failed, versions put back)."""
    done: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []

    def remove(item: dict[str, Any]) -> None:
        err = _remove(be, str(item["path"]))
        (done if err is None else failed).append(item if err is None else {**item, "error": err})

    for item in orphans:
        if item["kind"] == "manifest":
            remove(item)
    dropped = {int(i["path"][len(VERSIONS_DIR) + 1:-5]): i for i in done}
    late = set(_leases.young_leases(be, grace_s)) & set(dropped) & set(manifests)
    for v in late:  # a reader got there first: put the version back, byte for byte what it read
        be.publish(version_key(v), dumps(manifests[v]))
        done.remove(dropped[v])
    keep = _refs([manifests[v] for v in late] + _published_since(be, manifests))
    for item in orphans:
        if item["kind"] != "manifest" and not _named_by(item, keep):
            remove(item)
    return [i for i in done if not (i["kind"] != "manifest" and _named_by(i, keep))], failed, late


def _published_since(be: Backend, manifests: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """Manifests published after gc listed the versions (none can be, under the writer lock). Without a lock
    a commit may publish while gc runs; what it names is kept (a shard older than ``grace_s`` that a
    commit names while gc is deleting files is the remaining window; docs/store-format.md section 14)."""
    if be.supports_locks or not manifests:
        return []
    newest = max(manifests)
    return [_manifest.read_manifest(be, v) for v in _manifest.list_versions(be) if v > newest]


def _fix_hint(be: Backend) -> None:
    """Point the latest-version hint at the latest version when it names a removed one."""
    now_versions = _manifest.list_versions(be)
    try:
        hinted = _manifest.read_hint(be)
        stale = hinted is not None and not be.exists(version_key(hinted))
    except MsaError:
        stale = True
    if stale and now_versions:
        _manifest.write_hint(be, now_versions[-1])


def verify(store: Snapshot) -> dict[str, Any]:
    """Check the whole-file checksums of every file version ``store.version`` needs.

    Returns ``{"ok", "version", "checked_files", "checked_bytes", "problems": [{"file", "shard_id",
    "problem", "doc_ids"}]}``; ``doc_ids`` are the live documents held by the damaged shard (their
    tensors or rows must not be trusted). Never raises for damage.
    """
    root = store.backend
    problems: list[dict[str, Any]] = []
    n_files = n_bytes = 0
    for rel, problem in layout_problems(root):  # a store folder that is a link: nothing is read through it
        problems.append({"file": rel, "shard_id": None, "doc_ids": [],
                         "problem": f"{problem}; the store reads, writes and deletes nothing through a link or "
                                    "outside its root: replace it with a real folder inside the store"})
    if not any(p["file"].startswith(VERSIONS_DIR) for p in problems):
        lost = _manifest.latest_problem(root)
        if lost is not None:
            problems.append({"file": lost[0], "shard_id": None, "problem": lost[1], "doc_ids": []})
    for e in store.manifest["shards"]:
        sid = e["shard_id"]
        link = root.link_in_path(f"{SHARDS_DIR}/{sid}/{RECORD_FILE}")
        if link is not None:
            problems.append({"file": f"{SHARDS_DIR}/{sid}", "shard_id": sid, "problem": link, "doc_ids": []})
            continue
        try:
            rec = store._view(sid).record
        except MsaError as err:
            problems.append({"file": f"{SHARDS_DIR}/{sid}/_record.json", "shard_id": sid, "problem": str(err),
                             "doc_ids": []})
            continue
        try:
            live_docs = [int(x) for x in rec.doc_ids[store._live_mask(sid)]]
        except MsaError:
            live_docs = [int(x) for x in rec.doc_ids]
        bad_files = shards.verify_files(root, rec)
        for path, problem in bad_files:
            problems.append({"file": path, "shard_id": sid, "problem": problem, "doc_ids": live_docs})
        n_files += len(rec.files) + 1
        n_bytes += e["n_bytes"]
        if "router_keys" in e:  # this version's router keys of the shard (a reindex wrote them)
            for path, problem in verify_keys(root, e):
                problems.append({"file": path, "shard_id": sid, "problem": problem, "doc_ids": live_docs})
            n_files += len(e["router_keys"]["files"])
            n_bytes += sum(f["size"] for f in e["router_keys"]["files"].values())
        lex_problems, lex_files, lex_bytes = verify_postings(store, e, shard_ok=not bad_files)
        problems += [{"file": path, "shard_id": sid, "problem": problem, "doc_ids": live_docs}
                     for path, problem in lex_problems]
        n_files += lex_files
        n_bytes += lex_bytes
    for d in store.manifest["deletions"]:
        link = root.link_in_path(d["path"])
        if link is not None:
            problems.append({"file": d["path"], "shard_id": None, "problem": link, "doc_ids": []})
            continue
        try:
            _manifest.read_deletions(root, d)
        except MsaError as err:
            problems.append({"file": d["path"], "shard_id": None, "problem": str(err), "doc_ids": []})
        n_files += 1
    return {"ok": not problems, "version": store.version, "checked_files": n_files, "checked_bytes": n_bytes,
            "problems": problems}
