"""`msa-encode` through typer's CliRunner and as a real subprocess: exit codes, key lines, --json.

Run: .venv/bin/python -m pytest tests/cli/test_encode_cli.py -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from jobkit import edit, write_tiny_model
from typer.testing import CliRunner

from msa_memory.cli import encode_app

runner = CliRunner()
BIN = Path(sys.executable).parent


def _tail(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_encode_cli_runner_create_update_noop(tmp_path: Path, corpus: Path, tiny_model_dir: Path) -> None:
    store = tmp_path / "m.msa"
    args = [str(corpus), "--store", str(store), "--model", str(tiny_model_dir), "--shard-tokens", "800", "--torch-threads", "1"]
    r = runner.invoke(encode_app, [*args, "--json"])
    assert r.exit_code == 0, r.output
    res = _tail(r.stdout)
    assert res["committed"] and res["version"] == 1 and len(res["files_added"]) == 8 and res["tokens_encoded"] > 0
    # human summary of a no-op rerun
    r = runner.invoke(encode_app, args)
    assert r.exit_code == 0
    assert "no changes" in r.output and "nothing committed" in r.output and "8 unchanged" in r.output
    # one change: summary names the version and counts
    edit(corpus / "part0" / "note000.md", "# Note 0\nedited\n")
    r = runner.invoke(encode_app, args)
    assert r.exit_code == 0 and "committed version 2" in r.output and "0 added, 1 replaced, 0 deleted, 7 unchanged" in r.output
    # dry run after a deletion: reported, nothing written
    (corpus / "part1" / "note001.md").unlink()
    r = runner.invoke(encode_app, [*args, "--dry-run", "--json"])
    assert r.exit_code == 0 and _tail(r.stdout)["files_deleted"] == ["notes/part1/note001.md"]
    assert _tail(runner.invoke(encode_app, [*args, "--json"]).stdout)["version"] == 3


def test_encode_cli_errors_and_exit_codes(tmp_path: Path, corpus: Path, tiny_model_dir: Path) -> None:
    store = tmp_path / "m.msa"
    r = runner.invoke(encode_app, [str(tmp_path / "missing"), "--store", str(store), "--model", str(tiny_model_dir)])
    assert r.exit_code == 2 and r.output.startswith("error: Corpus path") and r.output.count("\n") == 1
    r = runner.invoke(encode_app, [str(corpus), "--model", str(tiny_model_dir)])
    assert r.exit_code == 2  # --store is required (usage error)
    r = runner.invoke(encode_app, [str(corpus), "--store", str(store), "--model", str(tmp_path / "nomodel"), "--json"])
    assert r.exit_code == 1 and _tail(r.stdout)["type"] == "ModelLoadError"
    assert runner.invoke(encode_app, [str(corpus), "--store", str(store), "--model", str(tiny_model_dir), "--torch-threads", "1"]).exit_code == 0
    other = write_tiny_model(tmp_path / "other", seed=3)
    edit(corpus / "part0" / "note000.md", "changed")
    r = runner.invoke(encode_app, [str(corpus), "--store", str(store), "--model", str(other), "--json"])
    assert r.exit_code == 6 and _tail(r.stdout)["type"] == "IdentityMismatchError"
    # an unreachable scheduler: one line, exit 1, nothing created (it is tried before anything else)
    from socket import socket

    with socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    r = runner.invoke(encode_app, [str(corpus), "--store", str(tmp_path / "x.msa"), "--model", str(tiny_model_dir),
                                   "--scheduler", f"tcp://127.0.0.1:{port}"])
    assert r.exit_code == 1 and "Cannot reach the Dask scheduler" in r.output and not (tmp_path / "x.msa").exists()
    r = runner.invoke(encode_app, ["--help"])
    assert r.exit_code == 0 and "Examples:" in r.output and "Exit codes" in r.output


def test_encode_cli_subprocess_json_and_summary(tmp_path: Path, corpus: Path, tiny_model_dir: Path) -> None:
    (corpus / "bad.txt").write_bytes(b"\xff\xfe\x00\x00binary")
    env = {**os.environ, "MSA_DISABLE_PROGRESS_BARS": "1"}
    store = tmp_path / "m.msa"
    # version 1 in this process; the subprocess makes version 2 and prints the human summary
    cmd = [str(corpus), "--store", str(store), "--model", str(tiny_model_dir), "--torch-threads", "1"]
    assert runner.invoke(encode_app, cmd).exit_code == 0
    edit(corpus / "part2" / "note002.md", "new text")
    cmd = [str(BIN / "msa-encode"), *cmd]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = p.stdout.splitlines()
    assert lines[0].startswith("msa-encode: committed version 2")
    assert any(line.strip().startswith("files : 0 added, 1 replaced, 0 deleted, 7 unchanged, 1 skipped") for line in lines)
    assert any("skipped" in line and "bad.txt" in line and "binary" in line for line in lines)
    assert "encoding 1 files" not in p.stderr  # no progress bar when stderr is not a terminal
    p = subprocess.run([str(BIN / "msa"), "store", "versions", str(store), "--json"], capture_output=True, text=True, env=env)
    assert p.returncode == 0 and _tail(p.stdout)["latest_version"] == 2
