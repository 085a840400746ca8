"""Small pieces of msa_memory/cli/common.py and cli/encode.py: error lines and exit codes, progress-bar switches, JSON output.

Run: .venv/bin/python -m pytest tests/cli/test_cli_helpers.py -q
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import typer

from msa_memory.cli import common as cli
from msa_memory.cli.encode import ProgressBar
from msa_memory import errors as E


@pytest.mark.parametrize(("exc", "code"), [
    (E.StoreNotFoundError("no store"), 3), (E.VersionNotFoundError("v9"), 3), (E.DocumentNotFoundError("d"), 3),
    (E.ShardCorruptError("bad"), 4), (E.ManifestCorruptError("bad"), 4), (E.VersionConflictError("late"), 5),
    (E.LockTimeoutError("busy"), 5), (E.IdentityMismatchError("other model"), 6), (E.ConfigError("bad value"), 2),
    (E.JobError("task failed"), 1), (E.ModelLoadError("no model"), 1), (OSError("disk full"), 1),
    (KeyboardInterrupt(), 130),
])
def test_fail_maps_errors_to_exit_codes_and_one_line(exc: BaseException, code: int, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MSA_DEBUG", raising=False)
    with pytest.raises(typer.Exit) as info:
        cli.fail(exc, json_out=True)
    assert info.value.exit_code == code
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and err.startswith("error: ") and "MSA_DEBUG=1" in err
    last = json.loads(out.strip().splitlines()[-1])
    assert last["exit_code"] == code and last["type"] == type(exc).__name__


def test_fail_uses_the_error_hint_or_a_default_one(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(typer.Exit):
        cli.fail(E.ConfigError("Bad --workers 0.", hint="Use --workers 1 or more."), json_out=False)
    assert "Bad --workers 0. Use --workers 1 or more." in capsys.readouterr().err
    with pytest.raises(typer.Exit):
        cli.fail(E.VersionConflictError("Version 3 was published first."), json_out=False)
    assert "rerun the command" in capsys.readouterr().err


def test_fail_prints_traceback_with_msa_debug(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MSA_DEBUG", "1")
    try:
        raise E.JobError("boom")
    except E.JobError as exc:
        with pytest.raises(typer.Exit):
            cli.fail(exc, json_out=False)
    err = capsys.readouterr().err
    assert "Traceback" in err and "error: boom" in err and "MSA_DEBUG=1 for" not in err


def test_progress_switches(monkeypatch: pytest.MonkeyPatch) -> None:
    class Tty:
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(cli.sys, "stderr", Tty())
    monkeypatch.delenv("MSA_DISABLE_PROGRESS_BARS", raising=False)
    assert cli.progress_enabled(json_out=False)
    assert not cli.progress_enabled(json_out=True)
    monkeypatch.setenv("MSA_DISABLE_PROGRESS_BARS", "1")
    assert not cli.progress_enabled(json_out=False)
    monkeypatch.setenv("MSA_DISABLE_PROGRESS_BARS", "0")
    assert cli.progress_enabled(json_out=False)
    monkeypatch.undo()
    monkeypatch.setattr(cli.sys, "stderr", open("/dev/null", "w"))  # noqa: SIM115 - not a terminal
    assert not cli.progress_enabled(json_out=False)


def test_progress_bar_counts_tokens(capsys: pytest.CaptureFixture[str]) -> None:
    bar = ProgressBar(enabled=True)
    bar({"event": "planned", "files": 3, "shards": 2, "shards_reused": 1, "tokens_total": 300, "tokens_reused": 100})
    bar({"event": "shard", "tokens": 150})
    assert bar.bar is not None and bar.bar.n == 250 and bar.bar.total == 300
    bar.close()
    assert "encoding 3 files, 2 shards" in capsys.readouterr().err
    off = ProgressBar(enabled=False)
    off({"event": "planned", "files": 1, "shards": 1, "shards_reused": 0, "tokens_total": 1, "tokens_reused": 0})
    assert off.bar is None


def test_jsonable_handles_numpy_paths_and_dataclasses() -> None:
    from pathlib import Path

    from msa_memory.schemas.records import Passage

    obj = {"a": np.int64(3), "b": np.arange(3), "c": Path("/x"), "d": Passage(text="t", source_path="s"), 4: (1.5,)}
    assert json.loads(json.dumps(cli.jsonable(obj))) == {
        "a": 3, "b": [0, 1, 2], "c": "/x", "4": [1.5],
        "d": {"text": "t", "source_path": "s", "passage_index": 0, "byte_start": 0, "byte_end": 0, "file_sha256": "",
              "token_ids": None}}
