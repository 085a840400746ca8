"""Maintenance: compact (rewrite shards that hold deleted documents), gc (remove unreferenced
files, orphans of crashed writers included; dry run by default) and verify (whole-file checksums).

compact publishes a new version through the normal commit point; old shards stay on disk for the
versions that still name them until gc removes them. gc takes the writer lock, so it never races
a commit; files younger than ``grace_s`` are only reported, never removed, so a running job's
not-yet-committed shards survive a gc run. verify never raises for damage: it reports it.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from msa_memory.errors import ConfigError, MsaError
from msa_memory.schemas.records import EncodedChunks, Passage
from msa_memory.store import _manifest, shards
from msa_memory.store.rekey import router_key_paths, verify_keys
from msa_memory.store._layout import (
    DELETIONS_DIR,
    LATEST_HINT,
    ROUTER_KEYS_DIR,
    SHARDS_DIR,
    STAGING_DIR,
    TAGS_DIR,
    VERSIONS_DIR,
    token,
    version_file,
)

if TYPE_CHECKING:
    from msa_memory.store.reader import MemoryStore


def _read_live(store: MemoryStore, sid: str) -> tuple[list[Passage], EncodedChunks]:
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


def _plan_compaction(base: MemoryStore, min_dead_fraction: float, merge_below_chunks: int) -> list[list[str]]:
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


def compact(store: MemoryStore, min_dead_fraction: float = 0.0, message: str = "compact", *,
            merge_below_chunks: int = 0) -> MemoryStore:
    """Rewrite shards of the latest version: every shard whose deleted share of chunks exceeds
    ``min_dead_fraction`` (default 0.0: any deletion), and, with ``merge_below_chunks=n > 0``,
    shards holding fewer than n live chunks merged together (many small incremental commits).
    Publishes a new version with the same live documents (bit-identical arrays and rows) and fewer
    dead bytes / shards. Returns the new snapshot, or the latest one unchanged when nothing qualifies.
    """
    from msa_memory.store import commit as _commit
    from msa_memory.store.reader import MemoryStore

    if not 0.0 <= float(min_dead_fraction) < 1.0:
        raise ConfigError(f"min_dead_fraction must be in [0, 1), got {min_dead_fraction!r}.")
    if int(merge_below_chunks) < 0:
        raise ConfigError(f"merge_below_chunks must be >= 0, got {merge_below_chunks!r}.")
    root = store.root
    with _commit.writer_lock(root):
        latest = _manifest.latest_version(root)
        base = MemoryStore(root, latest)
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
        return _commit.publish(root, m)


def _size(p: Path) -> int:
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    try:
        return p.stat().st_size
    except FileNotFoundError:
        return 0


def _age(p: Path, now: float) -> float:
    try:
        return now - p.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def gc(store: MemoryStore, dry_run: bool = True, *, keep_last: int | None = None,
       grace_s: float = 3600.0) -> dict[str, Any]:
    """Find (``dry_run=True``, the default) or remove files that no kept version references.

    Kept versions: all, or with ``keep_last=k`` the latest k plus every tagged version (the
    manifests of the others are removed too). Removable: shard directories no kept manifest lists
    (committed-then-dropped shards and orphans of crashed or abandoned writers), ``staging/``
    leftovers, router-key arrays (``router_keys/``) that no kept version names, unreferenced
    deletion files and temp files. Anything younger than ``grace_s``
    seconds (default 1 h; a job may still be about to commit it) is reported under ``young`` and
    left alone. Returns ``{"dry_run", "kept_versions", "removed_versions", "orphans": [{"path",
    "kind", "bytes", "age_s"}], "young": [...], "bytes", "removed"}``.
    """
    from msa_memory.store import commit as _commit

    if keep_last is not None and int(keep_last) < 1:
        raise ConfigError(f"keep_last must be >= 1 (the latest version is always kept), got {keep_last!r}.")
    root = store.root
    now = time.time()
    with _commit.writer_lock(root):
        versions = _manifest.list_versions(root)
        kept = set(versions)
        if keep_last is not None:
            kept = set(versions[-int(keep_last):]) | set(_manifest.read_tags(root).values())
            kept &= set(versions)
        ref_shards: set[str] = set()
        ref_dels: set[str] = set()
        ref_keys: set[str] = set()
        for v in sorted(kept):
            m = _manifest.read_manifest(root, v)
            ref_shards.update(e["shard_id"] for e in m["shards"])
            ref_dels.update(d["path"] for d in m["deletions"])
            ref_keys.update(router_key_paths(m))
        cands: list[tuple[Path, str]] = []
        cands += [(version_file(root, v), "manifest") for v in versions if v not in kept]
        for d in sorted((root / SHARDS_DIR).iterdir()) if (root / SHARDS_DIR).exists() else []:
            if d.name not in ref_shards:
                cands.append((d, "shard"))
        for d in sorted((root / STAGING_DIR).iterdir()) if (root / STAGING_DIR).exists() else []:
            cands.append((d, "staging"))
        for d in sorted((root / ROUTER_KEYS_DIR).iterdir()) if (root / ROUTER_KEYS_DIR).exists() else []:
            if f"{ROUTER_KEYS_DIR}/{d.name}" not in ref_keys:
                cands.append((d, "router_keys"))
        for f in sorted((root / DELETIONS_DIR).iterdir()) if (root / DELETIONS_DIR).exists() else []:
            if f"{DELETIONS_DIR}/{f.name}" not in ref_dels:
                cands.append((f, "deletion"))
        for sub in (root, root / VERSIONS_DIR, root / TAGS_DIR):
            if sub.exists():
                cands += [(f, "temp") for f in sorted(sub.iterdir()) if f.name.endswith(".tmp")]
        orphans: list[dict[str, Any]] = []
        young: list[dict[str, Any]] = []
        for p, kind in cands:
            age = round(_age(p, now), 3)
            item = {"path": p.relative_to(root).as_posix(), "kind": kind, "bytes": _size(p), "age_s": age}
            (orphans if kind == "manifest" or age >= grace_s else young).append(item)
        if not dry_run:
            for item in orphans:
                p = root / str(item["path"])
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    try:
                        os.unlink(p)
                    except FileNotFoundError:
                        pass
            if keep_last is not None:
                hint = root / VERSIONS_DIR / LATEST_HINT
                if hint.exists() and not version_file(root, _manifest.latest_version(root)).exists():
                    hint.unlink()
    return {"dry_run": bool(dry_run), "kept_versions": sorted(kept),
            "removed_versions": sorted(set(versions) - kept), "orphans": orphans, "young": young,
            "bytes": int(sum(i["bytes"] for i in orphans)), "removed": not dry_run}


def verify(store: MemoryStore) -> dict[str, Any]:
    """Check the whole-file checksums of every file version ``store.version`` needs.

    Returns ``{"ok", "version", "checked_files", "checked_bytes", "problems": [{"file", "shard_id",
    "problem", "doc_ids"}]}``; ``doc_ids`` are the live documents held by the damaged shard (their
    tensors or rows must not be trusted). Never raises for damage.
    """
    root = store.root
    problems: list[dict[str, Any]] = []
    n_files = n_bytes = 0
    for e in store.manifest["shards"]:
        sid = e["shard_id"]
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
        for path, problem in shards.verify_files(root, rec):
            problems.append({"file": path, "shard_id": sid, "problem": problem, "doc_ids": live_docs})
        n_files += len(rec.files) + 1
        n_bytes += e["n_bytes"]
        if "router_keys" in e:  # this version's router keys of the shard (a reindex wrote them)
            for path, problem in verify_keys(root, e):
                problems.append({"file": path, "shard_id": sid, "problem": problem, "doc_ids": live_docs})
            n_files += len(e["router_keys"]["files"])
            n_bytes += sum(f["size"] for f in e["router_keys"]["files"].values())
    for d in store.manifest["deletions"]:
        try:
            _manifest.read_deletions(root, d)
        except MsaError as err:
            problems.append({"file": d["path"], "shard_id": None, "problem": str(err), "doc_ids": []})
        n_files += 1
    return {"ok": not problems, "version": store.version, "checked_files": n_files, "checked_bytes": n_bytes,
            "problems": problems}
