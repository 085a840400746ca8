"""gc grace periods and version expiry, compaction thresholds, find_shard on damaged shards,
restore of collected versions, and the torch-free import rule.
Run: .venv/bin/python -m pytest tests/unit/store/test_maintenance.py -q
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from msa_memory.errors import ConfigError, VersionNotFoundError
from msa_memory.store import open_store, write_shard
from msa_memory.testing.faults import flip_byte
from msa_memory.testing.store_kit import add_docs, random_docs


def test_store_package_does_not_import_torch():
    code = ("import sys, msa_memory.store, msa_memory.schemas.arrow; "
            "from msa_memory.store import maintenance, commit, shards; "
            "print('torch' in sys.modules, 'zarr' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_gc_keeps_young_orphans_and_dry_run_removes_nothing(store, rng):
    _, rec, _, _ = add_docs(store, [3], rng, "pending", commit=False)
    rep = store.gc(dry_run=False)  # default grace 1 h: a running job's shard survives
    assert [o["path"] for o in rep["young"]] == ["shards/pending"] and rep["orphans"] == []
    assert (store.root / "shards" / "pending").exists()
    rep = store.gc(dry_run=True, grace_s=0)
    assert [o["path"] for o in rep["orphans"]] == ["shards/pending"] and rep["bytes"] > 0
    assert (store.root / "shards" / "pending").exists()
    store.gc(dry_run=False, grace_s=0)
    assert not (store.root / "shards" / "pending").exists()
    assert store.find_shard("pending") is None


def test_gc_keep_last_keeps_tagged_versions(store, rng):
    s = store
    for k in range(3):
        s, *_ = add_docs(s, [3], rng, f"s{k}")
    s.tag("keep", 1)
    rep = s.gc(dry_run=False, keep_last=1, grace_s=0)
    assert rep["kept_versions"] == [1, 3] and rep["removed_versions"] == [0, 2]
    assert [v["version"] for v in s.versions()] == [1, 3]
    with pytest.raises(VersionNotFoundError):
        open_store(store.root, 2)
    assert open_store(store.root, "keep").stats()["n_docs"] == 1
    assert open_store(store.root).stats()["n_docs"] == 3  # shards still referenced by v3 are kept
    with pytest.raises(ConfigError):
        s.gc(keep_last=0)


def test_restore_of_a_version_whose_shards_were_collected(store, rng):
    s1, _, _, enc = add_docs(store, [3, 3], rng, "a")
    s2 = s1.commit(delete_ids=[int(enc.doc_ids[0])]).compact()
    s2.gc(dry_run=False, keep_last=1, grace_s=0)
    with pytest.raises(VersionNotFoundError):
        s2.restore(1)
    assert s2.restore(s2.version).stats()["n_docs"] == 1


def test_compact_threshold(store, rng):
    s1, _, _, enc = add_docs(store, [4] * 10, rng, "a")
    s2 = s1.commit(delete_ids=[int(enc.doc_ids[0])])  # 10% dead
    assert s2.compact(min_dead_fraction=0.5).version == s2.version
    s3 = s2.compact(min_dead_fraction=0.05)
    assert s3.version == s2.version + 1 and s3.stats()["n_docs"] == 9
    with pytest.raises(ConfigError):
        s3.compact(min_dead_fraction=1.0)


def test_find_shard_moves_damaged_shard_aside(store, rng):
    _, rec, p, enc = add_docs(store, [4, 4], rng, "job-0", commit=False)
    flip_byte(store.root / "shards" / "job-0" / "kv" / "c.0.0.0.0.0", 10)
    assert store.find_shard("job-0") is None
    assert not (store.root / "shards" / "job-0").exists()
    assert any(d.name.startswith("job-0.damaged-") for d in (store.root / "staging").iterdir())
    rec2 = write_shard(store.root, "job-0", p, enc)  # the job can write it again under the same id
    assert store.find_shard("job-0").to_dict() == rec2.to_dict()
    assert store.commit(add=[rec2]).verify()["ok"]


def test_commit_noop_and_read_version(store, rng):
    s1 = store.commit(message="nothing")
    assert s1.manifest["operation"] == "noop" and s1.version == 1
    s2, *_ = add_docs(s1, [3], rng, "a")
    ids = s2.reserve_ids(1)
    p, enc = random_docs(s2.identity, ids, [3], rng)
    rec = write_shard(s2.root, "b", p, enc)
    s3 = s1.commit(add=[rec], read_version=2)  # an older snapshot may commit against an explicit version
    assert s3.version == 3 and s3.stats()["n_docs"] == 2
    assert np.array_equal(s3.router_keys(0)[1], np.repeat([0, 1], 1))


def test_deletion_files_are_checkpointed(store, rng, monkeypatch):
    from msa_memory.store import commit as commit_mod

    monkeypatch.setattr(commit_mod, "MAX_DELETION_FILES", 3)
    s, _, _, enc = add_docs(store, [3] * 8, rng, "a")
    s2, _, _, enc2 = add_docs(s, [3] * 2, rng, "b")
    for k in range(5):
        s2 = s2.commit(delete_ids=[int(enc.doc_ids[k])])
        assert len(s2.manifest["deletions"]) <= 3
    s2 = s2.commit(delete_ids=enc2.doc_ids.tolist())  # shard b dropped entirely
    assert len(s2.manifest["deletions"]) <= 3
    live = sorted(int(i) for i in enc.doc_ids[5:])
    assert sorted(s2.documents(["doc_id"]).column(0).to_pylist()) == live
    assert s2.stats()["n_docs"] == 3 and s2.verify()["ok"]
    assert open_store(store.root, s.version).stats()["n_docs"] == 8  # old versions unaffected


def test_compact_merges_small_shards(store, rng):
    s = store
    encs = []
    for k in range(5):
        s, _, _, enc = add_docs(s, [4, 6], rng, f"tiny{k}")
        encs.append(enc)
    s = s.commit(delete_ids=[int(encs[1].doc_ids[0])])
    ids = s.documents(["doc_id"]).column(0).to_pylist()
    want = [a.tobytes() for a in s.load_kv(ids)]
    keys = [s.router_keys(layer) for layer in range(2)]
    texts = s.texts(ids)
    s2 = s.compact(merge_below_chunks=6)
    assert s2.stats()["n_shards"] < 5 and s2.stats()["n_docs"] == 9
    assert [a.tobytes() for a in s2.load_kv(ids)] == want and s2.texts(ids) == texts
    for layer in range(2):
        k2, d2 = s2.router_keys(layer)
        for i in ids:  # same keys per document (shard order may differ)
            assert k2[d2 == i].tobytes() == keys[layer][0][keys[layer][1] == i].tobytes()
    assert s2.manifest["deletions"] == [] and s2.verify()["ok"]
    assert s2.compact(merge_below_chunks=6).version == s2.version  # nothing left to merge


def test_publish_without_hard_links(store, rng, monkeypatch):
    import os as _os

    def no_link(*a, **k):
        raise PermissionError("link not supported")

    monkeypatch.setattr(_os, "link", no_link)
    s, *_ = add_docs(store, [3], rng, "a")
    assert s.version == 1 and open_store(store.root).version == 1
    stale = open_store(store.root, 0)
    from msa_memory.errors import VersionConflictError

    with pytest.raises(VersionConflictError):
        stale.commit(message="stale")
    from msa_memory.store._local import LocalBackend

    be, target = LocalBackend(store.root), store.root / "versions" / "99999999.json"
    assert be.publish("versions/99999999.json", b"{}") and not be.publish("versions/99999999.json", b"[]")
    assert target.read_bytes() == b"{}"
    target.unlink()
