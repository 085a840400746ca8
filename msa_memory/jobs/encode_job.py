"""``encode_corpus``: the msa-encode job (plan → encode-and-write-shard tasks on Dask → one commit).

Phases:
1. Plan, on the client: scan the folders (``encode.scan``; plain-text files are hashed and
   indexed in one streaming read, their text is not kept), diff them against the store's latest
   version by file sha256 (``plan.diff_sources``), split and count passages (``plan.plan_passages``:
   a plain-text file is read back a block at a time and only its passages' byte ranges and token
   counts are kept), reserve their document ids from the store (MSA wraps every passage with its
   id, so ids come before encoding), and cut shard tasks with ids derived from the plan.
2. Encode, on the workers: ``encode_and_write_shard`` reads its passages back (byte ranges of
   plain-text files, checked against the scan's block digests: a file changed since the plan fails
   the job, naming the file) and encodes them with a model loaded once per worker (``get_encoder``,
   cached by model, adapter, device and dtype) and writes one immutable shard. Workers never touch
   a manifest.
3. Commit, once: ``store.commit(add=shards, delete_ids=..., read_version=<version planned from>)``.
   An unchanged folder commits nothing.

Memory: per plain-text file its block index and ~56 bytes a passage (byte range, token count, id,
and the task's copy of range and id), ~1 KB a shard task, and one tokenizer batch, whatever the
file's size; HTML, PDF and JSON Lines files are parsed whole and their text and passages held (each
file at most ``max_file_bytes``).

Where the store is: a local folder, an ``s3://BUCKET/PREFIX`` URL or a backend object (an
``S3Backend`` with options). Every read and write on the store side goes through the store's
backend (``store.backend.Backend``): the journal, the shard checks, the commit; only the corpus is
read as local files. Workers get the location, never an open store: a path or URL string, or the
S3 backend, which pickles as its URL and options, so Dask workers on other hosts that share nothing
but the bucket open it themselves and write their shards straight to it (``write_shard``: in
place, ``_record.json`` last, on a medium without atomic rename); the client commits with the
store's conditional publish.

Resume: the reserved ids are written to a job journal (key ``_jobs/<plan id>.json`` of the store,
through its backend) before any shard is encoded. A job killed at any moment and started again computes the same plan id,
takes the same ids from the journal, finds the shards it already wrote with ``store.find_shard``
(checksum-verified) and encodes only the rest; the committed tensors are bit-identical to an
uninterrupted run's. The journal is removed after the commit.

The same job started twice at once: the journal is created by conditional publish (a hard link of
a complete temp file on a local disk, a PUT with ``If-None-Match: *`` on a bucket), so both runs take the same
ids and write the same shards (a worker reuses the shard the other run wrote under its id); the
commit's read_version check lets exactly one publish, and the other raises VersionConflictError.

Key invariant: nothing is published until every shard of the plan is in the store; any failure leaves
the store at the version the job read (plus orphan or reusable shards).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, overload

import numpy as np

from msa_memory.encode.scan import scan_corpus
from msa_memory.encode.sources import ReaderOptions
from msa_memory.errors import ConfigError
from msa_memory.jobs.cluster import job_client
from msa_memory.jobs.journal import is_local, reserve_ids, store_location
from msa_memory.jobs.runner import (JobResult, Prepared, ProgressFn, default_shard_tokens, finish_delayed, job_result,
                                    open_existing, open_or_create, queue_tasks, run_tasks, shipped_adapter_of)
from msa_memory.jobs.plan import FileDiff, diff_sources, plan_id_of, plan_passages, shard_tasks
from msa_memory.jobs.worker import (
    ModelSpec,
    ShardResult,
    encode_and_write_shard,
    get_encoder,
)

if TYPE_CHECKING:
    from dask.delayed import Delayed
    from distributed import Client

    from msa_memory.store import MemoryStore
    from msa_memory.store.backend import Backend

__all__ = ["ModelSpec", "JobResult", "ShardResult", "encode_corpus", "encode_and_write_shard", "get_encoder"]

# ----------------------------------------------------------------------------- the job


def _check_store_path(store: str | os.PathLike[str]) -> None:
    """ConfigError when the store path, or the nearest part of it that exists, is a regular file.
    A store URL (``s3://``, ``memory://``) names no local path: nothing to check."""
    if "://" in str(store):
        return
    p = Path(store)
    while not p.exists() and p != p.parent:
        p = p.parent
    if p.exists() and not p.is_dir():
        where = f"{str(store)!r} is a regular file" if p == Path(store) else \
            f"{str(p)!r} on the store path {str(store)!r} is a regular file"
        raise ConfigError(f"Store path {where}; a store is a folder.",
                          hint="Pass a store folder (e.g. --store mem.msa) or a path that does not exist yet: "
                               "msa-encode creates the store there.")


def _prepare(paths: Sequence[str | os.PathLike[str]] | str, store: str | os.PathLike[str] | MemoryStore, *,
             spec: ModelSpec, options: ReaderOptions, shard_tokens: int, max_passage_tokens: int,
             message: str | None, dry_run: bool, progress: ProgressFn | None) -> Prepared:
    t0 = time.perf_counter()
    if shard_tokens < 1 or max_passage_tokens < 1:
        raise ConfigError(f"shard_tokens and max_passage_tokens must be positive, got {shard_tokens!r}, {max_passage_tokens!r}.")
    root = store_location(store)
    scan = scan_corpus(paths if not isinstance(paths, (str, os.PathLike)) else [paths], options,
                       store=root if is_local(root) else None)
    # 1. diff against an existing store first: an unchanged folder needs no model at all
    opened = open_existing(root)
    if opened is not None and opened.identity.hidden_size > 0 and not spec.keep_router_inputs:
        spec = replace(spec, keep_router_inputs=True)  # the store keeps x_router: so do its appends
    diff = diff_sources(scan, opened) if opened is not None else None
    model = identity = None
    if diff is None or diff.has_changes or dry_run:
        model, _, _ = get_encoder(spec, device="cpu" if spec.device == "auto" else spec.device)
        identity = model.identity(keep_router_inputs=spec.keep_router_inputs)
        opened = open_or_create(root, identity, create=not dry_run)
    if opened is None:  # dry run against a store that does not exist yet: plan as if it were empty
        diff = FileDiff(read_version=-1, to_encode=list(scan.sources), added=[s.key for s in scan.sources],
                        skipped=list(scan.skipped), n_excluded=scan.n_excluded,
                        stores_excluded=list(scan.stores_excluded), links_not_followed=list(scan.links_not_followed))
    elif diff is None:  # the store was just created
        diff = diff_sources(scan, opened)
    result = job_result(root, opened, diff, dry_run)
    prepared = Prepared(root, opened, diff, result, [], [], spec, "", t0)
    if not diff.has_changes:
        result.message = "no changes: every file matches the store's latest version; nothing committed"
        return prepared
    assert model is not None and identity is not None
    planned = plan_passages(diff.to_encode, model.tokenizer, max_passage_tokens=max_passage_tokens)
    n_passages = sum(len(p) for p in planned)
    settings = {"shard_tokens": shard_tokens, "max_passage_tokens": max_passage_tokens,
                "max_batch_tokens": spec.max_batch_tokens}
    # what decides the tensors: the identity (less its free-form name) and the compute dtype
    fingerprint = {k: v for k, v in identity.to_dict().items() if k != "model_name"}
    plan_id = plan_id_of(fingerprint, diff.read_version, diff.to_encode, settings)
    result.plan_id, result.docs_added = plan_id, n_passages
    result.tokens_planned = int(sum(int(p.n_tokens.sum()) for p in planned))
    prepared.message = message or (f"msa-encode: {len(diff.added)} added, {len(diff.replaced)} replaced, "
                                   f"{len(diff.deleted)} deleted files (plan {plan_id[:12]})")
    if dry_run:
        placeholder = np.arange(n_passages, dtype=np.int64)
        prepared.tasks = shard_tasks(planned, placeholder, plan_id=plan_id, shard_tokens=shard_tokens)
        result.message = f"dry run: {len(prepared.tasks)} shard(s) to encode, nothing written"
        return prepared
    ids = reserve_ids(opened, plan_id, n_passages)
    queue_tasks(prepared, shard_tasks(planned, ids, plan_id=plan_id, shard_tokens=shard_tokens), progress)
    return prepared


@overload
def encode_corpus(paths: Any, store: Any, *, compute: Literal[True] = ..., **kw: Any) -> JobResult: ...
@overload
def encode_corpus(paths: Any, store: Any, *, compute: Literal[False], **kw: Any) -> Delayed | JobResult: ...


def encode_corpus(
    paths: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
    store: str | os.PathLike[str] | MemoryStore | Backend,
    *,
    model: str = "default",
    adapter: str | None = None,
    tokenizer: str | os.PathLike[str] | None = None,
    device: str = "auto",
    dtype: str | None = None,
    client: Client | None = None,
    scheduler: str | None = None,
    workers: int | None = None,
    compute: bool = True,
    dry_run: bool = False,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    respect_gitignore: bool = False,
    max_file_bytes: int = 32 * 1024 * 1024,
    jsonl_field: str = "text",
    follow_links: bool = False,
    shard_tokens: int | None = None,
    max_passage_tokens: int = 512,
    max_batch_tokens: int = 8192,
    torch_threads: int | None = None,
    keep_router_inputs: bool = False,
    message: str | None = None,
    progress: ProgressFn | None = None,
) -> JobResult | Delayed:
    """Encode the files under ``paths`` into ``store`` as one new version (incremental, resumable).

    Parameters
    ----------
    paths : folders and/or files. A folder's files are stored as ``<folder name>/<path inside>``.
    store : store folder or ``s3://BUCKET/PREFIX`` URL (created with the model's identity if missing;
        S3 credentials and endpoint from the ``AWS_*`` environment, of the client and of every worker),
        an ``S3Backend`` (URL and options; workers reopen it from both), or an open ``MemoryStore``.
    model, adapter, device, dtype : what ``encode.load_model`` loads; default ``"default"`` (Gemma 3
        270M from PyPI), no adapter, ``"auto"`` (a GPU per worker where there are GPUs), its dtype.
        ``model="default"`` with no adapter updates an existing store with the shipped adapter that
        built it (``msa_memory.routing.registry.adapter_for_store``; e.g. one made before the default
        adapter changed, or with a shipped name such as ``adapter="aligned"``), else uses the default adapter.
    tokenizer : a tokenizer folder for a checkpoint saved without tokenizer files (``load_model(tokenizer=)``);
        default None: the model's own.
    client, scheduler, workers : a ``distributed.Client``; or a scheduler address
        ``"tcp://HOST:PORT"``; or neither, and a local cluster of ``workers`` workers (default: one
        per GPU, else 1) is started and stopped.
    compute : default True runs the job and returns a :class:`JobResult`. False returns a
        ``dask.delayed.Delayed`` (shard tasks → one commit task) without encoding anything; its
        ``.compute()`` encodes and commits, returning the JobResult. When nothing changed, the
        JobResult is returned directly.
    dry_run : plan only: nothing is reserved, encoded or written (a missing store is not created).
    include, exclude, respect_gitignore, max_file_bytes, jsonl_field : what is read (see
        ``encode.sources.ReaderOptions``; defaults: all files, none excluded, off, 32 MiB, ``"text"``).
    follow_links : also follow symlinks whose target lies outside the folders given; default False
        (they are counted in ``JobResult.links_not_followed``). Msa stores in the folders (this one
        included) are never read (``JobResult.stores_excluded``).
    shard_tokens : tokens per shard task; default None = :func:`default_shard_tokens` (8192 on a
        CPU machine: ~3-15 s of work per task there; 262144 where there are GPUs: ~1 s per task).
        Smaller means finer resume and progress, and more shards.
    max_passage_tokens : longest passage (document) in tokens; default 512 (a routing unit, and
        what text-mode answers inject per retrieved document).
    max_batch_tokens : tokens per encoder forward; default 8192.
    torch_threads : torch threads per worker while encoding; default None: all cores for one local
        worker, ``cores // workers`` for several, torch's default on a given cluster.
    keep_router_inputs : default False. True also stores each chunk's pooled router-layer inputs
        (``x_router``; ~2.5x the router-key bytes for Gemma 3 270M) so that ``msa store
        reindex-router`` can re-key the store with a new router adapter without re-encoding. A
        store created with them keeps them on every later run.
    message : version message; default summarises the change.
    progress : called with event dicts (``planned``, ``shard``, ``committed``); default none.

    Raises
    ------
    ConfigError, IdentityMismatchError, JobError (a shard task failed: nothing was committed;
    rerun to resume), VersionConflictError (another writer committed first: rerun).

    Examples
    --------
    >>> res = encode_corpus(["docs/"], "mem.msa")          # doctest: +SKIP
    >>> res.version, res.docs_added                        # doctest: +SKIP
    """
    if dtype is not None and dtype not in ("bfloat16", "float16", "float32"):
        raise ConfigError(f"dtype must be bfloat16, float16 or float32, got {dtype!r}.")
    if isinstance(store, (str, os.PathLike)):
        _check_store_path(store)   # before any model is loaded (a local folder only)
    if shard_tokens is None:
        shard_tokens = default_shard_tokens(device)
    if torch_threads is not None and int(torch_threads) < 1:
        raise ConfigError(f"torch_threads must be >= 1, got {torch_threads!r}.")
    if adapter is None and str(model) == "default":
        adapter = shipped_adapter_of(store)   # an existing store keeps the shipped router it was built with
    spec = ModelSpec(name=str(model), adapter=None if adapter is None else str(adapter), device=device, dtype=dtype,
                     torch_threads=None if torch_threads is None else int(torch_threads),
                     max_batch_tokens=int(max_batch_tokens), keep_router_inputs=bool(keep_router_inputs),
                     tokenizer=None if tokenizer is None else str(tokenizer))
    options = ReaderOptions(include=tuple(include), exclude=tuple(exclude), respect_gitignore=respect_gitignore,
                            max_file_bytes=int(max_file_bytes), jsonl_text_field=jsonl_field,
                            follow_links=bool(follow_links), hold_text=False)
    if scheduler is not None and compute and not dry_run:
        # connect first: an unreachable scheduler fails before the model is loaded or ids reserved
        with job_client(scheduler=scheduler) as (remote, _):
            prepared = _prepare(paths, store, spec=spec, options=options, shard_tokens=int(shard_tokens),
                                max_passage_tokens=int(max_passage_tokens), message=message, dry_run=False,
                                progress=progress)
            if not prepared.diff.has_changes:
                prepared.result.seconds = round(time.perf_counter() - prepared.t0, 3)
                return prepared.result
            return run_tasks(prepared, client=remote, scheduler=None, workers=None, progress=progress)
    prepared = _prepare(paths, store, spec=spec, options=options, shard_tokens=int(shard_tokens),
                        max_passage_tokens=int(max_passage_tokens), message=message, dry_run=dry_run,
                        progress=progress)
    if dry_run or not prepared.diff.has_changes:
        prepared.result.seconds = round(time.perf_counter() - prepared.t0, 3)
        return prepared.result
    if not compute:
        import dask

        shard_nodes = [dask.delayed(encode_and_write_shard, pure=True, name=f"encode-{t.shard_id}")(
            t, prepared.spec, prepared.root) for t in prepared.tasks]
        return dask.delayed(finish_delayed, pure=False, name=f"commit-{prepared.result.plan_id[:16]}")(
            replace(prepared, store=None), shard_nodes)
    return run_tasks(prepared, client=client, scheduler=scheduler, workers=workers, progress=progress)


