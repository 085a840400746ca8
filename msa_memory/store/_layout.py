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
"""

from __future__ import annotations

import json
import os
import re
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from msa_memory.errors import ConfigError

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

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_VERSION_RE = re.compile(r"^(\d{8,})\.json$")


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
    """Write ``data`` to a new file and fsync it (the caller renames it into place)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def dumps(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode()


def replace_json_atomic(path: Path, obj: Any) -> None:
    """Atomically replace ``path`` with ``obj`` as JSON (temp file, fsync, rename, fsync dir)."""
    tmp = path.with_name(f".{path.name}.{token()}.tmp")
    write_bytes_durable(tmp, dumps(obj))
    os.replace(tmp, path)
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
