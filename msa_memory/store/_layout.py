"""Key layout of a store, name validation, and the store-wide checks built on its backend.

No store logic and no I/O of its own: key names, name patterns, the link/layout checks (answered by the
backend: media without links have nothing to report), whole-file checksums, and the mapping of a failed
write to DiskFullError / StoreNotWritableError. The invariants the rest of the store builds on are the
backend's (``backend.py``): a key a reader can see is complete, and ``Backend.publish`` (create-if-absent)
is the only way a version manifest comes into existence (the commit point).

Layout (see docs/store-format.md)::

    ROOT/msa_store.json                 identity record, written once
    ROOT/_ids.json                      id counter {"next_id": n}, replaced atomically under the lock
    ROOT/ids/{k:012d}.json              id claim k {"seq", "start", "stop", "nonce"} (backends without locks;
                                        write-once, conditional publish; never deleted)
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
    ROOT/leases/{N:08d}.{hex}.json      a reader's lease on version N (gc keeps leased versions, reader.py)

Links: the store never creates symbolic links and never reads, writes or deletes through one.
``check_layout`` refuses a store whose folders (or lock/identity/id files) are links or lead outside
the root; ``link_in_path`` finds a link on the way to a store entry. Every name the store writes
matches one of the patterns below, so gc can tell its own leftovers from anything else.
"""

from __future__ import annotations

import errno
import json
import os
import re
import uuid
from datetime import datetime, timezone
from typing import Any

from msa_memory.errors import ConfigError, DiskFullError, MsaError, StoreLayoutError, StoreNotWritableError
from msa_memory.store._local import LocalBackend
from msa_memory.store._memory import MemoryBackend
from msa_memory.store.backend import Backend

IDENTITY_FILE = "msa_store.json"
IDS_FILE = "_ids.json"
IDS_DIR = "ids"
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
LEASES_DIR = "leases"

#: folders of a store (each a real folder directly under the root, never a link) and its top-level files
STORE_DIRS = (VERSIONS_DIR, TAGS_DIR, SHARDS_DIR, STAGING_DIR, DELETIONS_DIR, ROUTER_KEYS_DIR, LEXICAL_DIR, DAMAGED_DIR,
              LEASES_DIR)
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
#: a reader's lease on the version it has open: NNNNNNNN.HEX.json under leases/ (``reader.py``)
LEASE_RE = re.compile(rf"^(\d{{8,}})\.{_HEX}\.json$")


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


def version_key(version: int) -> str:
    return f"{VERSIONS_DIR}/{version:08d}.json"


def parse_version_file(name: str) -> int | None:
    m = _VERSION_RE.match(name)
    return int(m.group(1)) if m else None


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def token() -> str:
    return uuid.uuid4().hex[:12]


def dumps(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode()


def open_backend(location: str | os.PathLike[str] | Backend) -> Backend:
    """The backend of a store location: a Backend as is, ``memory://NAME`` (an in-process store, for tests
    and notebooks), ``s3://BUCKET/PREFIX`` (``_s3.S3Backend``, needs obstore), else a local folder
    (``_local.LocalBackend``)."""
    if isinstance(location, Backend):
        return location
    if isinstance(location, str) and location.startswith("memory://"):
        return MemoryBackend.named(location)
    if isinstance(location, str) and location.startswith("s3://"):
        from msa_memory.store._s3 import S3Backend

        return S3Backend.for_url(location)
    return LocalBackend(location)


# ----------------------------------------------------------------------------- links and the store root


def layout_problems(be: Backend) -> list[tuple[str, str]]:
    """(store-relative path, problem) for each store folder or top-level file that is a link, of the
    wrong kind or resolves outside the root. Costs a few lstat calls (none on media without links)."""
    if not be.supports_links:
        return []
    out = [(d, p) for d in STORE_DIRS if (p := be.entry_problem(d, True)) is not None]
    return out + [(f, p) for f in STORE_FILES if (p := be.entry_problem(f, False)) is not None]


def check_layout(be: Backend, action: str) -> None:
    """Raise StoreLayoutError unless every store folder is a real folder inside the root (no links).

    ``action`` names what is refused (``"gc"``, ``"a commit"``...); called before any write or delete.
    """
    problems = layout_problems(be)
    if problems:
        rel, problem = problems[0]
        where = f"{be}/{rel}"
        raise StoreLayoutError(
            f"Store folder {where!r} {problem}; msa-memory reads, writes and deletes nothing through a link "
            f"or outside the store root, so {action} is refused and nothing was changed.",
            hint=f"Replace {where!r} with a real folder inside the store (move the contents it should hold "
                 "there), then rerun; `msa store verify STORE` lists every such path.")


def check_inside(be: Backend, rel: str, action: str) -> None:
    """Raise StoreLayoutError if a link lies on the way from the root to ``rel``."""
    problem = be.link_in_path(rel)
    if problem is not None:
        raise StoreLayoutError(
            f"Store entry {f'{be}/{rel}'!r} is reached through a link ({problem.split(';')[0]}); {action} is refused "
            "and nothing was changed.",
            hint="The store never makes links: replace the link with the real folder it points to, then rerun; "
                 "`msa store verify STORE` lists every such path.")


# ----------------------------------------------------------------------------- whole-file checksums and tables


def read_parquet(be: Backend, key: str, label: str, hint: str, columns: list[str] | None = None, *,
                 missing_hint: str | None = None) -> Any:
    """The Parquet table ``key`` (``columns`` only; page checksums verified). ShardMissingError when absent
    (hint ``missing_hint``, default ``hint``), ShardCorruptError when unreadable; ``label`` names it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from msa_memory.errors import ShardCorruptError, ShardMissingError

    try:
        with be.open_input(key) as f:
            # no read-ahead, no thread pool: with either, Arrow leaves native threads that abort the process
            # at exit now and then (SIGABRT, "terminate called without an active exception";
            # apache/arrow#34314; tests/fault/test_parquet_exit.py). The backends' files buffer their reads,
            # and these tables are small (a shard's documents, a manifest's)
            return pq.read_table(f, columns=columns, page_checksum_verification=True, pre_buffer=False,
                                 use_threads=False)
    except (FileNotFoundError, NotADirectoryError):
        raise ShardMissingError(f"{label} is missing.", hint=missing_hint or hint) from None
    except (OSError, pa.ArrowException) as e:
        raise ShardCorruptError(f"{label} is unreadable or corrupt ({e}).", hint=hint) from None


def file_crc(be: Backend, key: str) -> tuple[int, int]:
    """(size, crc32c) of a whole key, read in 8 MiB pieces."""
    import crc32c

    crc, size = 0, 0
    with be.open_input(key) as f:
        while block := f.read(8 << 20):
            crc = crc32c.crc32c(block, crc)
            size += len(block)
    return size, crc


def check_files(be: Backend, rel_dir: str, files: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
    """(store-relative path, problem) for each of ``files`` (name -> {"size", "crc32c"}) under ``rel_dir``
    that is missing, reached through a link, or whose size or crc32c differs."""
    bad: list[tuple[str, str]] = []
    for rel, want in files.items():
        where = f"{rel_dir}/{rel}"
        link = be.link_in_path(where)
        if link is not None:  # never read through a link (it may lead outside the store)
            bad.append((where, link))
            continue
        try:
            size, crc = file_crc(be, where)
        except FileNotFoundError:
            bad.append((where, "missing"))
            continue
        if size != want["size"]:
            bad.append((where, f"size {size} != {want['size']}"))
        elif crc != want["crc32c"]:
            bad.append((where, "crc32c mismatch"))
    return bad


# ----------------------------------------------------------------------------- write failures


def os_write_error(be: Backend, e: BaseException, action: str) -> MsaError | None:
    """The store error a failed write ``e`` means (disk full, read-only store), or None for other errors."""
    if isinstance(e, MsaError) or not isinstance(e, OSError):
        return None
    what = f" ({e.strerror or e}: {e.filename})" if e.filename else f" ({e.strerror or e})"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        free_bytes = be.free_bytes()
        free = f"{free_bytes:,} bytes free" if free_bytes is not None else "free space unknown"
        return DiskFullError(
            f"No space left on the device of store {str(be)!r} during {action}{what}, {free}: no version was "
            "published and nothing already stored was changed.",
            hint=f"Free space on that device (`msa store gc {be} --yes` removes files no version uses), then rerun.")
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return StoreNotWritableError(
            f"Store {str(be)!r} is not writable{what}; {action} needs to write to it, so nothing was changed.",
            hint="Reads (info, versions, docs, verify, gc --dry-run, repair --dry-run) work as they are; to change the "
                 "store, make its folder writable (permissions, or remount it read-write) or copy it somewhere writable.")
    return None
