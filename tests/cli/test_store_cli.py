"""`msa store ...` commands over a real store built with the store test kit (no model needed).

Checks exit codes, key lines and the final --json line, through typer's CliRunner and (for a
few) as real subprocesses of the installed console script.
Run: .venv/bin/python -m pytest tests/cli/test_store_cli.py -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from msa_memory.cli import app
from msa_memory.store import create_store, open_store
from msa_memory.testing.store_kit import add_docs, tiny_identity

runner = CliRunner()


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    """Version 0 empty, v1 = 3 docs, v2 = +2 docs, v3 = one doc deleted; tag 'first' -> v1."""
    rng = np.random.default_rng(7)
    root = tmp_path / "mem.msa"
    s = create_store(root, tiny_identity())
    s, rec1, _, _ = add_docs(s, [5, 9, 3], rng, "s1", source="alpha")
    s, _, _, _ = add_docs(s, [4, 4], rng, "s2", source="beta")
    s = s.commit(delete_ids=[int(rec1.doc_ids[0])], message="delete one")
    s.tag("first", version=1)
    return root


def _json_tail(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_store_info_human_and_json(store_path: Path) -> None:
    r = runner.invoke(app, ["store", "info", str(store_path)])
    assert r.exit_code == 0, r.output
    assert "version 3 of 3" in r.output and "tiny-test" in r.output and "first=1" in r.output
    r = runner.invoke(app, ["store", "info", str(store_path), "--version", "first", "--json"])
    assert r.exit_code == 0
    info = _json_tail(r.stdout)
    assert info["version"] == 1 and info["latest_version"] == 3 and info["n_docs"] == 3
    assert info["identity"]["router_layers"] == [1, 3]
    # the router keys Memory would hold: every live aligned chunk at both layers (no shifted grid here)
    ident = info["identity"]
    assert info["router_key_bytes"] == (info["n_chunks"] * 2 * ident["n_kv_heads"] * ident["head_dim"]
                                        * (2 if ident["dtype"] == "bfloat16" else 4))
    assert "of router keys" in runner.invoke(app, ["store", "info", str(store_path)]).output


def test_store_versions_lists_every_version_with_tags(store_path: Path) -> None:
    r = runner.invoke(app, ["store", "versions", str(store_path)])
    assert r.exit_code == 0
    lines = r.output.strip().splitlines()
    assert len(lines) == 5 and "[first]" in lines[2] and "delete one" in lines[4]
    data = _json_tail(runner.invoke(app, ["store", "versions", str(store_path), "--json"]).stdout)
    assert [v["version"] for v in data["versions"]] == [0, 1, 2, 3] and data["tags"] == {"first": 1}


def test_store_docs_filters_and_limits(store_path: Path) -> None:
    data = _json_tail(runner.invoke(app, ["store", "docs", str(store_path), "--json", "--limit", "0"]).stdout)
    assert data["total"] == 4 and len(data["documents"]) == 4
    data = _json_tail(runner.invoke(app, ["store", "docs", str(store_path), "--json", "--path", "beta/*"]).stdout)
    assert data["total"] == 2 and all(d["source_path"].startswith("beta/") for d in data["documents"])
    r = runner.invoke(app, ["store", "docs", str(store_path), "-n", "1"])
    assert r.exit_code == 0 and "1 of 4 documents in version 3" in r.output


def test_store_verify_ok_then_corrupt_exits_4(store_path: Path) -> None:
    r = runner.invoke(app, ["store", "verify", str(store_path), "--json"])
    assert r.exit_code == 0 and _json_tail(r.stdout)["ok"] is True
    # flip one byte in a data file of a live shard
    victim = max((p for p in (store_path / "shards" / "s2").rglob("*") if p.is_file() and p.name != "_record.json"),
                 key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    r = runner.invoke(app, ["store", "verify", str(store_path)])
    assert r.exit_code == 4 and "problem" in r.output


def test_store_tag_restore_compact_gc(store_path: Path) -> None:
    r = runner.invoke(app, ["store", "tag", str(store_path), "release", "--json"])
    assert r.exit_code == 0 and _json_tail(r.stdout) == {"store": str(store_path), "tag": "release", "version": 3}
    r = runner.invoke(app, ["store", "tag", str(store_path), "release", "--version", "2"])
    assert r.exit_code == 1 and "already exists" in r.output  # StoreExistsError: not a usage error
    assert runner.invoke(app, ["store", "tag", str(store_path), "release", "--version", "2", "--force"]).exit_code == 0
    assert open_store(store_path).tags()["release"] == 2
    # restore needs --yes when not interactive
    r = runner.invoke(app, ["store", "restore", str(store_path), "first"])
    assert r.exit_code == 2 and "--yes" in r.output
    r = runner.invoke(app, ["store", "restore", str(store_path), "first", "--dry-run", "--json"])
    assert r.exit_code == 0 and _json_tail(r.stdout)["n_docs_after"] == 3 and open_store(store_path).version == 3
    r = runner.invoke(app, ["store", "restore", str(store_path), "first", "--yes", "--json"])
    assert r.exit_code == 0 and _json_tail(r.stdout)["version"] == 4
    assert open_store(store_path).stats()["n_docs"] == 3
    # compact the version with a deletion, then gc with no grace removes the dropped shard
    runner.invoke(app, ["store", "restore", str(store_path), "3", "--yes"])
    r = runner.invoke(app, ["store", "compact", str(store_path), "--json"])
    out = _json_tail(r.stdout)
    assert r.exit_code == 0 and out["committed"] and out["version"] == 6 and out["n_docs"] == 4
    r = runner.invoke(app, ["store", "gc", str(store_path), "--grace-s", "0", "--keep-last", "1", "--dry-run", "--json"])
    preview = _json_tail(r.stdout)
    assert r.exit_code == 0 and preview["dry_run"] and preview["orphans"]
    r = runner.invoke(app, ["store", "gc", str(store_path), "--grace-s", "0", "--keep-last", "1", "--yes", "--json"])
    assert r.exit_code == 0 and _json_tail(r.stdout)["removed"]
    assert runner.invoke(app, ["store", "verify", str(store_path)]).exit_code == 0


def test_store_errors_are_one_line_with_hint_and_exit_codes(tmp_path: Path, store_path: Path) -> None:
    r = runner.invoke(app, ["store", "info", str(tmp_path / "missing.msa")])
    assert r.exit_code == 3
    assert r.output.count("\n") == 1 and r.output.startswith("error: ") and "MSA_DEBUG=1" in r.output
    r = runner.invoke(app, ["store", "info", str(store_path), "--version", "99", "--json"])
    assert r.exit_code == 3
    err = _json_tail(r.stdout)
    assert err["type"] == "VersionNotFoundError" and err["exit_code"] == 3
    assert runner.invoke(app, ["store", "info"]).exit_code == 2  # usage error (missing argument)


def test_store_cli_as_subprocess(store_path: Path, tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("msa")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "msa_memory.cli"]
    env = {**os.environ, "MSA_DISABLE_PROGRESS_BARS": "1"}
    p = subprocess.run([*cmd, "store", "versions", str(store_path), "--json"], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.strip().splitlines()[-1])["latest_version"] == 3
    p = subprocess.run([*cmd, "store", "info", str(tmp_path / "nope")], capture_output=True, text=True,
                       env={**env, "MSA_DEBUG": "1"})
    assert p.returncode == 3 and "Traceback" in p.stderr and "StoreNotFoundError" in p.stderr
    p = subprocess.run([*cmd, "store", "--help"], capture_output=True, text=True, env=env)
    assert p.returncode == 0 and "restore" in p.stdout
    # with --json even a usage error ends with one JSON line (and exit code 2)
    p = subprocess.run([*cmd, "store", "docs", str(store_path), "--limit", "-1", "--json"], capture_output=True, text=True, env=env)
    assert p.returncode == 2 and json.loads(p.stdout.strip().splitlines()[-1])["type"] == "UsageError"
