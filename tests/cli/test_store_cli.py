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


# ----------------------------------------------------------------------------- damage, links, read-only, disk full


def _one_line_error(r, code: int, *needles: str) -> str:
    assert r.exit_code == code, r.output
    err = r.output.strip().splitlines()[-1] if r.output.strip() else ""
    assert r.output.count("error: ") == 1 and err.startswith("error: "), r.output
    for n in needles:
        assert n in err, (n, err)
    return err


def _blocked_commands(root: str) -> list[list[str]]:
    return [["store", "info", root], ["store", "versions", root], ["store", "docs", root], ["store", "verify", root],
            ["store", "restore", root, "first", "--yes"], ["store", "gc", root, "--dry-run"],
            ["store", "gc", root, "--yes", "--grace-s", "0"], ["store", "compact", root], ["store", "tag", root, "t"]]


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_store_repair_after_damaged_latest_manifest(store_path: Path, damage: str) -> None:
    root = str(store_path)
    latest = store_path / "versions" / "00000003.json"
    v2_docs = open_store(store_path, 2).documents(["doc_id", "text"]).to_pylist()
    if damage == "truncate":
        latest.write_bytes(latest.read_bytes()[:100])
    else:
        latest.unlink()
    for args in _blocked_commands(root):
        _one_line_error(runner.invoke(app, args), 4, "00000003.json", f"msa store repair {root}")
    # the way out: a dry run says what is wrong and changes nothing; the real run needs --yes
    files = sorted(p.relative_to(store_path).as_posix() for p in store_path.rglob("*"))
    r = runner.invoke(app, ["store", "repair", root, "--dry-run"])
    assert r.exit_code == 0 and "00000003.json" in r.output and "version 2" in r.output, r.output
    assert sorted(p.relative_to(store_path).as_posix() for p in store_path.rglob("*")) == files
    _one_line_error(runner.invoke(app, ["store", "repair", root]), 2, "--yes")
    r = runner.invoke(app, ["store", "repair", root, "--yes", "--json"])
    assert r.exit_code == 0, r.output
    out = _json_tail(r.stdout)
    assert out["version"] == 4 and out["newest_good_version"] == 2
    if damage == "truncate":
        assert (store_path / out["moved"][0]["to"]).read_bytes() != b""  # kept aside, not deleted
    for args in _blocked_commands(root)[:4]:
        assert runner.invoke(app, args).exit_code == 0, args
    assert open_store(store_path).documents(["doc_id", "text"]).to_pylist() == v2_docs
    r = runner.invoke(app, ["store", "repair", root, "--yes"])
    assert r.exit_code == 0 and "nothing to repair" in r.output


def test_store_encode_after_a_damaged_latest_manifest(tmp_path: Path, corpus: Path, tiny_model_dir: Path) -> None:
    from msa_memory.cli import encode_app

    store = tmp_path / "m.msa"
    args = [str(corpus), "--store", str(store), "--model", str(tiny_model_dir), "--shard-tokens", "800",
            "--torch-threads", "1"]
    assert runner.invoke(encode_app, args).exit_code == 0
    (corpus / "part0" / "extra.md").write_text("# Extra\nanother note\n")
    assert runner.invoke(encode_app, args).exit_code == 0  # version 2
    v2 = store / "versions" / "00000002.json"
    v2.write_bytes(v2.read_bytes()[:50])
    _one_line_error(runner.invoke(encode_app, args), 4, str(v2), f"msa store repair {store}")
    assert runner.invoke(app, ["store", "repair", str(store), "--yes"]).exit_code == 0
    r = runner.invoke(encode_app, [*args, "--json"])
    assert r.exit_code == 0, r.output
    res = _json_tail(r.stdout)
    assert res["committed"] and res["version"] == 4 and res["files_added"] == ["notes/part0/extra.md"]


@pytest.mark.parametrize("folder", ["staging", "shards"])
def test_store_gc_and_verify_refuse_a_linked_folder(store_path: Path, tmp_path: Path, folder: str) -> None:
    import shutil
    import time

    root = str(store_path)
    sibling = tmp_path / "sibling"
    (sibling / "src").mkdir(parents=True)
    (sibling / "src" / "a.py").write_text("keep me\n")
    (tmp_path / "note.txt").write_text("keep me too\n")
    old = time.time() - 7 * 24 * 3600
    for p in (sibling / "src" / "a.py", sibling / "src", sibling, tmp_path / "note.txt"):
        os.utime(p, (old, old))
    shutil.rmtree(store_path / folder)
    os.symlink("..", store_path / folder)
    for args in (["store", "gc", root, "--yes", "--grace-s", "0"], ["store", "gc", root, "--dry-run"]):
        _one_line_error(runner.invoke(app, args), 4, f"{store_path / folder}", "symbolic link")
    r = runner.invoke(app, ["store", "verify", root])
    assert r.exit_code == 4 and "symbolic link" in r.output
    assert (sibling / "src" / "a.py").read_text() == "keep me\n" and (tmp_path / "note.txt").exists()


def _ro(store: Path, *args: str) -> subprocess.CompletedProcess:
    """Run `msa ARGS` with ``store`` bind-mounted read-only in a private mount namespace (a real EROFS)."""
    exe = Path(sys.executable).with_name("msa")
    script = 'mount --bind -o ro "$1" "$1" && shift && exec "$@"'
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", str(store),
                           str(exe), *args], capture_output=True, text=True,
                          env={**os.environ, "MSA_DISABLE_PROGRESS_BARS": "1"})


def test_store_read_only(store_path: Path) -> None:
    root = str(store_path)
    probe = _ro(store_path, "store", "info", root)
    if "mount" in probe.stderr and probe.returncode != 0 or "unshare" in probe.stderr:
        pytest.skip(f"no private read-only mounts here: {probe.stderr.strip()[:200]}")
    assert probe.returncode == 0, probe.stderr
    files = {p.relative_to(store_path).as_posix(): p.read_bytes() for p in store_path.rglob("*") if p.is_file()}
    for args in (["store", "gc", root, "--dry-run"], ["store", "versions", root], ["store", "verify", root],
                 ["store", "docs", root], ["store", "repair", root, "--dry-run"],
                 ["store", "restore", root, "first", "--dry-run"]):
        p = _ro(store_path, *args)
        assert p.returncode == 0, (args, p.stderr)
    for args in (["store", "gc", root, "--yes", "--grace-s", "0"], ["store", "tag", root, "t"],
                 ["store", "restore", root, "first", "--yes"], ["store", "compact", root]):
        p = _ro(store_path, *args)
        err = p.stderr.strip().splitlines()
        assert p.returncode == 1 and len(err) == 1, (args, p.stderr)
        assert "not writable" in err[0] and root in err[0] and "OSError" not in err[0], err[0]
    assert {p.relative_to(store_path).as_posix(): p.read_bytes() for p in store_path.rglob("*") if p.is_file()} == files


def test_store_disk_full_is_one_line(store_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    real_write = os.write
    prefix = str(store_path.resolve()) + os.sep

    def write(fd: int, data: bytes) -> int:
        if os.readlink(f"/proc/self/fd/{fd}").startswith(prefix):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    r = runner.invoke(app, ["store", "restore", str(store_path), "first", "--yes"])
    _one_line_error(r, 1, "No space left", "no version was published", "bytes free", "msa store gc")
    monkeypatch.undo()
    assert open_store(store_path).version == 3
