"""Unclear errors made clear: one line, the offending value, what to do, the right exit code.

- a store path that is a regular file (or lies under one): refused before any model is loaded, by
  msa-encode (exit 2: it cannot create a store there) and by every command reading a store (exit 3);
- output piped into `head`: the command exits quietly with 141 (as if killed by SIGPIPE).
Run: .venv/bin/python -m pytest tests/cli/test_cli_errors.py -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from jobkit import make_corpus
from typer.testing import CliRunner

from msa_memory.cli import app, encode_app

runner = CliRunner()
BIN = Path(sys.executable).parent


def _one_line_error(r, code: int, *needles: str) -> str:
    assert r.exit_code == code, r.output
    lines = [line for line in r.output.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in r.output, r.output
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture
def a_file(tmp_path: Path) -> Path:
    f = tmp_path / "mem.msa"
    f.write_text("not a store\n")
    return f


@pytest.mark.parametrize("under", [False, True])
def test_encode_refuses_a_store_path_that_is_a_file_before_loading_the_model(tmp_path: Path, corpus: Path,
                                                                              a_file: Path, under: bool) -> None:
    store = a_file / "sub.msa" if under else a_file
    missing_model = tmp_path / "no-such-model"   # loading it would fail with ModelLoadError (exit 1)
    r = runner.invoke(encode_app, [str(corpus), "--store", str(store), "--model", str(missing_model)])
    _one_line_error(r, 2, str(a_file), "regular file", "folder")
    r = runner.invoke(encode_app, [str(corpus), "--store", str(store), "--model", str(missing_model), "--json"])
    assert r.exit_code == 2 and json.loads(r.stdout.strip().splitlines()[-1])["type"] == "ConfigError"
    assert a_file.read_text() == "not a store\n"


def test_every_store_command_refuses_a_file_store_path(tmp_path: Path, a_file: Path) -> None:
    root = str(a_file)
    missing_model = str(tmp_path / "no-such-model")
    for args in (["store", "info", root], ["store", "versions", root], ["store", "docs", root],
                 ["store", "verify", root], ["store", "compact", root], ["store", "gc", root, "--dry-run"],
                 ["store", "tag", root, "t"], ["store", "restore", root, "1", "--yes"],
                 ["search", root, "a question", "--model", missing_model],
                 ["ask", root, "a question", "--model", missing_model],
                 ["store", "reindex-router", root, "--adapter", str(tmp_path / "no-adapter")],
                 ["train-router", "--store", root, "--out", str(tmp_path / "router"), "--model", missing_model]):
        _one_line_error(runner.invoke(app, args), 3, root, "regular file")
    assert a_file.read_text() == "not a store\n"


def test_reindex_router_refuses_a_dest_that_is_a_file(tmp_path: Path, a_file: Path) -> None:
    from msa_memory.store import create_store
    from msa_memory.testing.store_kit import tiny_identity

    src = tmp_path / "src.msa"
    create_store(src, tiny_identity())
    r = runner.invoke(app, ["store", "reindex-router", str(src), "--adapter", "aligned", "--dest", str(a_file)])
    _one_line_error(r, 2, str(a_file), "regular file")


# ----------------------------------------------------------------------------- output piped into head


@pytest.fixture(scope="module")
def wide_store(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A store whose `msa store docs --limit 0` prints far more than a pipe holds (long source paths)."""
    from msa_memory.jobs import encode_corpus

    root = tmp_path_factory.mktemp("wide")
    deep = root / "notes" / "/".join(f"{c * 200}" for c in "abc")
    make_corpus(deep, 160, words=(3, 5))
    encode_corpus([root / "notes"], root / "w.msa", model=str(tiny_model_dir), shard_tokens=10**6, workers=1,
                  torch_threads=1)
    return root / "w.msa"


def _env() -> dict[str, str]:
    # stdout buffered as Python has it by default (PYTHONUNBUFFERED makes a short write to a closed pipe silent)
    return {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"} | {"MSA_DISABLE_PROGRESS_BARS": "1"}


def _read_then_close(args: list[str], n_bytes: int | None = None) -> tuple[bytes, int, str]:
    """Run `msa ARGS`, read its first line (or n_bytes) and close the pipe, like `| head -1`."""
    p = subprocess.Popen([str(BIN / "msa"), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    first = p.stdout.readline() if n_bytes is None else p.stdout.read(n_bytes)
    p.stdout.close()
    err = p.stderr.read().decode()
    return first, p.wait(timeout=120), err


def test_output_piped_into_head_exits_quietly(wide_store: Path) -> None:
    root = str(wide_store)
    for args, n in ((["store", "docs", root, "--limit", "0"], None), (["store", "docs", root, "--limit", "0", "--json"], 100)):
        first, rc, err = _read_then_close(args, n)
        assert first and rc == 141 and err == "", (args, rc, err[-2000:])
    # the shell pipeline itself: `head` prints one line; with pipefail the status is 141, as for `yes | head -1`
    p = subprocess.run(["bash", "-o", "pipefail", "-c", f"'{BIN / 'msa'}' store docs '{root}' --limit 0 | head -1"],
                       capture_output=True, text=True, timeout=120, env=_env())
    assert p.returncode == 141 and p.stdout.count("\n") == 1 and p.stderr == "", (p.returncode, p.stderr[-2000:])


def test_ask_refuses_a_reader_folder_without_an_adapter_before_loading_the_model(tmp_path: Path) -> None:
    not_reader = tmp_path / "reader"
    not_reader.mkdir()
    missing_model = str(tmp_path / "no-such-model")   # loading it first would name the model instead
    r = runner.invoke(app, ["ask", str(tmp_path / "mem.msa"), "q?", "--reader", str(not_reader), "--model", missing_model])
    _one_line_error(r, 1, str(not_reader), "not a reader adapter")
    r = runner.invoke(app, ["train-reader", "--help"])
    assert r.exit_code == 0 and "--resume" in r.output
