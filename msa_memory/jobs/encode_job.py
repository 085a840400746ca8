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

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, overload

import numpy as np

from msa_memory.encode.scan import scan_corpus
from msa_memory.encode.sources import ReaderOptions
from msa_memory.errors import (
    ConfigError,
    IdentityMismatchError,
    JobError,
    MsaError,
    ShardMissingError,
    VersionConflictError,
)
from msa_memory.jobs.cluster import job_client
from msa_memory.jobs.plan import (
    FileDiff,
    ShardTask,
    diff_sources,
    plan_id_of,
    plan_passages,
    shard_tasks,
)
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

ProgressFn = Callable[[dict[str, Any]], None]
JOURNAL_DIR = "_jobs"


def default_shard_tokens(device: str = "auto") -> int:
    """Tokens per shard task so that a task is at least about a second of work on the device."""
    from msa_memory.jobs.cluster import gpu_count

    on_gpu = device.startswith("cuda") or (device == "auto" and gpu_count() > 0)
    return 262144 if on_gpu else 8192


# ----------------------------------------------------------------------------- result


@dataclass
class JobResult:
    """Summary of one job (``to_dict()`` is the CLI's ``--json`` object)."""

    store: str
    read_version: int | None
    version: int | None
    committed: bool
    dry_run: bool = False
    plan_id: str = ""
    files_added: list[str] = field(default_factory=list)
    files_replaced: list[str] = field(default_factory=list)
    files_deleted: list[str] = field(default_factory=list)
    files_unchanged: int = 0
    files_excluded: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)
    stores_excluded: list[str] = field(default_factory=list)
    links_not_followed: list[str] = field(default_factory=list)
    docs_added: int = 0
    docs_deleted: int = 0
    shards_written: int = 0
    shards_reused: int = 0
    tokens_planned: int = 0
    tokens_encoded: int = 0
    tokens_reused: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- journal


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


def _reserve_ids(store: MemoryStore, plan_id: str, n: int) -> np.ndarray:
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


def _remove_journals(be: Backend) -> None:
    """Remove every job journal (best effort: a stale journal names a plan no later job computes)."""
    try:
        for name in be.list(JOURNAL_DIR):
            if name.endswith(".json"):
                be.delete(f"{JOURNAL_DIR}/{name}")
    except OSError:
        pass


# ----------------------------------------------------------------------------- the job


@dataclass
class _Prepared:
    root: Any
    """The store's location (``store_location``): a path or URL string, or a remote backend."""
    store: Any
    diff: FileDiff
    result: JobResult
    tasks: list[ShardTask]
    reused: list[ShardResult]
    spec: ModelSpec
    message: str
    t0: float


def _open_existing(root: str | Backend) -> Any:
    """The latest version of the store at ``root``, or None when there is no store there."""
    from msa_memory.errors import StoreNotFoundError
    from msa_memory.store import open_store

    try:
        return open_store(root)
    except StoreNotFoundError:
        return None


def _shipped_adapter_of(store: Any) -> str | None:
    """The shipped adapter that routes the existing ``store`` (``msa_memory.routing.registry``), or None (new
    store, other router)."""
    from msa_memory.routing.registry import adapter_for_store
    from msa_memory.store import MemoryStore

    existing = store if isinstance(store, MemoryStore) else _open_existing(store_location(store))
    return None if existing is None else adapter_for_store(existing.identity.router_id, "default")


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


def _created_beside(root: str | Backend, timeout: float = 30.0) -> Any:
    """The store another process is creating at ``root`` right now, once complete; None when ``root``
    holds anything but a store's own entries (a folder that is not a store) or none appears in time."""
    from msa_memory.errors import StoreNotFoundError
    from msa_memory.store import _layout as L, open_store

    own = {*L.STORE_DIRS, L.IDENTITY_FILE, L.IDS_FILE, L.IDS_DIR, L.LOCK_FILE, JOURNAL_DIR}
    deadline = time.monotonic() + timeout
    while True:
        try:
            return open_store(root)
        except StoreNotFoundError:
            pass
        try:
            names = set(L.open_backend(root).list(""))
        except OSError:
            return None
        if not names <= own or time.monotonic() > deadline:
            return None
        time.sleep(0.05)


def _open_or_create(root: str | Backend, identity: Any, *, create: bool) -> Any:
    from msa_memory.errors import StoreExistsError, StoreNotFoundError
    from msa_memory.store import create_store, open_store

    try:
        store = open_store(root)
    except StoreNotFoundError:
        if not create:  # dry run: plan against an empty store, create nothing
            return None
        # a new or empty directory; anything else there raises StoreExistsError (nothing is touched)
        try:
            return create_store(root, identity, message=f"create for {identity.model_name}")
        except StoreExistsError:
            store = _created_beside(root)   # the same msa-encode started twice: both create the store
            if store is None:
                raise
    bad = store.identity.compatible_with(identity)
    if bad:
        raise IdentityMismatchError(
            f"Store {root} was built by model {store.identity.model_name!r}; the model given "
            f"({identity.model_name!r}) differs in {', '.join(bad)}.",
            hint="Encode with the model (and router adapter) the store was built with, or use a new --store.",
        )
    return store


def _prepare(paths: Sequence[str | os.PathLike[str]] | str, store: str | os.PathLike[str] | MemoryStore, *,
             spec: ModelSpec, options: ReaderOptions, shard_tokens: int, max_passage_tokens: int,
             message: str | None, dry_run: bool, progress: ProgressFn | None) -> _Prepared:
    t0 = time.perf_counter()
    if shard_tokens < 1 or max_passage_tokens < 1:
        raise ConfigError(f"shard_tokens and max_passage_tokens must be positive, got {shard_tokens!r}, {max_passage_tokens!r}.")
    root = store_location(store)
    scan = scan_corpus(paths if not isinstance(paths, (str, os.PathLike)) else [paths], options,
                       store=root if is_local(root) else None)
    # 1. diff against an existing store first: an unchanged folder needs no model at all
    opened = _open_existing(root)
    if opened is not None and opened.identity.hidden_size > 0 and not spec.keep_router_inputs:
        spec = replace(spec, keep_router_inputs=True)  # the store keeps x_router: so do its appends
    diff = diff_sources(scan, opened) if opened is not None else None
    model = identity = None
    if diff is None or diff.has_changes or dry_run:
        model, _, _ = get_encoder(spec, device="cpu" if spec.device == "auto" else spec.device)
        identity = model.identity(keep_router_inputs=spec.keep_router_inputs)
        opened = _open_or_create(root, identity, create=not dry_run)
    if opened is None:  # dry run against a store that does not exist yet: plan as if it were empty
        diff = FileDiff(read_version=-1, to_encode=list(scan.sources), added=[s.key for s in scan.sources],
                        skipped=list(scan.skipped), n_excluded=scan.n_excluded,
                        stores_excluded=list(scan.stores_excluded), links_not_followed=list(scan.links_not_followed))
    elif diff is None:  # the store was just created
        diff = diff_sources(scan, opened)
    result = JobResult(store=str(root), read_version=None if opened is None else int(opened.version),
                       version=None if opened is None else int(opened.version), committed=False, dry_run=dry_run,
                       files_added=diff.added, files_replaced=diff.replaced, files_deleted=diff.deleted,
                       files_unchanged=len(diff.unchanged), files_excluded=diff.n_excluded,
                       skipped=[{"path": s.path, "reason": s.reason} for s in diff.skipped],
                       stores_excluded=diff.stores_excluded, links_not_followed=diff.links_not_followed,
                       docs_deleted=len(diff.delete_ids))
    prepared = _Prepared(root, opened, diff, result, [], [], spec, "", t0)
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
    ids = _reserve_ids(opened, plan_id, n_passages)
    tasks = shard_tasks(planned, ids, plan_id=plan_id, shard_tokens=shard_tokens)
    for t in tasks:
        rec = opened.find_shard(t.shard_id)
        if rec is not None:
            prepared.reused.append(ShardResult(t.shard_id, rec, t.n_docs, int(np.sum(rec.n_tokens)),
                                               int(rec.n_bytes), 0.0, reused=True))
        else:
            prepared.tasks.append(t)
    reused = {r.shard_id for r in prepared.reused}
    if progress:
        progress({"event": "planned", "files": len(diff.to_encode), "shards": len(tasks),
                  "shards_reused": len(prepared.reused), "tokens_total": result.tokens_planned,
                  "tokens_reused": sum(t.n_tokens for t in tasks if t.shard_id in reused)})
    return prepared


def _commit(prepared: _Prepared, results: Sequence[ShardResult]) -> JobResult:
    """The one commit of the job (on the client for ``compute=True``)."""
    res = prepared.result
    all_results = sorted([*prepared.reused, *results], key=lambda r: r.shard_id)
    res.shards_written = sum(not r.reused for r in all_results)
    res.shards_reused = sum(r.reused for r in all_results)
    res.tokens_encoded = sum(r.n_tokens for r in all_results if not r.reused)
    res.tokens_reused = sum(r.n_tokens for r in all_results if r.reused)
    res.bytes_written = sum(r.n_bytes for r in all_results)
    store = prepared.store
    if store is None:  # the commit task of a compute=False graph: reopen by location (stores don't pickle)
        from msa_memory.store import open_store

        store = open_store(prepared.root)
    if any(r.taken for r in all_results):
        raise _conflict(prepared, next(r.shard_id for r in all_results if r.taken))
    try:
        new = store.commit(add=[r.record for r in all_results], delete_ids=list(prepared.diff.delete_ids),
                           message=prepared.message, read_version=prepared.diff.read_version)
    except VersionConflictError as e:
        raise _conflict(prepared) from e
    except ShardMissingError:
        from msa_memory.store._layout import RECORD_FILE, SHARDS_DIR

        be = store.backend

        def incomplete(r: ShardResult) -> bool:   # its record or one of the files it lists is gone
            d = f"{SHARDS_DIR}/{r.shard_id}"
            return not be.probe(f"{d}/{RECORD_FILE}") or any(not be.probe(f"{d}/{f}") for f in r.record.files)

        gone = [r.shard_id for r in all_results if incomplete(r)]
        if not gone:
            raise
        raise _removed_under_job(prepared, gone) from None
    res.version, res.committed = int(new.version), True
    res.message = f"committed version {res.version}"
    # every journal is stale now: a plan is tied to the version it read, and that is no longer the latest
    _remove_journals(store.backend)
    res.seconds = round(time.perf_counter() - prepared.t0, 3)
    return res


def _conflict(prepared: _Prepared, taken: str | None = None) -> VersionConflictError:
    """The job's one error when another writer got there first (e.g. the same msa-encode started twice)."""
    from msa_memory.store import open_store

    rv = prepared.diff.read_version
    try:
        latest: int | None = int(open_store(prepared.root).latest_version())
    except MsaError:
        latest = None
    if latest is not None and latest != rv:
        return VersionConflictError(
            f"Store {str(prepared.root)!r} is at version {latest}, but this job was planned against version {rv}: another "
            "writer (e.g. the same msa-encode started twice) committed first; this job published nothing.",
            hint="Rerun the command: it plans against the latest version and encodes only what is still missing.")
    return VersionConflictError(
        f"Shard {taken!r} of this job was written by another job on store {str(prepared.root)!r} that has not committed "
        f"yet (the store is still at version {rv}); this job published nothing.",
        hint="Wait for the other msa-encode to finish, then rerun the command.")


def _removed_under_job(prepared: _Prepared, gone: Sequence[str]) -> JobError:
    more = f" and {len(gone) - 3} more" if len(gone) > 3 else ""
    return JobError(
        f"Shard(s) {', '.join(repr(g) for g in gone[:3])}{more} that this job wrote to {str(prepared.root)!r} and had not "
        "committed yet were removed, whole or in part, while it ran (most likely by `msa store gc` with a --grace-s "
        "shorter than the job); nothing "
        f"committed is lost: the store is still at version {prepared.diff.read_version} and this job published nothing.",
        hint="Rerun the same command to encode them again, and give gc a --grace-s longer than your encode jobs run "
             "(default 3600 s).")


def _finish_delayed(prepared: _Prepared, results: list[ShardResult]) -> JobResult:
    return _commit(prepared, results)


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
        adapter = _shipped_adapter_of(store)   # an existing store keeps the shipped router it was built with
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
            return _run(prepared, client=remote, scheduler=None, workers=None, progress=progress)
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
        return dask.delayed(_finish_delayed, pure=False, name=f"commit-{prepared.result.plan_id[:16]}")(
            replace(prepared, store=None), shard_nodes)
    return _run(prepared, client=client, scheduler=scheduler, workers=workers, progress=progress)


def _run(prepared: _Prepared, *, client: Client | None, scheduler: str | None, workers: int | None,
         progress: ProgressFn | None) -> JobResult:
    from distributed import as_completed

    results: list[ShardResult] = []
    planned = {t.shard_id: t.n_tokens for t in prepared.tasks}
    if prepared.tasks:
        with job_client(client=client, scheduler=scheduler, workers=workers) as (c, threads):
            spec = prepared.spec
            if threads and not spec.torch_threads:
                spec = replace(spec, torch_threads=threads)
            # a given cluster's workers may sit on other hosts, sharing nothing with this one but the store:
            # send them the text (read here, a window of tasks ahead) instead of references into local files
            remote = client is not None or scheduler is not None
            pending = iter(prepared.tasks)

            def submit(t: ShardTask) -> Any:
                return c.submit(encode_and_write_shard, t.with_text() if remote else t, spec, prepared.root,
                                key=f"encode-{t.shard_id}", pure=False, retries=0)

            window = 2 * max(1, len(c.scheduler_info().get("workers", {}))) if remote else len(prepared.tasks)
            futures = [submit(t) for _, t in zip(range(window), pending)]
            done = as_completed(futures)
            try:
                for fut in done:
                    if (nxt := next(pending, None)) is not None:
                        futures.append(new := submit(nxt))
                        done.add(new)
                    if fut.status == "error":
                        exc = fut.exception()
                        err = _task_error(prepared, fut.key, exc)
                        if err is exc:
                            raise err
                        raise err from exc
                    r = fut.result()
                    if r.taken:  # another job on the store got this shard first: no commit can follow
                        raise _conflict(prepared, r.shard_id)
                    results.append(r)
                    if progress:
                        # "tokens": as planned (the bar's unit); "tokens_encoded": wrapped, as encoded
                        progress({"event": "shard", "shard_id": r.shard_id, "tokens": planned[r.shard_id],
                                  "tokens_encoded": r.n_tokens, "docs": r.n_docs, "bytes": r.n_bytes,
                                  "seconds": r.seconds})
            finally:
                for fut in futures:
                    fut.cancel()
    res = _commit(prepared, results)
    if progress:
        progress({"event": "committed", "version": res.version})
    return res


def _task_error(prepared: _Prepared, key: Any, exc: BaseException | None) -> MsaError:
    detail = f"{type(exc).__name__}: {exc}" if exc is not None else "unknown error"
    if isinstance(exc, MsaError):  # already says what is wrong; keep its type (and exit code)
        return exc
    return JobError(f"Shard task {key!r} failed ({detail}); nothing was committed (store still at version "
                    f"{prepared.diff.read_version}).",
                    hint="Fix the cause and rerun the same command: finished shards are reused.")
