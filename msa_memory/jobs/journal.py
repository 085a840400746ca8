"""The job journal: the document ids a plan reserved, kept in the store (``_jobs/<plan id>.json``, through
its backend) before any shard is encoded, so that a killed job started again takes the same ids and
reuses the shards it wrote (see :mod:`msa_memory.jobs.encode_job`); and where a job's store is.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from msa_memory.store import MemoryStore
    from msa_memory.store.backend import Backend

__all__ = ["JOURNAL_DIR", "store_location", "is_local", "reserve_ids", "remove_journals"]


JOURNAL_DIR = "_jobs"

def store_location(store: str | os.PathLike[str] | MemoryStore | Backend) -> str | Backend:
    """Where the job's store is, as the job and its workers open it: a local path or URL string, or a
    remote backend object (an ``S3Backend`` built with options pickles as its URL and options)."""
    from msa_memory.store import MemoryStore
    from msa_memory.store.backend import Backend

    if isinstance(store, MemoryStore):
        store = store.backend
    if isinstance(store, Backend):
        return store if getattr(store, "remote", False) else str(store.root)
    return str(store)

def is_local(location: str | Backend) -> bool:
    """Whether ``location`` names a local folder (not a URL, not a backend object)."""
    return isinstance(location, str) and "://" not in location

def _journal_key(plan_id: str) -> str:
    return f"{JOURNAL_DIR}/{plan_id}.json"

def _read_journal(be: Backend, plan_id: str, n: int) -> np.ndarray | None:
    try:
        data = json.loads(be.read(_journal_key(plan_id)))
        ids = np.asarray(data["doc_ids"], dtype=np.int64)
        if data.get("plan_id") == plan_id and ids.shape == (n,):
            return ids
    except (OSError, ValueError, KeyError, TypeError):
        pass  # missing or unreadable journal: reserve anew (ids are never reused, gaps are harmless)
    return None

def reserve_ids(store: MemoryStore, plan_id: str, n: int) -> np.ndarray:
    """Ids for the plan's ``n`` passages: the journal's (a resumed job) or freshly reserved.

    A new journal is created by the backend's conditional publish, so two identical jobs started at
    once take the same ids (the loser's reservation is a harmless gap), write the same shards and
    leave the commit to decide which of them publishes.
    """
    be, key = store.backend, _journal_key(plan_id)
    existed = be.probe(key)
    if existed and (ids := _read_journal(be, plan_id, n)) is not None:
        return ids
    ids = np.asarray(store.reserve_ids(n), dtype=np.int64)  # (n,) int64
    data = json.dumps({"plan_id": plan_id, "doc_ids": ids.tolist()}).encode()
    if existed:
        be.replace(key, data)    # an unreadable journal: this one replaces it
    elif not be.publish(key, data):   # an identical job beside this one wrote it first: take its ids
        if (theirs := _read_journal(be, plan_id, n)) is not None:
            return theirs
        be.replace(key, data)
    return ids

def remove_journals(be: Backend) -> None:
    """Remove every job journal (best effort: a stale journal names a plan no later job computes)."""
    try:
        for name in be.list(JOURNAL_DIR):
            if name.endswith(".json"):
                be.delete(f"{JOURNAL_DIR}/{name}")
    except OSError:
        pass
