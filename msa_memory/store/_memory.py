"""An in-process backend with object-storage semantics: the reference the contract suite holds beside
the local one, and the shape of an S3 backend.

Keys live in a dict of ``bytes`` (flat, like objects in a bucket: a "folder" is only a prefix that keys
share). No atomic rename, no links; a conditional publish is a check-and-set under a mutex, as a
bucket's ``If-None-Match: *`` PUT is. Locks are in-process (``threading.RLock``), so two processes
never share a memory store (``shared_across_processes`` is False). ``MemoryBackend.named("memory://x")``
returns the same store each time within a process.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import BinaryIO, ClassVar

from msa_memory.store.backend import Backend, Buffers, KeyInfo, check_key

__all__ = ["MemoryBackend"]


class MemoryBackend(Backend):
    """Keys in a dict; ``root`` is the name (``memory://NAME``)."""

    supports_atomic_rename = False
    supports_links = False
    supports_locks = True
    shared_across_processes = False

    _named: ClassVar[dict[str, MemoryBackend]] = {}
    _named_guard: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, root: str = "memory://") -> None:
        self.root = root
        self._objects: dict[str, tuple[bytes, float]] = {}
        self._mutex = threading.Lock()
        self._locks: dict[str, threading.RLock] = {}

    @classmethod
    def named(cls, name: str) -> MemoryBackend:
        with cls._named_guard:
            be = cls._named.get(name)
            if be is None:
                be = cls._named[name] = cls(name)
            return be

    def _get(self, key: str) -> bytes:
        try:
            return self._objects[check_key(key)][0]
        except KeyError:
            raise FileNotFoundError(f"{self.root}/{key}") from None

    # ---------------------------------------------------------------- reads
    def read(self, key: str) -> bytes:
        return self._get(key)

    def read_ranges(self, key: str, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        data = self._get(key)
        return [data[max(len(data) + off, 0) if off < 0 else off:][:length] for off, length in ranges]

    def open_input(self, key: str) -> BinaryIO:
        return io.BytesIO(self._get(key))

    def stat(self, key: str) -> KeyInfo | None:
        check_key(key)
        obj = self._objects.get(key)
        if obj is not None:
            return KeyInfo(key, "file", len(obj[0]), obj[1])
        under = [m for k, (_, m) in list(self._objects.items()) if k.startswith(key + "/")]
        return KeyInfo(key, "folder", 0, max(under)) if under else None

    def list(self, prefix: str = "") -> list[str]:
        start = f"{check_key(prefix, allow_root=True)}/" if prefix else ""
        return sorted({k[len(start):].split("/", 1)[0] for k in list(self._objects) if k.startswith(start)})

    def walk(self, prefix: str) -> list[KeyInfo]:
        start = check_key(prefix) + "/"
        out: dict[str, KeyInfo] = {}
        for k, (data, mtime) in list(self._objects.items()):
            if k.startswith(start):
                out[k] = KeyInfo(k, "file", len(data), mtime)
                parts = k[len(start):].split("/")[:-1]
                for i in range(len(parts)):  # the prefixes between, as folders
                    sub = start + "/".join(parts[:i + 1])
                    out.setdefault(sub, KeyInfo(sub, "folder", 0, mtime))
        return sorted(out.values(), key=lambda i: i.key)

    # ---------------------------------------------------------------- writes
    def write(self, key: str, data: Buffers, *, exclusive: bool = False, durable: bool = True) -> None:
        check_key(key)
        blob = bytes(data) if isinstance(data, (bytes, bytearray, memoryview)) else b"".join(bytes(b) for b in data)
        with self._mutex:
            if exclusive and key in self._objects:
                raise FileExistsError(f"{self.root}/{key} exists")
            self._objects[key] = (blob, time.time())

    def delete(self, key: str) -> None:
        with self._mutex:
            self._objects.pop(check_key(key), None)

    def delete_prefix(self, prefix: str) -> None:
        start = check_key(prefix) + "/"
        with self._mutex:
            for k in [k for k in self._objects if k == prefix or k.startswith(start)]:
                del self._objects[k]

    @contextmanager
    def lock(self, name: str, timeout: float) -> Iterator[None]:
        with self._mutex:
            lk = self._locks.setdefault(check_key(name), threading.RLock())
        if not lk.acquire(timeout=max(timeout, 0.0)):
            raise TimeoutError(f"lock {self.root}/{name} not taken within {timeout:g} s")
        try:
            yield
        finally:
            lk.release()

    # ---------------------------------------------------------------- test helpers
    def set_mtime(self, key: str, mtime: float) -> None:
        """Age a key (gc's grace period is measured on mtimes)."""
        with self._mutex:
            self._objects[key] = (self._objects[key][0], mtime)
