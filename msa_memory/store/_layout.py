"""Key layout of a store directory and the few atomic file primitives everything else uses.

No store logic here: path names, name validation, durable writes. The invariant the rest of
the store builds on: a file that a reader can see under its final name is complete (written to a
temporary name, fsynced, then renamed/linked), and ``publish_exclusive`` is the only way a version
manifest comes into existence (it fails if the name exists: the commit point).

Layout (see docs/store-format.md)::

    ROOT/msa_store.json                 identity record, written once
    ROOT/_ids.json                      id counter {"next_id": n}, replaced atomically under the lock
    ROOT/_writer.lock                   cross-process writer lock (filelock)
    ROOT/versions/{N:08d}.json          version manifests (exclusive create = commit)
    ROOT/versions/_latest.json          best-effort hint of the latest version number
    ROOT/tags/{name}.json               {"version": N}
    ROOT/shards/{shard_id}/             one immutable shard (zarr v3 group + docs.parquet + _record.json)
    ROOT/staging/{shard_id}.{hex}/      a shard being written (renamed into shards/ when complete)
    ROOT/deletions/{N:08d}-{hex}.json   document ids deleted by version N
    ROOT/router_keys/{shard}.{router}.{hex}/k_router/   a shard's router keys under another router
                                        (written by a reindex; named by the versions that use them)
    ROOT/lexical/{shard}.{analyzer}.{hex}.parquet   a shard's lexical postings written after the shard
                                        (``msa store reindex-lexical``; named by the versions that use them)
    ROOT/damaged/{N:08d}.json.{hex}     damaged manifests ``repair`` set aside (never deleted by the store)

Links: the store never creates symbolic links and never reads, writes or deletes through one.
``check_layout`` refuses a store whose folders (or lock/identity/id files) are links or lead outside
the root; ``link_in_path`` finds a link on the way to a store entry. Every name the store writes
matches one of the patterns below, so gc can tell its own leftovers from anything else.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import re
import shutil
import stat
import uuid
from datetime import datetime, timezone
from collections.abc import Callable
from pathlib import Path
from typing import Any

from msa_memory.errors import ConfigError, DiskFullError, MsaError, StoreLayoutError, StoreNotWritableError

IDENTITY_FILE = "msa_store.json"
IDS_FILE = "_ids.json"
LOCK_FILE = "_writer.lock"
VERSIONS_DIR = "versions"
LATEST_HINT = "_latest.json"
TAGS_DIR = "tags"
SHARDS_DIR = "shards"
STAGING_DIR = "staging"
DELETIONS_DIR = "deletions"
RECORD_FILE = "_record.json"
DOCS_FILE = "docs.parquet"
ROUTER_KEYS_DIR = "router_keys"
LEXICAL_DIR = "lexical"
DAMAGED_DIR = "damaged"

#: folders of a store (each a real folder directly under the root, never a link) and its top-level files
STORE_DIRS = (VERSIONS_DIR, TAGS_DIR, SHARDS_DIR, STAGING_DIR, DELETIONS_DIR, ROUTER_KEYS_DIR, LEXICAL_DIR, DAMAGED_DIR)
STORE_FILES = (IDENTITY_FILE, IDS_FILE, LOCK_FILE, f"{VERSIONS_DIR}/{LATEST_HINT}")

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_VERSION_RE = re.compile(r"^(\d{8,})\.json$")
_HEX = r"[0-9a-f]{12}"
#: names the store itself gives entries of its folders (gc removes nothing else)
STAGING_RE = re.compile(rf"^(rk-)?[A-Za-z0-9][A-Za-z0-9._-]{{0,180}}\.(damaged-)?{_HEX}$")
ROUTER_KEYS_RE = re.compile(rf"^[A-Za-z0-9][A-Za-z0-9._-]{{0,180}}\.{_HEX}$")
DELETION_RE = re.compile(r"^\d{8,}-[0-9a-f]+\.json$")
TEMP_RE = re.compile(rf"^\.[A-Za-z0-9_][A-Za-z0-9._-]*\.{_HEX}\.tmp$")
_REL_PART_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,254}$")
ROUTER_KEYS_PATH_RE = re.compile(r"^router_keys/[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")
#: lexical postings of a shard written after it: SHARD.ANALYZER.HEX.parquet under lexical/
LEXICAL_RE = re.compile(rf"^[A-Za-z0-9][A-Za-z0-9._-]{{0,180}}\.{_HEX}\.parquet$")
LEXICAL_PATH_RE = re.compile(rf"^lexical/[A-Za-z0-9][A-Za-z0-9._-]{{0,180}}\.{_HEX}\.parquet$")
DELETION_PATH_RE = re.compile(r"^deletions/\d{8,}-[0-9a-f]+\.json$")


def is_name(name: object) -> bool:
    """A shard id / tag name: one safe path component (see check_name)."""
    return isinstance(name, str) and bool(_NAME_RE.match(name)) and not name.endswith((".tmp", ".json"))


def is_rel_path(path: object) -> bool:
    """A relative path inside a store folder: '/'-separated components, none empty, '.', '..' or hidden."""
    return isinstance(path, str) and all(_REL_PART_RE.match(part) for part in path.split("/"))


def check_name(kind: str, name: str) -> str:
    """Validate a shard id or tag name (a safe single path component)."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or name.endswith((".tmp", ".json")):
        raise ConfigError(
            f"Invalid {kind} {name!r}: use 1-128 characters from A-Z a-z 0-9 . _ -, starting with a "
            "letter or digit (and not ending in .tmp/.json)."
        )
    return name


def check_tag_name(name: str) -> str:
    check_name("tag name", name)
    if name.isdigit():
        raise ConfigError(f"Invalid tag name {name!r}: a tag must not be all digits (it would read as a version number).")
    return name


def version_file(root: Path, version: int) -> Path:
    return root / VERSIONS_DIR / f"{version:08d}.json"


def parse_version_file(name: str) -> int | None:
    m = _VERSION_RE.match(name)
    return int(m.group(1)) if m else None


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def token() -> str:
    return uuid.uuid4().hex[:12]


def fsync_dir(path: Path) -> None:
    """Make a rename/creation inside ``path`` durable (no-op where directories can't be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_durable(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file and fsync it (the caller renames it into place).

    Never follows a link at ``path``. On failure (a full disk, say) the partial file is removed and
    the OSError, naming ``path``, is raised.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o666)
        try:
            view = memoryview(data).cast("B")
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        try:
            os.unlink(path)
        except OSError:
            pass
        if e.filename is None:
            e.filename = str(path)
        raise


def dumps(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode()


def replace_json_atomic(path: Path, obj: Any) -> None:
    """Atomically replace ``path`` with ``obj`` as JSON (temp file, fsync, rename, fsync dir)."""
    tmp = path.with_name(f".{path.name}.{token()}.tmp")
    write_bytes_durable(tmp, dumps(obj))
    try:
        os.replace(tmp, path)
    except OSError:
        os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def publish_exclusive(path: Path, data: bytes) -> bool:
    """Create ``path`` with ``data`` only if it does not exist; True if this call created it.

    The content is complete before the name appears (temp file + ``os.link``, which fails on an
    existing name), so a reader never sees a partial manifest.
    """
    tmp = path.with_name(f".{path.name}.{token()}.tmp")
    write_bytes_durable(tmp, data)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    except OSError:  # no hard links here (some network/FUSE file systems): O_EXCL create instead
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
    fsync_dir(path.parent)
    return True


# ----------------------------------------------------------------------------- links and the store root


def _entry_problem(root: Path, real_root: Callable[[], str], rel: str, want_dir: bool) -> str | None:
    """Why ``root/rel`` is not a real folder (``want_dir``) / regular file of the store; None if it is or is absent."""
    path = root / rel
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode):
        return f"is a symbolic link (to {os.readlink(path)!r})"
    if want_dir and not stat.S_ISDIR(st.st_mode):
        return "is not a folder"
    if not want_dir and not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    # not a link and directly under the root (or under a folder checked before it): it resolves inside
    # realpath(root) by construction; the realpath is compared only where a parent could be a link
    if "/" in rel and os.path.realpath(path) != os.path.join(real_root(), rel):
        return f"resolves to {os.path.realpath(path)!r}, outside the store root {real_root()!r}"
    return None


def layout_problems(root: Path) -> list[tuple[str, str]]:
    """(store-relative path, problem) for each store folder or top-level file that is a link, of the
    wrong kind or resolves outside the root. Costs a few lstat calls."""
    real_root = functools.cache(lambda: os.path.realpath(root))
    out = [(d, p) for d in STORE_DIRS if (p := _entry_problem(root, real_root, d, True)) is not None]
    return out + [(f, p) for f in STORE_FILES if (p := _entry_problem(root, real_root, f, False)) is not None]


def check_layout(root: Path, action: str) -> None:
    """Raise StoreLayoutError unless every store folder is a real folder inside ``root`` (no links).

    ``action`` names what is refused (``"gc"``, ``"a commit"``...); called before any write or delete.
    """
    problems = layout_problems(root)
    if problems:
        rel, problem = problems[0]
        raise StoreLayoutError(
            f"Store folder {str(root / rel)!r} {problem}; msa-memory reads, writes and deletes nothing through a link "
            f"or outside the store root, so {action} is refused and nothing was changed.",
            hint=f"Replace {str(root / rel)!r} with a real folder inside the store (move the contents it should hold "
                 "there), then rerun; `msa store verify STORE` lists every such path.")


def link_in_path(root: Path, rel: str) -> str | None:
    """The first link on the way from ``root`` to ``root/rel`` as a problem line, or None (absent parts end the walk)."""
    cur = root
    for part in rel.split("/"):
        cur = cur / part
        try:
            st = os.lstat(cur)
        except (FileNotFoundError, NotADirectoryError):
            return None
        if stat.S_ISLNK(st.st_mode):
            return f"{cur.relative_to(root).as_posix()} is a symbolic link (to {os.readlink(cur)!r}); not read through it"
    return None


def check_inside(root: Path, rel: str, action: str) -> None:
    """Raise StoreLayoutError if a link lies on the way from ``root`` to ``root/rel``."""
    problem = link_in_path(root, rel)
    if problem is not None:
        raise StoreLayoutError(
            f"Store entry {str(root / rel)!r} is reached through a link ({problem.split(';')[0]}); {action} is refused "
            "and nothing was changed.",
            hint="The store never makes links: replace the link with the real folder it points to, then rerun; "
                 "`msa store verify STORE` lists every such path.")


# ----------------------------------------------------------------------------- write failures


def os_write_error(root: Path, e: OSError, action: str) -> MsaError | None:
    """The store error a failed write ``e`` means (disk full, read-only store), or None for other errors."""
    if isinstance(e, MsaError):
        return None
    what = f" ({e.strerror or e}: {e.filename})" if e.filename else f" ({e.strerror or e})"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = f"{shutil.disk_usage(root).free:,} bytes free"
        except OSError:
            free = "free space unknown"
        return DiskFullError(
            f"No space left on the device of store {str(root)!r} during {action}{what}, {free}: no version was "
            "published and nothing already stored was changed.",
            hint=f"Free space on that device (`msa store gc {root} --yes` removes files no version uses), then rerun.")
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return StoreNotWritableError(
            f"Store {str(root)!r} is not writable{what}; {action} needs to write to it, so nothing was changed.",
            hint="Reads (info, versions, docs, verify, gc --dry-run, repair --dry-run) work as they are; to change the "
                 "store, make its folder writable (permissions, or remount it read-write) or copy it somewhere writable.")
    return None
