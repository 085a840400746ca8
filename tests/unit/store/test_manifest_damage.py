"""Damaged or lost version manifests: a deleted latest manifest is refused instead of silently
rolling the store back, a truncated one names its file and `msa store repair`, ``repair`` publishes
the newest good version as a new one and sets the damaged files aside (never deletes), and ids and
paths in manifests and shard records that could lead outside the store are always refused (no
environment variable needed).
Run: .venv/bin/python -m pytest tests/unit/store/test_manifest_damage.py -q
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from msa_memory import errors as E
from msa_memory.store import _manifest, create_store, open_store
from msa_memory.testing.store_kit import add_docs, tiny_identity


def repair(root, dry_run=True):
    from msa_memory.store.repair import repair as _repair

    return _repair(root, dry_run=dry_run)


@pytest.fixture(autouse=True)
def no_strict_env(monkeypatch):
    """These checks must hold without MSA_STORE_STRICT_MANIFESTS (the conftest switches it on)."""
    monkeypatch.setattr(_manifest, "STRICT_VALIDATION", False)


@pytest.fixture
def three(tmp_path: Path):
    """v0 empty, v1 shard 'a' (3 docs), v2 + shard 'b' (2 docs), v3 + shard 'c' (1 doc)."""
    rng = np.random.default_rng(11)
    s = create_store(tmp_path / "mem.msa", tiny_identity())
    s, *_ = add_docs(s, [3, 5, 2], rng, "a")
    s, *_ = add_docs(s, [4, 4], rng, "b")
    s, *_ = add_docs(s, [6], rng, "c")
    return s


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "_writer.lock"}


def _docs(s) -> list:
    return s.documents(["doc_id", "text"]).to_pylist()


# ----------------------------------------------------------------------------- item 2: a lost latest manifest


def test_deleted_latest_manifest_is_refused_not_rolled_back(three):
    root = three.root
    (root / "versions" / "00000003.json").unlink()
    for call in (lambda: open_store(root), lambda: open_store(root, 2).commit(message="x"),
                 lambda: open_store(root, 2).gc(dry_run=False, grace_s=0),
                 lambda: open_store(root, 2).reserve_ids(1), lambda: open_store(root, 2).compact()):
        with pytest.raises(E.ManifestCorruptError) as ei:
            call()
        msg = str(ei.value)
        assert "00000003.json" in msg and "_latest.json" in msg and f"msa store repair {root}" in msg
    assert (root / "shards" / "c").is_dir()  # gc did not take the lost version's shard
    assert not (root / "versions" / "00000003.json").exists()  # nothing republished as version 3
    rep = open_store(root, 2).verify()  # a verify of an older version reports the loss too
    assert not rep["ok"] and any("00000003.json" in p["file"] for p in rep["problems"])


def test_repair_after_a_deleted_latest_manifest(three):
    root = three.root
    v2 = _docs(open_store(root, 2))
    (root / "versions" / "00000003.json").unlink()
    before = _files(root)
    dry = repair(root)
    assert dry["dry_run"] and dry["newest_good_version"] == 2 and dry["version"] == 4
    assert any("00000003.json" in p["path"] and "missing" in p["problem"] for p in dry["problems"])
    assert dry["unreferenced_shards"] == ["c"]
    assert _files(root) == before  # a dry run changes nothing
    rep = repair(root, dry_run=False)
    assert rep["version"] == 4 and not rep["dry_run"]
    s = open_store(root)
    assert s.version == 4 and _docs(s) == v2 and s.manifest["changes"]["restored_from"] == 2
    assert s.verify()["ok"]
    for k, v in before.items():  # nothing already stored changed
        assert (root / k).read_bytes() == v or k == "versions/_latest.json"
    assert repair(root)["problems"] == []  # healthy now
    from msa_memory.store import _ids, shards

    c_ids = shards.read_record(root, "c").doc_ids  # the lost version's ids stay used: never handed out again
    assert _ids.in_ranges(c_ids, s.manifest["used_id_ranges"]).all()
    assert int(s.reserve_ids(1)[0]) > int(c_ids.max())
    s5, *_ = add_docs(s, [3], np.random.default_rng(0), "d")
    assert s5.version == 5


# ----------------------------------------------------------------------------- item 3: a truncated latest manifest


@pytest.mark.parametrize("damage", ["truncate", "empty", "garbage", "wrong-version"])
def test_damaged_latest_manifest_names_file_and_repair(three, damage):
    root = three.root
    p = root / "versions" / "00000003.json"
    good = p.read_bytes()
    if damage == "truncate":
        p.write_bytes(good[: len(good) // 2])
    elif damage == "empty":
        p.write_bytes(b"")
    elif damage == "garbage":
        p.write_bytes(b"\x00\xff" * 40)
    else:
        d = json.loads(good)
        d["version"] = 7
        p.write_text(json.dumps(d))
    damaged = p.read_bytes()
    with pytest.raises(E.ManifestCorruptError) as ei:
        open_store(root)
    assert str(p) in str(ei.value) and f"msa store repair {root}" in str(ei.value)
    assert "open_store(" not in str(ei.value)  # the way out is a command, not a Python call
    rep = repair(root, dry_run=False)
    assert rep["version"] == 4 and rep["newest_good_version"] == 2
    [moved] = rep["moved"]
    assert moved["from"] == "versions/00000003.json" and (root / moved["to"]).read_bytes() == damaged
    assert not p.exists()
    s = open_store(root)
    assert s.version == 4 and _docs(s) == _docs(open_store(root, 2))
    assert [v["version"] for v in s.versions()] == [0, 1, 2, 4]
    assert s.gc(dry_run=True, grace_s=0)["orphans"][0]["path"] == "shards/c"


def test_repair_sets_aside_a_damaged_older_manifest_without_a_new_version(three):
    root = three.root
    p = root / "versions" / "00000001.json"
    p.write_bytes(p.read_bytes()[:10])
    with pytest.raises(E.ManifestCorruptError, match="msa store repair"):
        open_store(root).versions()
    with pytest.raises(E.ManifestCorruptError, match="00000001.json"):
        open_store(root).gc(dry_run=False, keep_last=1, grace_s=0)  # gc refuses rather than guess
    rep = repair(root, dry_run=False)
    assert rep["version"] is None and rep["moved"][0]["from"] == "versions/00000001.json"
    assert [v["version"] for v in open_store(root).versions()] == [0, 2, 3]


def test_repair_rewrites_a_damaged_hint_and_refuses_without_a_good_version(three, tmp_path):
    root = three.root
    hint = root / "versions" / "_latest.json"
    hint.write_text('{"vers')
    with pytest.raises(E.ManifestCorruptError, match="_latest.json"):
        open_store(root)
    rep = repair(root, dry_run=False)
    assert rep["version"] is None and json.loads(hint.read_text()) == {"version": 3}
    assert open_store(root).version == 3
    for v in range(4):
        (root / "versions" / f"{v:08d}.json").write_text("{")
    with pytest.raises(E.ManifestCorruptError, match="no readable version"):
        repair(root, dry_run=False)
    assert all((root / "versions" / f"{v:08d}.json").read_text() == "{" for v in range(4))


# ----------------------------------------------------------------------------- item 4: ids and paths always checked


def _tamper(root: Path, version: int, edit) -> Path:
    p = root / "versions" / f"{version:08d}.json"
    d = json.loads(p.read_text())
    edit(d)
    p.write_text(json.dumps(d))
    return p


@pytest.mark.parametrize("field,edit", [
    ("shards[0].shard_id", lambda d: d["shards"][0].update(shard_id="../../../outside_shard/X")),
    ("shards[0].shard_id", lambda d: d["shards"][0].update(shard_id="/etc")),
    ("shards[0].router_keys.path", lambda d: d["shards"][0].update(
        router_keys={"path": "router_keys/../../x", "files": {}})),
    ("shards[0].router_keys.files", lambda d: d["shards"][0].update(
        router_keys={"path": "router_keys/ok", "files": {"../../x": {"size": 1, "crc32c": 1}}})),
    ("deletions[0].path", lambda d: d.update(deletions=[{"path": "deletions/../../../x.json", "n_docs": 1,
                                                         "crc32c": 1}])),
])
def test_escaping_ids_and_paths_are_refused_on_read(three, field, edit):
    root = three.root
    p = _tamper(root, 1, edit)
    before = _files(root)
    for call in (lambda: open_store(root, 1), lambda: open_store(root).restore(1),
                 lambda: open_store(root).versions()):
        with pytest.raises(E.ManifestCorruptError) as ei:
            call()
        assert field in str(ei.value) and str(p) in str(ei.value)
    assert _files(root) == before and open_store(root).version == 3  # restore published nothing


def test_escaping_shard_id_in_latest_refused_by_compact(three):
    root = three.root
    _tamper(root, 3, lambda d: d["shards"][0].update(shard_id="../../../outside_shard/X"))
    with pytest.raises(E.ManifestCorruptError, match=r"shards\[0\]\.shard_id"):
        open_store(root, 2).compact()
    assert not (root / "versions" / "00000004.json").exists()


def test_escaping_ids_are_refused_on_publish(three):
    from msa_memory.store import commit as C

    root = three.root
    m = dict(three.manifest, version=4, parent_version=3)
    m["shards"] = [dict(m["shards"][0], shard_id="../outside")]
    with pytest.raises(E.ManifestCorruptError, match=r"shards\[0\]\.shard_id"):
        C.publish(three, m)
    assert not (root / "versions" / "00000004.json").exists()


def test_shard_record_that_points_elsewhere_is_refused(three):
    root = three.root
    rec = root / "shards" / "a" / "_record.json"
    d = json.loads(rec.read_text())
    for bad in ({"shard_id": "../../outside"}, {"shard_id": "b"},
                {"files": {"../../../x": {"size": 1, "crc32c": 1}}}):
        rec.write_text(json.dumps({**d, **bad}))
        from msa_memory.store import shards

        with pytest.raises(E.ManifestCorruptError, match=str(rec)):
            shards.read_record(root, "a")
    rec.write_text(json.dumps(d))
