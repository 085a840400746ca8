"""Storage backends: the one seam between the store's logic and the medium that holds its bytes.

Design note. The store names everything by *keys*: '/'-separated paths relative to the store root
(``versions/00000003.json``, ``shards/job-000/kv/c.0.0.0.0.0``). A :class:`Backend` reads and writes
keys and nothing else; every module of ``msa_memory/store/`` goes through one, and only the local
backend (``_local.py``) touches the operating system. What the store needs of a medium is small:

- read a whole key, or byte ranges of it (a document's K̄V̄ is one range of a shard file);
- write a key once (``write(..., exclusive=True)``: refused if it exists) and make it durable;
- *conditional publish* (``publish``): create a key with its complete content only if it is absent,
  telling the caller whether it won. A version manifest comes into existence only this way: it is
  the store's single commit point, so of two writers publishing the same version exactly one wins,
  with or without a lock (on object storage: a PUT with ``If-None-Match: *``);
- replace a small key atomically (hints, tags, the id counter, leases), list children of a prefix,
  walk a prefix, stat a key (size, mtime, kind), delete a key or a whole prefix (idempotent).

Capability flags say what else a medium offers; the store chooses its protocol by them:

- ``supports_atomic_rename``: a prefix (folder) can be renamed in one step. With it a shard is written
  under ``staging/`` and renamed into ``shards/``; without it the shard's files are written in place
  and its ``_record.json`` is written last, exclusively: a shard exists once its record does.
- ``supports_links``: the medium has symbolic links. The store never makes one and never reads,
  writes or deletes through one (``entry_problem``, ``link_in_path``); media without links skip it.
- ``supports_locks``: a cross-process lock (``lock``). Commits do not need it for correctness (the
  conditional publish decides), but maintenance and the id counter serialise on it.
- ``shared_across_processes``: another process opening the same location sees the same keys.

Errors: an absent key raises ``FileNotFoundError``; ``write(..., exclusive=True)`` on an existing key
raises ``FileExistsError``; a key that is not a clean relative path raises :class:`StoreLayoutError`
(a ``ValueError``); any other failure of the medium is an ``OSError`` (ENOSPC, EROFS... on a local
disk; the store turns those into DiskFullError / StoreNotWritableError). The contract suite
``tests/unit/store/test_store_backends.py`` holds every backend to these rules.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, BinaryIO, ClassVar, Literal

from msa_memory.errors import StoreLayoutError

__all__ = ["Backend", "KeyInfo", "Buffers", "check_key"]

#: what ``write`` takes: one bytes-like object, or a sequence of them written back to back
Buffers = Any

_PART = re.compile(r"^[^/\x00]+$")


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """What ``stat`` and ``walk`` say of a key (``lstat`` semantics: links are reported, not followed)."""

    key: str
    """The key, relative to the store root."""
    kind: Literal["file", "folder", "link", "other"]
    """A regular object/file, a folder (a prefix that has keys under it), a symbolic link, or anything else."""
    size: int
    """Bytes of a file; 0 for the other kinds."""
    mtime: float
    """Last modification, seconds since the epoch."""
    target: str | None = None
    """Where a link points (kind ``"link"`` only)."""


def check_key(key: str, *, allow_root: bool = False) -> str:
    """Validate a key: '/'-separated parts, none empty, '.' or '..' (``allow_root``: "" names the root)."""
    if key == "" and allow_root:
        return key
    if not isinstance(key, str) or key.startswith("/") or not all(
            _PART.match(p) and p not in (".", "..") for p in key.split("/")):
        raise StoreLayoutError(f"Store key {key!r} is not a relative path inside the store; nothing was read or "
                               "written.", hint="This is a bug in the caller: keys are 'folder/name' paths.")
    return key


class Backend(ABC):
    """Where one store's keys live. Subclasses set the capability flags and implement the abstract verbs."""

    supports_atomic_rename: ClassVar[bool] = False
    supports_links: ClassVar[bool] = False
    supports_locks: ClassVar[bool] = False
    shared_across_processes: ClassVar[bool] = False

    #: the location as the user named it (a Path for a local store): messages quote ``str(backend)``
    root: Any

    def __str__(self) -> str:
        return str(self.root)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r})"

    # ---------------------------------------------------------------- reads
    @abstractmethod
    def read(self, key: str) -> bytes:
        """The whole content of ``key``; FileNotFoundError when absent."""

    @abstractmethod
    def read_ranges(self, key: str, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """``(offset, length)`` ranges of ``key`` (a negative offset counts from the end); a range past the end
        comes back short. One open / one request batch for all of them; FileNotFoundError when absent."""

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        return self.read_ranges(key, [(offset, length)])[0]

    @abstractmethod
    def open_input(self, key: str) -> BinaryIO:
        """A seekable, readable binary file of ``key`` (Parquet readers fetch only the columns they need)."""

    @abstractmethod
    def stat(self, key: str) -> KeyInfo | None:
        """What ``key`` is (not following a link), or None when absent."""

    def exists(self, key: str) -> bool:
        return self.stat(key) is not None

    def probe(self, key: str) -> bool:
        """``exists`` for a key the caller knows to name a file (a version manifest): object stores answer it
        with one HEAD, where ``exists`` must also look for keys under it (a folder). The version probes of
        every open use it. Default: ``exists`` (a link counts, as ``stat`` reports it)."""
        return self.exists(key)

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Sorted names of the direct children of ``prefix`` ("" = the root); [] when it has none."""

    @abstractmethod
    def walk(self, prefix: str) -> list[KeyInfo]:
        """Every entry under ``prefix`` (recursively, links listed but never entered), sorted by key."""

    # ---------------------------------------------------------------- writes
    @abstractmethod
    def write(self, key: str, data: Buffers, *, exclusive: bool = False, durable: bool = True) -> None:
        """Write ``data`` (bytes-like, or a sequence of them) to ``key``, durable on return.

        ``exclusive`` (write-once): FileExistsError if ``key`` exists, and nothing is changed. A write
        that fails leaves no partial key behind. ``durable=False`` may skip the flush to stable storage
        (leases: a machine that crashes takes its readers with it)."""

    def replace(self, key: str, data: bytes) -> None:
        """Atomically set ``key`` to ``data``: a reader sees the old content or the new, never a mix.

        Here one :meth:`write`, which is atomic where a whole object is put at once (object stores, memory);
        a backend whose writes are not (a local file) overrides it."""
        self.write(key, data)

    def publish(self, key: str, data: bytes) -> bool:
        """Conditional publish: create ``key`` with ``data`` only if absent; True if this call created it.

        The content is complete the moment the key can be seen, and of concurrent publishers of one
        key (threads, processes, hosts) exactly one gets True. Here one write-once :meth:`write`, which
        must then be such a create-if-absent; a backend that publishes otherwise (a link) overrides it."""
        try:
            self.write(key, data, exclusive=True)
        except FileExistsError:
            return False
        return True

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key`` (a file or link, never followed); nothing happens when it is absent."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> None:
        """Remove ``prefix`` and everything under it without following links; nothing happens when absent.
        OSError names what could not be removed."""

    def rename_prefix(self, src: str, dst: str) -> None:
        """Move everything under ``src`` to ``dst`` in one atomic step (``supports_atomic_rename`` only);
        FileExistsError when ``dst`` exists."""
        raise NotImplementedError(f"{type(self).__name__} has no atomic rename")

    def make_prefix(self, prefix: str) -> None:
        """Create ``prefix`` as an empty folder where the medium has folders (nothing to do on object storage)."""

    def sync_prefix(self, prefix: str) -> None:
        """Make the creation of every entry under ``prefix`` durable (a local disk fsyncs folders)."""

    @contextmanager
    def lock(self, name: str, timeout: float) -> Iterator[None]:
        """Hold the cross-process lock ``name`` (``supports_locks``); TimeoutError after ``timeout`` s."""
        raise NotImplementedError(f"{type(self).__name__} has no locks")
        yield  # pragma: no cover

    # ---------------------------------------------------------------- hardening hooks (media with links)
    def entry_problem(self, key: str, want_folder: bool) -> str | None:
        """Why ``key`` is not a real folder (``want_folder``) / regular file inside the root; None if it is or is
        absent. Media without links have nothing to say."""
        return None

    def link_in_path(self, key: str) -> str | None:
        """The first symbolic link on the way from the root to ``key`` as a problem line, or None."""
        return None

    def free_bytes(self) -> int | None:
        """Free space of the medium, None when unknown or unbounded."""
        return None

