"""The console entry points: ``msa-encode`` and ``msa``. Importing the command modules registers
their commands on the groups of :mod:`msa_memory.cli.common`."""

from __future__ import annotations

import json
import sys

import typer

from msa_memory.cli.common import EXIT_USAGE, app
from msa_memory.cli.encode import encode_app  # registers msa encode

# the order of these imports is the order of `msa --help`
import msa_memory.cli.store  # noqa: E402,F401,I001  (registers msa store ...)
import msa_memory.cli.ask  # noqa: E402,F401  (registers msa ask, msa search)
import msa_memory.cli.router  # noqa: E402,F401  (registers msa train-router, msa store reindex-router)
import msa_memory.cli.reader  # noqa: E402,F401  (registers msa train-reader)

__all__ = ["app", "encode_app", "main", "encode_main", "run_app"]


def run_app(application: typer.Typer, prog_name: str, argv: list[str] | None = None) -> None:
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
    run_app(encode_app, "msa-encode")


def main() -> None:
    """Console entry of ``msa``."""
    run_app(app, "msa")
