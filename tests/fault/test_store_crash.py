"""Crash safety with real SIGKILLs, and racing commits in separate processes.

A writer subprocess reserves ids, writes a shard and commits it (plus a deletion); it is SIGKILLed
at each named step between its first shard write and the publish (and once just after). Oracles:
the latest version is unchanged and reads byte-identically, gc lists the leftovers as orphans,
find_shard/write_shard + commit retry succeeds, and after gc the store verifies clean. Two
processes committing against the same read version: exactly one wins.

Run: .venv/bin/python -m pytest tests/fault/test_store_crash.py -q
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest

from msa_memory.errors import VersionConflictError
from msa_memory.store import create_store, open_store, write_shard
from msa_memory.testing.faults import kill_when_paused, spawn_paused_writer, validate_store_manifests
from msa_memory.testing.store_kit import add_docs, random_docs, tiny_identity

WRITER = """
import numpy as np
from msa_memory.store import open_store, write_shard
from msa_memory.testing.store_kit import random_docs
store = open_store({root!r})
ids = store.reserve_ids(3)
passages, enc = random_docs(store.identity, ids, [5, 9, 2], np.random.default_rng(7), source="crash")
_s.fault_hook("writer:reserved")
rec = write_shard(store.root, "w", passages, enc)
store.commit(add=[rec], delete_ids=[{victim}], message="crashy")
print("COMMITTED")
"""

POINTS = ["shard:staged", "shard:kv", "shard:k_router", "shard:docs", "shard:record", "shard:published",
          "commit:locked", "commit:deletions", "commit:before_publish"]


def _snapshot(store, logical=False):
    docs = store.documents().to_pydict()
    if logical:  # compaction moves rows to new shards: compare content, not placement
        docs = {k: v for k, v in docs.items() if k not in ("shard_id", "chunk_start")}
    ids = docs["doc_id"]
    return (docs, [a.tobytes() for a in store.load_kv(ids)],
            [store.router_keys(layer)[0].tobytes() for layer in range(store.identity.n_layers)],
            [store.router_keys_shifted(j)[0].tobytes() for j in range(len(store.identity.shifted_layers))])


def _base(tmp_path, shifted=()):
    rng = np.random.default_rng(0)
    s = create_store(tmp_path / "mem", tiny_identity(hidden_size=3, shifted_layers=shifted))
    s, _, _, enc = add_docs(s, [4, 7, 3], rng, "base")
    return s, enc


@pytest.fixture
def base(tmp_path):
    return _base(tmp_path)


@pytest.mark.parametrize("point", POINTS)
def test_sigkill_before_publish_leaves_previous_version(base, tmp_path, point):
    _crash_before_publish_and_recover(base, tmp_path, point)


@pytest.mark.parametrize("point", ["shard:k_router", "shard:k_router_s", "shard:docs", "commit:before_publish"])
def test_sigkill_before_publish_with_a_shifted_grid(tmp_path, point):
    """A store with the shifted router-key grid: killed while its shard's shifted keys are written (or around),
    the previous version reads byte-identically, shifted keys included, and a retry commits."""
    _crash_before_publish_and_recover(_base(tmp_path, shifted=(3,)), tmp_path, point)


def _crash_before_publish_and_recover(base, tmp_path, point):
    store, enc = base
    before = _snapshot(store)
    victim = int(enc.doc_ids[1])
    marker = tmp_path / "paused"
    proc = spawn_paused_writer(WRITER.format(root=str(store.root), victim=victim), point, marker)
    assert kill_when_paused(proc, marker), proc.stderr.read().decode()[-2000:]

    # 1. the previous version is still the latest and reads byte-identically
    after = open_store(store.root)
    assert after.version == store.version
    assert _snapshot(after) == before
    # 2. gc finds what the dead writer left (staging dir, uncommitted shard or deletion file)
    report = after.gc(dry_run=True, grace_s=0)
    kinds = {o["kind"] for o in report["orphans"]}
    if point.startswith("shard:") and point != "shard:published":
        assert "staging" in kinds
    else:
        assert "shard" in kinds
    if point in ("commit:deletions", "commit:before_publish"):
        assert "deletion" in kinds
    assert report["young"] == [] and not report["removed"]
    # 3. a retry commits: resume the finished shard if there is one, else write it again
    rec = after.find_shard("w")
    assert (rec is not None) == (not point.startswith("shard:") or point == "shard:published")
    if rec is None:
        ids = np.arange(3, 6)  # the dead writer's reserved ids (a job keeps them in its journal)
        passages, e2 = random_docs(after.identity, ids, [5, 9, 2], np.random.default_rng(7), source="crash")
        rec = write_shard(after.root, "w", passages, e2)  # same shard id, as a resumed job does
    new = after.commit(add=[rec], delete_ids=[victim], message="retry")
    assert new.version == store.version + 1 and new.stats()["n_docs"] == 3 - 1 + 3
    # 4. gc removes the leftovers; everything still verifies and reads
    done = new.gc(dry_run=False, grace_s=0)
    assert done["removed"] and not any((new.root / "staging").iterdir())
    assert open_store(store.root).verify()["ok"]
    assert new.gc(dry_run=True, grace_s=0)["orphans"] == []
    assert len(new.load_kv(rec.doc_ids)) == 3
    validate_store_manifests(store.root)


def test_sigkill_after_publish_keeps_new_version(base, tmp_path):
    store, enc = base
    marker = tmp_path / "paused"
    proc = spawn_paused_writer(WRITER.format(root=str(store.root), victim=int(enc.doc_ids[0])),
                               "commit:published", marker)
    assert kill_when_paused(proc, marker)
    new = open_store(store.root)
    assert new.version == store.version + 1 and new.manifest["message"] == "crashy"
    assert new.stats()["n_docs"] == 5 and new.verify()["ok"]
    assert new.gc(dry_run=True, grace_s=0)["orphans"] == []
    # the lock died with the writer: the next commit goes through
    assert new.commit(delete_ids=[int(enc.doc_ids[1])]).version == store.version + 2


def test_sigkill_after_reserve_never_reuses_ids(base, tmp_path):
    store, _ = base
    marker = tmp_path / "paused"
    proc = spawn_paused_writer(WRITER.format(root=str(store.root), victim=0), "writer:reserved", marker)
    assert kill_when_paused(proc, marker)
    # the dead writer's ids (3..5) stay reserved and are never handed out again
    assert store.reserve_ids(2).tolist() == [6, 7]


RACER = """
import json, os, sys, time
import numpy as np
from msa_memory.errors import VersionConflictError
from msa_memory.store import open_store, write_shard
from msa_memory.testing.store_kit import random_docs
root, me, go, ids = sys.argv[1], sys.argv[2], sys.argv[3], [int(x) for x in sys.argv[4].split(',')]
store = open_store(root)
p, enc = random_docs(store.identity, np.array(ids), [5] * len(ids), np.random.default_rng(int(me)))
rec = write_shard(root, "racer-" + me, p, enc)
open(os.path.join(os.path.dirname(go), "ready-" + me), "w").close()
while not os.path.exists(go):
    time.sleep(0.001)
try:
    v = store.commit(add=[rec], read_version=store.version, message="racer " + me).version
    print(json.dumps({"won": v}))
except VersionConflictError as e:
    print(json.dumps({"conflict": str(e)}))
"""


@pytest.mark.parametrize("round_", range(3))
def test_two_processes_same_read_version_exactly_one_wins(base, tmp_path, round_):
    store, _ = base
    ids = store.reserve_ids(4)
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(store.root), str(i), str(go),
                               ",".join(map(str, ids[2 * i:2 * i + 2]))], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for i in range(2)]
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready-{i}").exists() for i in range(2)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
            [p.stderr.read().decode()[-1500:] for p in procs if p.poll() is not None]
        time.sleep(0.01)
    go.touch()
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err.decode()[-2000:]
        outs.append(json.loads(out.decode().strip().splitlines()[-1]))
    winners = [o for o in outs if "won" in o]
    assert len(winners) == 1 and winners[0]["won"] == store.version + 1
    assert sum("conflict" in o for o in outs) == 1
    latest = open_store(store.root)
    assert latest.version == store.version + 1 and latest.stats()["n_docs"] == 3 + 2
    # the loser's shard is an orphan for gc, and its ids can still be committed on retry
    loser = [i for i, o in enumerate(outs) if "conflict" in o][0]
    rec = latest.find_shard(f"racer-{loser}")
    assert rec is not None and latest.commit(add=[rec]).stats()["n_docs"] == 7
    with pytest.raises(VersionConflictError):
        store.commit(message="stale")


COMPACTOR = """
from msa_memory.store import open_store
open_store({root!r}).compact()
print("COMPACTED")
"""


@pytest.mark.parametrize("point", ["shard:kv", "compact:written", "commit:before_publish"])
def test_sigkill_during_compaction(base, tmp_path, point):
    store, enc = base
    store = store.commit(delete_ids=[int(enc.doc_ids[0])])
    before = _snapshot(store)
    marker = tmp_path / "paused"
    proc = spawn_paused_writer(COMPACTOR.format(root=str(store.root)), point, marker)
    assert kill_when_paused(proc, marker), proc.stderr.read().decode()[-2000:]
    after = open_store(store.root)
    assert after.version == store.version and _snapshot(after) == before
    kinds = {o["kind"] for o in after.gc(dry_run=True, grace_s=0)["orphans"]}
    assert kinds == ({"staging"} if point == "shard:kv" else {"shard"})
    again = after.compact()  # the retry compacts
    assert again.version == store.version + 1 and _snapshot(again, True) == _snapshot(after, True)
    again.gc(dry_run=False, grace_s=0)
    assert open_store(store.root).verify()["ok"]


# ----------------------------------------------------------------------------- disk full


def _inject_enospc(monkeypatch, root):
    """Every os.write to a file under ``root`` fails as a full disk does (ENOSPC), after the file was created."""
    import errno
    import os

    real_write = os.write
    prefix = str(root.resolve()) + os.sep

    def write(fd, data):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        if target.startswith(prefix):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("op", ["add", "delete", "restore", "compact", "tag"])
def test_disk_full_at_commit_publishes_nothing(base, tmp_path, monkeypatch, op):
    from msa_memory.errors import DiskFullError, StoreError

    store, enc = base
    rng = np.random.default_rng(4)
    store = store.commit(delete_ids=[int(enc.doc_ids[0])])  # something for compact to do
    _, rec, _, _ = add_docs(store, [3, 2], rng, "more", commit=False)
    before, snap = _files(store.root), _snapshot(store)
    calls = {"add": lambda: store.commit(add=[rec]), "delete": lambda: store.commit(delete_ids=[int(enc.doc_ids[1])]),
             "restore": lambda: store.restore(1), "compact": lambda: store.compact(), "tag": lambda: store.tag("t")}
    with monkeypatch.context() as m:
        _inject_enospc(m, store.root)
        with pytest.raises(DiskFullError) as ei:
            calls[op]()
    err = ei.value
    assert isinstance(err, StoreError) and isinstance(err, OSError)
    msg = str(err)
    assert "No space left" in msg and "bytes free" in msg and str(store.root) in msg
    assert "no version was published" in msg
    assert "msa store gc" in msg
    after = _files(store.root)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing already stored changed
    assert not [k for k in after if k.endswith(".tmp")]  # the failed write's temp file is gone
    reopened = open_store(store.root)
    assert reopened.version == store.version and _snapshot(reopened) == snap
    calls[op]()  # with space again the same call succeeds
    assert open_store(store.root).verify()["ok"]
