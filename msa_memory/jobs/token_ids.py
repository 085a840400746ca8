"""``encode_token_ids``: documents given as token ids → one store version, through the msa-encode job.

For work in token ids (comparisons with the reference implementation, pre-tokenised corpora). Each
document is one MSA document, never split into passages; the encoder puts the same frame around its
ids that it puts around a text document's tokens (``LoadedModel.wrap_token_ids``: the MSA wrap
``<|im_start|>[id]. … [id]<|im_end|>`` or ``[BOS] …``), with positions from 0. Planning, shard tasks
on Dask workers, resume and the one commit are ``encode_corpus``'s own (``jobs.encode_job``).

Identity: a document's key is stored as its ``source_path``; its ``file_sha256`` is the sha256 of its
ids as little-endian int64 (:func:`token_ids_sha256`). So a rerun with the same ids commits nothing,
new ids under a key replace that key's document, and keys not given are kept. The stored ``text`` is
``tokenizer.decode(ids)``: what search results show and what text-mode answers put in the prompt.

What it does not do: split long documents (a document longer than the model's context is the
caller's to cut), or delete keys (use ``store.commit(delete_ids=...)``).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from msa_memory.encode.sources import CorpusScan, SourceText
from msa_memory.errors import ConfigError
from msa_memory.jobs.journal import reserve_ids, store_location
from msa_memory.jobs.runner import (JobResult, Prepared, ProgressFn, default_shard_tokens, job_result, open_existing,
                                    open_or_create, queue_tasks, run_tasks, shipped_adapter_of)
from msa_memory.jobs.plan import FileDiff, diff_sources, make_shard_tasks, plan_id_of
from msa_memory.jobs.worker import ModelSpec, get_encoder
from msa_memory.schemas.records import Passage

if TYPE_CHECKING:
    from distributed import Client

    from msa_memory.store import MemoryStore

__all__ = ["encode_token_ids", "token_ids_sha256"]

TokenDocs = Mapping[str, Any] | Iterable[tuple[str, Any]]


def token_ids_sha256(ids: Sequence[int]) -> str:
    """sha256 (hex) of token ids as little-endian int64: a token-id document's ``file_sha256``."""
    return hashlib.sha256(np.asarray(ids, dtype="<i8").tobytes()).hexdigest()


def _as_docs(docs: TokenDocs) -> list[tuple[str, np.ndarray]]:
    """(key, (T,) int64 ids) pairs in the given order; ConfigError on a bad key, duplicate or id list."""
    items = list(docs.items()) if isinstance(docs, Mapping) else list(docs)
    out: list[tuple[str, np.ndarray]] = []
    seen: set[str] = set()
    for n, item in enumerate(items):
        try:
            key, ids = item
        except (TypeError, ValueError):
            raise ConfigError(f"Token-id document {n} is {type(item).__name__}, not a (key, ids) pair.",
                              hint="Pass {key: [ids...]} or [(key, [ids...]), ...].") from None
        if not isinstance(key, str) or not key:
            raise ConfigError(f"Token-id document {n} has key {key!r}; keys are non-empty strings, e.g. 'doc-17'.")
        if key in seen:
            raise ConfigError(f"Token-id document key {key!r} is given twice; keys name one document each.")
        seen.add(key)
        arr = np.asarray(ids.detach().cpu().numpy() if hasattr(ids, "detach") else ids)
        if arr.ndim != 1 or arr.size == 0 or arr.dtype.kind not in "iu":
            raise ConfigError(f"Token-id document {key!r} must be a non-empty 1-D sequence of integer token ids, got "
                              f"{type(ids).__name__} of shape {arr.shape} and dtype {arr.dtype}.")
        out.append((key, arr.astype(np.int64)))
    if not out:
        raise ConfigError("No token-id documents were given.", hint="Pass {key: [ids...]} with at least one document.")
    return out


def _plan(pairs: list[tuple[str, np.ndarray]], root: Any, spec: ModelSpec, *, shard_tokens: int,
          message: str | None, dry_run: bool, progress: ProgressFn | None) -> Prepared:
    """What encode_job._prepare does for folders, for token-id documents."""
    t0 = time.perf_counter()
    shas = {key: token_ids_sha256(ids) for key, ids in pairs}
    sources = [SourceText(key=k, text="", sha256=shas[k], n_bytes=8 * len(ids), kind="token_ids", path="")
               for k, ids in pairs]
    scan = CorpusScan(sources=sorted(sources, key=lambda s: s.key), roots=[k for k, _ in pairs])
    opened = open_existing(root)
    if opened is not None and opened.identity.hidden_size > 0 and not spec.keep_router_inputs:
        spec = replace(spec, keep_router_inputs=True)  # the store keeps x_router: so do its appends
    diff = diff_sources(scan, opened) if opened is not None else None
    model = None
    if diff is None or diff.has_changes or dry_run:
        model, _, _ = get_encoder(spec, device="cpu" if spec.device == "auto" else spec.device)
        for key, ids in pairs:                          # fail before anything is reserved or written
            model.check_token_ids(ids, f"Token-id document {key!r}")
        identity = model.identity(keep_router_inputs=spec.keep_router_inputs)
        opened = open_or_create(root, identity, create=not dry_run)
    if opened is None:  # dry run against a store that does not exist yet
        diff = FileDiff(read_version=-1, to_encode=list(scan.sources), added=[s.key for s in scan.sources])
    elif diff is None:  # the store was just created
        diff = diff_sources(scan, opened)
    result = job_result(root, opened, diff, dry_run)
    prepared = Prepared(root=root, store=opened, diff=diff, result=result, tasks=[], reused=[], spec=spec,
                         message="", t0=t0)
    if not diff.has_changes:
        result.message = "no changes: every document matches the store's latest version; nothing committed"
        return prepared
    assert model is not None
    by_key = dict(pairs)
    passages = []
    for src in diff.to_encode:
        ids = by_key[src.key]
        text = model.tokenizer.decode(ids.tolist())
        passages.append(Passage(text=text, source_path=src.key, byte_end=len(text.encode()), file_sha256=src.sha256,
                                token_ids=tuple(int(t) for t in ids)))
    counts = [len(p.token_ids or ()) for p in passages]
    fingerprint = {k: v for k, v in model.identity(keep_router_inputs=spec.keep_router_inputs).to_dict().items()
                   if k != "model_name"}
    settings = {"input": "token_ids", "shard_tokens": shard_tokens, "max_batch_tokens": spec.max_batch_tokens}
    plan_id = plan_id_of(fingerprint, diff.read_version, diff.to_encode, settings)
    result.plan_id, result.tokens_planned, result.docs_added = plan_id, int(sum(counts)), len(passages)
    prepared.message = message or (f"encode_token_ids: {len(diff.added)} added, {len(diff.replaced)} replaced "
                                   f"documents (plan {plan_id[:12]})")
    if dry_run:
        prepared.tasks = make_shard_tasks(passages, counts, np.arange(len(passages), dtype=np.int64),
                                          plan_id=plan_id, shard_tokens=shard_tokens)
        result.message = f"dry run: {len(prepared.tasks)} shard(s) to encode, nothing written"
        return prepared
    doc_ids = reserve_ids(opened, plan_id, len(passages))
    queue_tasks(prepared, make_shard_tasks(passages, counts, doc_ids, plan_id=plan_id, shard_tokens=shard_tokens),
                progress)
    return prepared


def encode_token_ids(
    docs: TokenDocs,
    store: str | os.PathLike[str] | MemoryStore,
    *,
    model: str = "default",
    adapter: str | None = None,
    tokenizer: str | os.PathLike[str] | None = None,
    device: str = "auto",
    dtype: str | None = None,
    client: Client | None = None,
    scheduler: str | None = None,
    workers: int | None = None,
    dry_run: bool = False,
    shard_tokens: int | None = None,
    max_batch_tokens: int = 8192,
    torch_threads: int | None = None,
    keep_router_inputs: bool = False,
    message: str | None = None,
    progress: ProgressFn | None = None,
) -> JobResult:
    """Encode documents given as token ids into ``store`` as one new version (incremental, resumable).

    Parameters
    ----------
    docs : mapping ``{key: ids}`` or iterable of ``(key, ids)``
        One MSA document per key; ``ids`` a non-empty list of ints, 1-D integer numpy array or
        tensor, made by the model's tokenizer without special tokens (``tokenizer(text,
        add_special_tokens=False)["input_ids"]``). Keys are stored as ``source_path``.
    store : store folder or ``s3://BUCKET/PREFIX`` URL (created with the model's identity if missing), an
        ``S3Backend``, or an open ``MemoryStore``; as in :func:`encode_corpus`.
    model, adapter, tokenizer, device, dtype : what ``encode.load_model`` loads (``tokenizer``: a
        folder, for a checkpoint saved without one); defaults as in :func:`encode_corpus`.
    client, scheduler, workers, shard_tokens, max_batch_tokens, torch_threads, keep_router_inputs,
    message, progress : as in :func:`encode_corpus` (``shard_tokens`` default
        :func:`default_shard_tokens`).
    dry_run : plan only; nothing is reserved, encoded or written.

    Returns
    -------
    JobResult
        ``files_added`` / ``files_replaced`` / ``files_unchanged`` count keys; ``docs_added`` documents.

    Raises
    ------
    ConfigError
        A bad key or id list, an id outside the model's vocabulary (before anything is written).
    ModelLoadError, IdentityMismatchError, JobError, VersionConflictError
        As :func:`encode_corpus`; a failed job publishes nothing.

    Examples
    --------
    >>> ids = tok("The blue door code is 4471.", add_special_tokens=False)["input_ids"]  # doctest: +SKIP
    >>> encode_token_ids({"door": ids}, "mem.msa", model="ckpt/").version               # doctest: +SKIP
    1
    """
    pairs = _as_docs(docs)
    if dtype is not None and dtype not in ("bfloat16", "float16", "float32"):
        raise ConfigError(f"dtype must be bfloat16, float16 or float32, got {dtype!r}.")
    if torch_threads is not None and int(torch_threads) < 1:
        raise ConfigError(f"torch_threads must be >= 1, got {torch_threads!r}.")
    shard_tokens = int(shard_tokens if shard_tokens is not None else default_shard_tokens(device))
    if shard_tokens < 1:
        raise ConfigError(f"shard_tokens must be positive, got {shard_tokens!r}.")
    if adapter is None and str(model) == "default":
        adapter = shipped_adapter_of(store)   # an existing store keeps the shipped router it was built with
    spec = ModelSpec(name=str(model), adapter=None if adapter is None else str(adapter), device=device, dtype=dtype,
                     torch_threads=None if torch_threads is None else int(torch_threads),
                     max_batch_tokens=int(max_batch_tokens), keep_router_inputs=bool(keep_router_inputs),
                     tokenizer=None if tokenizer is None else str(tokenizer))
    root = store_location(store)   # a folder, an s3:// URL or a remote backend (workers reopen it)
    prepared = _plan(pairs, root, spec, shard_tokens=shard_tokens, message=message, dry_run=dry_run,
                     progress=progress)
    if dry_run or not prepared.diff.has_changes:
        prepared.result.seconds = round(time.perf_counter() - prepared.t0, 3)
        return prepared.result
    return run_tasks(prepared, client=client, scheduler=scheduler, workers=workers, progress=progress)
