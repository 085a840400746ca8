"""A local cache of the router keys of remote stores (S3): read once per machine, then from local disk.

Design note. Opening ``Memory`` reads every router key of a version (each router layer of each shard,
one ranged GET per block); on object storage that is the slow part of opening, and the same bytes come
back at every open. Blocks of a shard never change once written (a shard and a re-keyed router-key
array are write-once, and a rewrite gets another record checksum or path), so they are cached by what
names them, not by version: a new version that appends shards reads only the new shards' keys.

Where: ``$MSA_CACHE_DIR/router-keys/`` if set, else ``$XDG_CACHE_HOME/msa-memory/router-keys/``, else
``~/.cache/msa-memory/router-keys/``; one folder per store URL (``sha256(url)[:16]``), one file per
block, named by ``sha256(url, array key, shard record crc32c, router-keys path, layer)``. A file holds
the block's bytes and a crc32c trailer; a file that fails its check is read again from the store and
rewritten. The cache is best effort: a cache that cannot be written (read-only home, full disk) only
costs the reads. Delete the folder to reclaim the space; nothing else removes it.

Only the local backend touches the disk (``_local.LocalBackend`` on the cache folder).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import crc32c
import numpy as np

from msa_memory.store._local import LocalBackend

__all__ = ["RouterKeyCache", "cache_root"]


def cache_root() -> Path:
    """The folder that holds the router-key caches of all remote stores (see the module note)."""
    if os.environ.get("MSA_CACHE_DIR"):
        return Path(os.environ["MSA_CACHE_DIR"]) / "router-keys"
    base = Path(os.environ["XDG_CACHE_HOME"]) if os.environ.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "msa-memory" / "router-keys"


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class RouterKeyCache:
    """The cache of one store URL; counts hits, misses and the bytes each served."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.dir = cache_root() / _sha(url)[:16]
        self._disk: LocalBackend | None = None
        self.stats = {"hits": 0, "misses": 0, "bytes_from_cache": 0, "bytes_from_store": 0, "write_errors": 0}

    def _be(self) -> LocalBackend:
        if self._disk is None:
            self._disk = LocalBackend(self.dir, use_links=False)
        return self._disk

    def block(self, ident: str, shape: tuple[int, ...], dtype: Any, read: Callable[[], np.ndarray]) -> np.ndarray:
        """The block named ``ident`` ((shape) of ``dtype``): from the cache, else ``read()`` and cached."""
        key = _sha(f"{self.url}|{ident}")[:40] + ".bin"
        dt = np.dtype(dtype)
        n = int(np.prod(shape)) * dt.itemsize
        try:
            raw = self._be().read(key)
            if len(raw) == n + 4 and crc32c.crc32c(raw[:n]) == int.from_bytes(raw[n:], "little"):
                self.stats["hits"] += 1
                self.stats["bytes_from_cache"] += n
                return np.frombuffer(raw, dtype=dt, count=int(np.prod(shape))).reshape(shape).copy()
        except (OSError, ValueError):
            pass
        arr = np.ascontiguousarray(read())
        self.stats["misses"] += 1
        self.stats["bytes_from_store"] += arr.nbytes
        if arr.shape == tuple(shape) and arr.dtype == dt:
            data = arr.tobytes()
            try:
                self._be().replace(key, data + crc32c.crc32c(data).to_bytes(4, "little"))
            except (OSError, ValueError):
                self.stats["write_errors"] += 1
        return arr

    def info(self) -> dict[str, Any]:
        return {"dir": str(self.dir), **self.stats}
