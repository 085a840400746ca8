"""Readers against gc, and appends against compaction, with real concurrent processes.

1. gc never deletes what a snapshot opened within its grace period reads: a second process holds a
   snapshot of an old version (its lease) while gc(keep_last=1) runs; every file is old enough to go
   and the manifests were superseded long ago, so only the lease keeps them. Oracles: the version and
   its shard survive, the reader then reads all its documents; once the reader exits the same gc
   removes them (the lease made the difference). A reader that leases the version after gc looked
   at the leases but before it removed the manifest gets the manifest back and keeps its files.
2. An append prepared against version N commits over a compaction published meanwhile: a compactor
   process holds the writer lock, paused after writing its shard; an appender process commits
   (read_version N) and waits on the lock; the compaction publishes N+1; the append is rebased and
   publishes N+2. Oracles: both succeed, N+2 = compacted live documents + the appended ones,
   byte-identical tensors, ``extra.rebased_over == [N+1]``. Any other change in between is still a
   VersionConflictError, and on a backend without locks the loser of a publish race rebases too.
Run: .venv/bin/python -m pytest tests/fault/test_store_readers_and_rebase.py -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from msa_memory.errors import VersionConflictError
from msa_memory.store import create_store, open_store, shards, write_shard
from msa_memory.testing.store_kit import add_docs, random_docs, tiny_identity

OLD = time.time() - 7200  # older than the default grace period (1 h)

_READER = """
import json, os, sys, time
from msa_memory.store import open_store
root, version, ready, go = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
s = open_store(root, version)
open(ready, "w").close()
while not os.path.exists(go):
    time.sleep(0.01)
ids = s.documents(["doc_id"]).column("doc_id").to_pylist()
kv = s.load_kv(ids)
print(json.dumps({"ids": ids, "kv": [a.tobytes().hex()[:64] for a in kv], "texts": s.texts(ids)}), flush=True)
"""

_COMPACTOR = """
import os, sys, time
from msa_memory.store import open_store, shards
root, paused, release = sys.argv[1:4]
def hook(point):
    if point == "compact:written":
        open(paused, "w").close()
        while not os.path.exists(release):
            time.sleep(0.01)
shards.fault_hook = hook
print(open_store(root).compact().version, flush=True)
"""

_APPENDER = """
import json, os, sys, time
from msa_memory.store import open_store
root, rv, shard_id, go = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
s = open_store(root, rv)
rec = s.find_shard(shard_id)
assert rec is not None
while not os.path.exists(go):
    time.sleep(0.01)
s2 = s.commit(add=[rec], message="append")
print(json.dumps({"version": s2.version, "extra": s2.manifest["extra"], "op": s2.manifest["operation"]}), flush=True)
"""


def _age_everything(root: Path) -> None:
    """Make every file and folder of the store old, except readers' leases (their age is what counts)."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if "leases" not in p.relative_to(root).parts:
                os.utime(p, (OLD, OLD), follow_symlinks=False)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"child exited early: {proc.communicate()}")
        assert time.monotonic() < deadline, "child never got there"
        time.sleep(0.01)


@pytest.fixture
def three(tmp_path):
    """v1: shard a (3 docs), v2: + shard b, v3: every document of a deleted (shard a dropped)."""
    rng = np.random.default_rng(11)
    s = create_store(tmp_path / "mem.msa", tiny_identity(hidden_size=2))
    s, _, _, enc_a = add_docs(s, [5, 9, 3], rng, "a")
    s, *_ = add_docs(s, [4, 6], rng, "b")
    s = s.commit(delete_ids=enc_a.doc_ids.tolist())
    assert s.version == 3 and "a" not in {e["shard_id"] for e in s.manifest["shards"]}
    return s, enc_a


def _reader(root: Path, version: int, tmp_path: Path) -> tuple[subprocess.Popen, Path, Path]:
    ready, go = tmp_path / f"ready-{uuid.uuid4().hex}", tmp_path / f"go-{uuid.uuid4().hex}"
    proc = subprocess.Popen([sys.executable, "-c", _READER, str(root), str(version), str(ready), str(go)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, ready, go


def test_gc_keeps_what_a_reader_process_has_open(three, tmp_path):
    s, enc_a = three
    root = s.root
    want = open_store(root, 1).documents(["doc_id", "text"]).to_pylist()
    proc, ready, go = _reader(root, 1, tmp_path)
    _wait_for(ready, proc)
    assert [p.name[:8] for p in (root / "leases").iterdir()] == ["00000001"]  # the reader's lease
    _age_everything(root)
    rep = s.gc(dry_run=False, keep_last=1)  # default grace: 1 h
    assert rep["kept_versions"] == [1, 3] and rep["leased_versions"] == [1]
    assert (root / "versions/00000001.json").exists() and (root / "shards/a/_record.json").exists()
    assert rep["removed_versions"] == [0, 2]
    go.touch()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    got = json.loads(out)
    assert got["ids"] == [r["doc_id"] for r in want] and got["texts"] == [r["text"] for r in want]
    assert got["ids"] == enc_a.doc_ids.tolist()
    # the reader is gone and so is its lease: the same gc now removes version 1 and shard a
    assert not any((root / "leases").iterdir())
    rep = s.gc(dry_run=False, keep_last=1)
    assert rep["removed_versions"] == [1] and not (root / "shards/a").exists() and s.verify()["ok"]


def test_a_lease_taken_while_gc_runs_puts_the_version_back(three, tmp_path, monkeypatch):
    from msa_memory.store import maintenance

    s, enc_a = three
    root = s.root
    _age_everything(root)
    real = maintenance._remove_orphans
    procs = []

    def reader_arrives(be, orphans, manifests, grace_s):  # gc has read the leases: none; now a reader opens v1
        proc, ready, go = _reader(root, 1, tmp_path)
        _wait_for(ready, proc)
        procs.append((proc, go))
        return real(be, orphans, manifests, grace_s)

    monkeypatch.setattr(maintenance, "_remove_orphans", reader_arrives)
    rep = s.gc(dry_run=False, keep_last=1)
    assert rep["kept_versions"] == [1, 3] and rep["removed_versions"] == [0, 2]
    assert (root / "versions/00000001.json").exists() and (root / "shards/a/_record.json").exists()
    assert open_store(root, 1).manifest == s.checkout_version(1).manifest  # put back as it was
    proc, go = procs[0]
    go.touch()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert json.loads(out)["ids"] == enc_a.doc_ids.tolist()


def test_a_version_superseded_within_the_grace_period_is_kept(three):
    s, _ = three
    rep = s.gc(dry_run=False, keep_last=1)  # versions 2 and 3 were published just now
    assert rep["kept_versions"] == [0, 1, 2, 3] and rep["removed_versions"] == []
    rep = s.gc(dry_run=False, keep_last=1, grace_s=0)
    assert rep["kept_versions"] == [3]


def _prepare_append(tmp_path):
    """v1: shard a, v2: shard b, v3: one document of a deleted (a compaction has work); shard 'new' written, uncommitted."""
    rng = np.random.default_rng(5)
    s = create_store(tmp_path / "mem.msa", tiny_identity(hidden_size=2))
    s, _, _, enc_a = add_docs(s, [5, 9, 3], rng, "a")
    s, *_ = add_docs(s, [4], rng, "b")
    s = s.commit(delete_ids=[int(enc_a.doc_ids[0])])
    ids = s.reserve_ids(2)
    passages, enc = random_docs(s.identity, ids, [7, 2], rng)
    write_shard(s.root, "new", passages, enc)
    return s, enc


def test_append_rebases_over_a_concurrent_compaction(tmp_path):
    s, enc_new = _prepare_append(tmp_path)
    root, rv = s.root, s.version
    before = {int(i): s.load_kv([int(i)])[0].tobytes() for i in s.documents(["doc_id"]).column("doc_id").to_pylist()}
    paused, release, go = tmp_path / "paused", tmp_path / "release", tmp_path / "go"
    comp = subprocess.Popen([sys.executable, "-c", _COMPACTOR, str(root), str(paused), str(release)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(paused, comp)  # the compactor holds the writer lock, its new shard written
    app = subprocess.Popen([sys.executable, "-c", _APPENDER, str(root), str(rv), "new", str(go)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    go.touch()
    time.sleep(1.0)
    assert app.poll() is None  # waiting for the lock
    release.touch()
    c_out, c_err = comp.communicate(timeout=120)
    a_out, a_err = app.communicate(timeout=120)
    assert comp.returncode == 0 and app.returncode == 0, (c_err, a_err)
    assert int(c_out) == rv + 1
    got = json.loads(a_out)
    assert got["version"] == rv + 2 and got["op"] == "add" and got["extra"]["rebased_over"] == [rv + 1]
    final = open_store(root)
    assert final.version == rv + 2 and final.manifest["parent_version"] == rv + 1
    assert open_store(root, rv + 1).manifest["operation"] == "compact"
    shard_ids = [e["shard_id"] for e in final.manifest["shards"]]
    assert shard_ids[-1] == "new" and any(x.startswith("compact-") for x in shard_ids) and "a" not in shard_ids
    live = sorted(final.documents(["doc_id"]).column("doc_id").to_pylist())
    assert live == sorted(list(before) + enc_new.doc_ids.tolist())
    assert all(final.load_kv([i])[0].tobytes() == b for i, b in before.items())
    assert final.load_kv(enc_new.doc_ids.tolist())[0].shape[0] == int(enc_new.n_chunks[0])
    assert final.manifest["stats"]["n_docs"] == len(live) and final.verify()["ok"]


def test_append_over_another_change_still_conflicts(tmp_path):
    s, _ = _prepare_append(tmp_path)
    rec = s.find_shard("new")
    other = s.commit(delete_ids=[int(s.documents(["doc_id"]).column("doc_id").to_pylist()[0])])
    with pytest.raises(VersionConflictError, match=f"version {other.version} \\(delete\\) changed it"):
        s.commit(add=[rec])
    assert open_store(s.root).version == other.version


def test_lock_free_backend_loser_of_the_publish_race_rebases(monkeypatch):
    """Without locks two writers reach the conditional publish together: the compaction wins the number,
    the append sees it taken, re-reads the latest version and publishes over it."""
    from msa_memory.store._memory import MemoryBackend

    class NoLocks(MemoryBackend):
        supports_locks = False

    be = NoLocks(f"memory://nolocks-{uuid.uuid4().hex}")
    rng = np.random.default_rng(2)
    s = create_store(be, tiny_identity())
    s, _, _, enc = add_docs(s, [5, 3], rng, "a")
    s = s.commit(delete_ids=[int(enc.doc_ids[0])])
    _, rec, _, enc_new = add_docs(s, [4], rng, "new", commit=False)
    real, fired = shards.fault_hook, []

    def compaction_sneaks_in(point: str) -> None:
        if point == "commit:before_publish" and not fired:
            fired.append(point)
            assert s.compact().version == s.version + 1  # another writer takes version N+1 first
    monkeypatch.setattr(shards, "fault_hook", compaction_sneaks_in)
    out = s.commit(add=[rec])
    assert fired and out.version == s.version + 2 and out.manifest["extra"]["rebased_over"] == [s.version + 1]
    live = sorted(out.documents(["doc_id"]).column("doc_id").to_pylist())
    assert live == sorted([int(enc.doc_ids[1]), *enc_new.doc_ids.tolist()]) and out.verify()["ok"]
    assert real is not None
