"""What every command shares: the Typer groups, shared options, error handling (one line with a
fix-it hint and an exit code), JSON output and the store path checks.

The commands handle arguments and print only; the work is done by ``msa_memory.jobs``,
``msa_memory.store``, ``msa_memory.runtime`` and ``msa_memory.train``. Conventions every command follows:

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

__all__ = [
    "EXIT_CODES", "EXIT_OK", "EXIT_FAIL", "EXIT_USAGE", "EXIT_NOT_FOUND", "EXIT_INTEGRITY", "EXIT_CONFLICT",
    "EXIT_IDENTITY", "EXIT_INTERRUPTED", "EXIT_PIPE_CLOSED", "app", "store_app", "make_typer",
    "StoreArg", "VersionOpt", "JsonOpt", "YesOpt", "DryRunOpt", "progress_enabled", "exit_code", "fail", "guard",
    "jsonable", "emit_json", "human_bytes", "open_version", "check_store_path",
]

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


def make_typer(**kw: Any) -> typer.Typer:
    """A Typer app with the settings every command group shares (``-h``, no completion, plain help)."""
    return typer.Typer(**{**_APP_SETTINGS, **kw})


# ----------------------------------------------------------------------------- shared options

StoreArg = Annotated[str, typer.Argument(help="Store path, e.g. mem.msa", show_default=False)]
VersionOpt = Annotated[str | None, typer.Option("--version", "-v", help="Version number or tag (default: latest), e.g. 3 or release-1")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object as the last stdout line; no progress bars")]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Do it without asking for confirmation")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Show what would happen; change nothing")]


def progress_enabled(json_out: bool) -> bool:
    if json_out or os.environ.get("MSA_DISABLE_PROGRESS_BARS", "0") not in ("", "0", "false", "False"):
        return False
    return sys.stderr.isatty()


def exit_code(exc: BaseException) -> int:
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


def fail(exc: BaseException, json_out: bool) -> NoReturn:
    if isinstance(exc, BrokenPipeError) and _stdout_closed():
        _exit_pipe_closed()
    code = exit_code(exc)
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


def guard(json_out: bool, fn: Callable[[], Any]) -> Any:
    """Run a command body; map errors to one line + an exit code."""
    try:
        return fn()
    except typer.Exit:
        raise
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - every error becomes one line
        fail(exc, json_out)


def jsonable(obj: Any) -> Any:
    import numpy as np

    if hasattr(obj, "to_dict") and callable(obj.to_dict):
        return jsonable(obj.to_dict())
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "__dataclass_fields__"):
        import dataclasses

        return jsonable(dataclasses.asdict(obj))
    return obj


def emit_json(obj: Any) -> None:
    typer.echo(json.dumps(jsonable(obj), default=str))


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n} B"  # pragma: no cover


def open_version(store: str, version: str | None = None) -> Any:
    """Open STORE at VERSION (a number or a tag; default: the latest) after the path checks."""
    from msa_memory.store import open_store

    check_store_path(store)
    v: int | str | None = int(version) if version is not None and version.isdigit() else version
    return open_store(store, version=v)


def check_store_path(store: str, *, creates: bool = False) -> None:
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


# ----------------------------------------------------------------------------- the command groups

app = make_typer(name="msa", help="MSA memory stores: inspect and maintain them (msa store ...), ask them questions.")
store_app = make_typer(name="store", help="Inspect and maintain a store: info, versions, docs, verify, compact, gc, tag, restore, repair.")
app.add_typer(store_app, name="store")
