"""Readers' leases: how gc learns which versions open snapshots still read.

gc keeps, besides the versions it is told to keep, every version that (a) was superseded less than its
grace period ago (the mtime of the next manifest): a snapshot that opened it as the latest version
within the grace period reads it; or (b) holds a lease younger than the grace period.

A lease is a small file ``leases/{N:08d}.{hex}.json`` whose mtime is its age. A snapshot of an explicit
version (a number or tag: possibly an old one) takes it at open, before the manifest is read; a
snapshot opened as the latest version takes it lazily, once it has been in use for ``RENEW_S`` (rule
(a) covers it until then, and short-lived snapshots write nothing). A snapshot renews its lease as it
is used (at most once per ``RENEW_S``) and drops it when it is garbage-collected or the process
exits. So a snapshot opened within the grace period, and one in use since, never loses the files it
reads; a lease older than the grace period (a crashed or idle reader) is ignored, and gc removes lease
files older than a day. Taking a lease is best effort: on a store this process cannot write
(read-only, disk full, a link where ``leases/`` should be) the snapshot holds none, which is safe
there because gc can't delete either.
"""

from __future__ import annotations

import os
import socket
import time
import weakref
from typing import Any

from msa_memory.store._layout import LEASE_RE, LEASES_DIR, dumps, now_iso, token
from msa_memory.store.backend import Backend

__all__ = ["Lease", "young_leases", "expired_leases", "RENEW_S", "EXPIRE_S"]

#: a lease is renewed by a snapshot in use at most this often (gc's grace period must be longer)
RENEW_S = 60.0
#: gc removes lease files older than this (or than its grace period, if longer): their readers are gone
EXPIRE_S = 24 * 3600.0


def _release(be: Backend, key: str) -> None:
    try:
        be.delete(key)
    except Exception:  # noqa: BLE001 - at exit or in a finalizer: nothing to report to
        pass


class Lease:
    """One snapshot's lease on ``version``: taken now (``eager``) or on the first renewal; ``key`` is None
    while none is held."""

    def __init__(self, owner: object, be: Backend, version: int, eager: bool) -> None:
        self.be, self.version, self.key = be, version, None
        self._owner = weakref.ref(owner)
        self._renewed = time.monotonic()
        self._finalizer: Any = None
        if eager:
            self._take()

    def _body(self) -> bytes:
        return dumps({"version": self.version, "host": socket.gethostname(), "pid": os.getpid(), "renewed": now_iso()})

    def _take(self) -> None:
        owner = self._owner()
        be = self.be
        if owner is None or (be.supports_links and (be.link_in_path(LEASES_DIR) or be.entry_problem(LEASES_DIR, True))):
            return  # never write through a link; gc refuses such a store anyway
        key = f"{LEASES_DIR}/{self.version:08d}.{token()}.json"
        try:
            be.write(key, self._body(), durable=False)
        except OSError:
            return
        self.key = key
        self._finalizer = weakref.finalize(owner, _release, be, key)

    def renew(self) -> None:
        """Take or rewrite the lease (its mtime is its age) if the last renewal is older than RENEW_S."""
        if time.monotonic() - self._renewed < RENEW_S:
            return
        self._renewed = time.monotonic()
        if self.key is None:
            self._take()
            return
        try:
            self.be.write(self.key, self._body(), durable=False)
        except OSError:
            pass

    def release(self) -> None:
        if self._finalizer is not None:
            self._finalizer()
        self.key = self._finalizer = None


def _leases(be: Backend, now: float) -> list[tuple[int, str, float]]:
    """(version, key, age in s) of every lease file."""
    out = []
    for name in be.list(LEASES_DIR):
        m = LEASE_RE.match(name)
        info = be.stat(f"{LEASES_DIR}/{name}") if m else None
        if m and info is not None and info.kind == "file":
            out.append((int(m.group(1)), info.key, now - info.mtime))
    return out


def young_leases(be: Backend, grace_s: float, now: float | None = None) -> dict[int, list[dict[str, Any]]]:
    """version -> [{"path", "age_s"}] of every lease younger than ``grace_s`` seconds."""
    out: dict[int, list[dict[str, Any]]] = {}
    for version, key, age in _leases(be, time.time() if now is None else now):
        if age < grace_s:
            out.setdefault(version, []).append({"path": key, "age_s": round(age, 3)})
    return out


def expired_leases(be: Backend, older_than_s: float, now: float | None = None) -> list[str]:
    """Keys of the leases older than ``older_than_s`` seconds."""
    return [key for _, key, age in _leases(be, time.time() if now is None else now) if age >= older_than_s]
