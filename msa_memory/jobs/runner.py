"""What both encode jobs (folders: ``encode_job``; token ids: ``token_ids``) share once they have a plan:
the store opened or created (:func:`open_or_create`), the shard tasks run on Dask with progress
(:func:`run_tasks`), and the one commit (:func:`commit_job`), with the job's errors. The job's phases,
resume and conflicts are described in :mod:`msa_memory.jobs.encode_job`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from msa_memory.errors import IdentityMismatchError, JobError, MsaError, ShardMissingError, VersionConflictError
from msa_memory.jobs.cluster import job_client
from msa_memory.jobs.journal import JOURNAL_DIR, remove_journals, store_location
from msa_memory.jobs.plan import FileDiff, ShardTask
from msa_memory.jobs.worker import ModelSpec, ShardResult, encode_and_write_shard

if TYPE_CHECKING:
    from distributed import Client

    from msa_memory.store import MemoryStore
    from msa_memory.store.backend import Backend

__all__ = ["ProgressFn", "JobResult", "Prepared", "default_shard_tokens", "open_existing", "shipped_adapter_of",
           "open_or_create", "job_result", "queue_tasks", "run_tasks", "commit_job", "finish_delayed"]


ProgressFn = Callable[[dict[str, Any]], None]


def default_shard_tokens(device: str = "auto") -> int:
    """Tokens per shard task so that a task is at least about a second of work on the device."""
    from msa_memory.jobs.cluster import gpu_count

    on_gpu = device.startswith("cuda") or (device == "auto" and gpu_count() > 0)
    return 262144 if on_gpu else 8192


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


@dataclass
class Prepared:
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


def job_result(root: Any, opened: Any, diff: FileDiff, dry_run: bool) -> JobResult:
    """The job's result as planned: the store's version (``opened``: None for a store not made yet) and the
    diff's sources; nothing committed yet."""
    version = None if opened is None else int(opened.version)
    return JobResult(store=str(root), read_version=version, version=version, committed=False, dry_run=dry_run,
                     files_added=diff.added, files_replaced=diff.replaced, files_deleted=diff.deleted,
                     files_unchanged=len(diff.unchanged), files_excluded=diff.n_excluded,
                     skipped=[{"path": s.path, "reason": s.reason} for s in diff.skipped],
                     stores_excluded=diff.stores_excluded, links_not_followed=diff.links_not_followed,
                     docs_deleted=len(diff.delete_ids))


def queue_tasks(prepared: Prepared, tasks: Sequence[ShardTask], progress: ProgressFn | None) -> None:
    """Put the plan's shard tasks into ``prepared``: a shard the store has already (written by an earlier,
    interrupted run of the same plan) is reused, the others are to run; then report the plan to ``progress``."""
    for t in tasks:
        rec = prepared.store.find_shard(t.shard_id)
        if rec is not None:
            prepared.reused.append(ShardResult(t.shard_id, rec, t.n_docs, int(np.sum(rec.n_tokens)),
                                               int(rec.n_bytes), 0.0, reused=True))
        else:
            prepared.tasks.append(t)
    if progress:
        reused = {r.shard_id for r in prepared.reused}
        progress({"event": "planned", "files": len(prepared.diff.to_encode), "shards": len(tasks),
                  "shards_reused": len(prepared.reused), "tokens_total": prepared.result.tokens_planned,
                  "tokens_reused": sum(t.n_tokens for t in tasks if t.shard_id in reused)})


def open_existing(root: str | Backend) -> Any:
    """The latest version of the store at ``root``, or None when there is no store there."""
    from msa_memory.errors import StoreNotFoundError
    from msa_memory.store import open_store

    try:
        return open_store(root)
    except StoreNotFoundError:
        return None


def shipped_adapter_of(store: Any) -> str | None:
    """The shipped adapter that routes the existing ``store`` (``msa_memory.routing.registry``), or None (new
    store, other router)."""
    from msa_memory.routing.registry import adapter_for_store
    from msa_memory.store import MemoryStore

    existing = store if isinstance(store, MemoryStore) else open_existing(store_location(store))
    return None if existing is None else adapter_for_store(existing.identity.router_id, "default")


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


def open_or_create(root: str | Backend, identity: Any, *, create: bool) -> Any:
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


def commit_job(prepared: Prepared, results: Sequence[ShardResult]) -> JobResult:
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
    remove_journals(store.backend)
    res.seconds = round(time.perf_counter() - prepared.t0, 3)
    return res


def _conflict(prepared: Prepared, taken: str | None = None) -> VersionConflictError:
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


def _removed_under_job(prepared: Prepared, gone: Sequence[str]) -> JobError:
    more = f" and {len(gone) - 3} more" if len(gone) > 3 else ""
    return JobError(
        f"Shard(s) {', '.join(repr(g) for g in gone[:3])}{more} that this job wrote to {str(prepared.root)!r} and had not "
        "committed yet were removed, whole or in part, while it ran (most likely by `msa store gc` with a --grace-s "
        "shorter than the job); nothing "
        f"committed is lost: the store is still at version {prepared.diff.read_version} and this job published nothing.",
        hint="Rerun the same command to encode them again, and give gc a --grace-s longer than your encode jobs run "
             "(default 3600 s).")


def finish_delayed(prepared: Prepared, results: list[ShardResult]) -> JobResult:
    return commit_job(prepared, results)


def run_tasks(prepared: Prepared, *, client: Client | None, scheduler: str | None, workers: int | None,
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
    res = commit_job(prepared, results)
    if progress:
        progress({"event": "committed", "version": res.version})
    return res


def _task_error(prepared: Prepared, key: Any, exc: BaseException | None) -> MsaError:
    detail = f"{type(exc).__name__}: {exc}" if exc is not None else "unknown error"
    if isinstance(exc, MsaError):  # already says what is wrong; keep its type (and exit code)
        return exc
    return JobError(f"Shard task {key!r} failed ({detail}); nothing was committed (store still at version "
                    f"{prepared.diff.read_version}).",
                    hint="Fix the cause and rerun the same command: finished shards are reused.")
