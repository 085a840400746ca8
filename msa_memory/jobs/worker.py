"""Worker side of the msa-encode job: the cached model and the encode-and-write-shard task.

``get_encoder`` loads a model once per process (a Dask worker) and caches it, keyed by model,
adapter, device, dtype and batch size; ``encode_and_write_shard`` reads its batch of passages
(``ShardTask.load_passages``: a plain-text file's passages are read back from the file by byte
range, each block checked against the digest the scan took), encodes them with it and writes one
immutable shard with ``store.write_shard``. Nothing here reads or writes a
version manifest: only the job's single commit (``encode_job``) does.

A task gets the store's location, not an open store: a path or URL string, or a remote backend
(an ``S3Backend`` pickles as its URL and options). The worker opens the store's backend itself, so
workers that share nothing but a bucket write their shards straight to it; every store-side check
(is the shard there?) goes through that backend, never through a local path.

Key invariant: a task is a pure function of its ``ShardTask`` and ``ModelSpec`` (same inputs,
same shard bytes), which is what lets a resumed job trust shards written by an earlier run. A file
that changed since the plan makes the task fail with a JobError naming it (nothing is committed).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from msa_memory.jobs.plan import ShardTask

__all__ = ["ModelSpec", "ShardResult", "get_encoder", "encode_and_write_shard"]


# ----------------------------------------------------------------------------- model cache


@dataclass(frozen=True)
class ModelSpec:
    """How a worker loads the model: the cache key of ``get_encoder``."""

    name: str = "default"
    adapter: str | None = None
    device: str = "auto"
    """``auto``: ``cuda:<worker index>`` where there are GPUs, else ``cpu``."""
    dtype: str | None = None
    torch_threads: int | None = None
    """torch intra-op threads while encoding (None: torch's default, all cores)."""
    max_batch_tokens: int = 8192
    keep_router_inputs: bool = False
    """Also keep the pooled router-layer inputs (``x_router``) so ``reindex-router`` can re-key the store."""
    tokenizer: str | None = None
    """Tokenizer folder for a checkpoint saved without one (``load_model(tokenizer=...)``); None: the model's own."""


_CACHE: dict[tuple[Any, ...], tuple[Any, Any, threading.Lock]] = {}
_CACHE_LOCK = threading.Lock()


def _resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    index = 0
    try:
        from distributed import get_worker

        name = get_worker().name
        index = int(name) if str(name).isdigit() else 0
    except (ValueError, ImportError):
        pass
    return f"cuda:{index % torch.cuda.device_count()}"


def get_encoder(spec: ModelSpec, *, device: str | None = None) -> tuple[Any, Any, threading.Lock]:
    """``(LoadedModel, Encoder, lock)`` for ``spec``, loaded once per process (worker) and cached."""
    dev = device or _resolve_device(spec.device)
    key = (spec.name, spec.adapter, dev, spec.dtype, spec.max_batch_tokens, spec.keep_router_inputs, spec.tokenizer)
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
        if hit is not None:
            return hit
        from msa_memory.encode import Encoder, load_model

        kwargs: dict[str, Any] = {"adapter": spec.adapter, "device": dev, "tokenizer": spec.tokenizer}
        if spec.dtype is not None:
            import torch

            kwargs["dtype"] = getattr(torch, spec.dtype)
        model = load_model(spec.name, **kwargs)
        entry = (model, Encoder(model, max_batch_tokens=spec.max_batch_tokens,
                                 keep_router_inputs=spec.keep_router_inputs), threading.Lock())
        _CACHE[key] = entry
        return entry


# ----------------------------------------------------------------------------- worker task


@dataclass(frozen=True)
class ShardResult:
    """What a worker returns: the shard record to commit and a few figures."""

    shard_id: str
    record: Any
    n_docs: int
    n_tokens: int
    n_bytes: int
    seconds: float
    reused: bool = False
    taken: bool = False
    """The shard id was taken by another job on the same store (an identical msa-encode running at the
    same time) with a shard this task cannot reuse, e.g. one that job has committed: ``record`` is
    None, and the job reports a version conflict instead of committing."""


def encode_and_write_shard(task: ShardTask, spec: ModelSpec, store_root: Any) -> ShardResult:
    """Encode one batch of passages and write it as one immutable shard (no manifest is touched).

    When another job on the same store (the same command started twice) has written this shard id
    already, its shard is reused if it holds exactly this task's documents (same plan, same reserved
    ids: the same bytes; ``find_shard`` verifies its checksums); otherwise the result is ``taken``.
    """
    from msa_memory.errors import DuplicateDocumentError, StoreExistsError
    from msa_memory.store import write_shard
    from msa_memory.store._layout import RECORD_FILE, SHARDS_DIR, open_backend

    t0 = time.perf_counter()
    be = open_backend(store_root)
    # a shard exists once its record does (files without one are a crashed writer's debris: rewritten)
    record_key = f"{SHARDS_DIR}/{task.shard_id}/{RECORD_FILE}"
    if be.probe(record_key):   # written by a job beside this one
        return _written_by_another(task, store_root, t0)
    passages = task.load_passages()   # JobError when a streamed file changed since the plan
    _, encoder, lock = get_encoder(spec)
    with lock, _torch_threads(spec.torch_threads):
        encoded = encoder.encode(task.doc_ids, passages)
    try:
        record = write_shard(be, task.shard_id, passages, encoded)
    except StoreExistsError:           # the other job wrote it while this one encoded
        return _written_by_another(task, store_root, t0)
    except DuplicateDocumentError:     # ... and has committed it: these ids are used now
        if not be.probe(record_key):
            raise
        return _written_by_another(task, store_root, t0)
    return ShardResult(task.shard_id, record, n_docs=len(passages), n_tokens=int(np.sum(encoded.n_tokens)),
                       n_bytes=int(getattr(record, "n_bytes", 0) or 0), seconds=time.perf_counter() - t0)


def _written_by_another(task: ShardTask, store_root: Any, t0: float) -> ShardResult:
    """The shard another job wrote under ``task.shard_id``: reused when it holds ``task``'s documents, else taken."""
    from msa_memory.store import open_store

    rec = open_store(store_root).find_shard(task.shard_id)   # None: committed, or not this store's / damaged
    if rec is not None and np.array_equal(np.asarray(rec.doc_ids), task.doc_ids):
        return ShardResult(task.shard_id, rec, task.n_docs, int(np.sum(rec.n_tokens)), int(rec.n_bytes),
                           time.perf_counter() - t0, reused=True)
    return ShardResult(task.shard_id, None, task.n_docs, 0, 0, time.perf_counter() - t0, taken=True)


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """Run torch with ``n`` intra-op threads for the block (process-wide; restored after)."""
    if not n:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)
