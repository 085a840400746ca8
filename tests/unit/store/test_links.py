"""Symbolic links and foreign entries in a store: gc, compact, restore, verify and the writers never
follow a link out of the store root and never delete what they did not prove is the store's own.

Each test builds a real outside folder (a sibling project and a file next to the store, old enough
for any grace period), points a store folder or entry at it with a real symlink, runs the store
operation and checks the outside tree survives byte for byte.
Run: .venv/bin/python -m pytest tests/unit/store/test_links.py -q
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from msa_memory import errors as E
from msa_memory.store import create_store, open_store, write_shard
from msa_memory.testing.store_kit import add_docs, random_docs, tiny_identity

OLD = time.time() - 30 * 24 * 3600  # older than any grace period


def tree(path: Path) -> dict[str, object]:
    """Every entry under ``path`` (links not followed): file bytes, 'dir', or ('link', target)."""
    out: dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = p.relative_to(path).as_posix()
            out[rel] = (("link", os.readlink(p)) if p.is_symlink() else "dir" if p.is_dir() else p.read_bytes())
    return out


def age(*paths: Path) -> None:
    for p in paths:
        for dirpath, dirnames, filenames in os.walk(p):
            for name in dirnames + filenames:
                os.utime(Path(dirpath) / name, (OLD, OLD), follow_symlinks=False)
        os.utime(p, (OLD, OLD), follow_symlinks=False)


@pytest.fixture
def world(tmp_path: Path):
    """tmp/work/{mem.msa (v1 shard 'a', v2 shard 'b', v3 deletes a doc of 'b'), sibling/ (another project),
    note.txt (a file next to the store)} and tmp/outside/ (an unrelated folder with files)."""
    work = tmp_path / "work"
    rng = np.random.default_rng(5)
    s = create_store(work / "mem.msa", tiny_identity(hidden_size=2))
    s, *_ = add_docs(s, [3, 5], rng, "a")
    s, _, _, enc = add_docs(s, [4, 2], rng, "b")
    s = s.commit(delete_ids=[int(enc.doc_ids[0])])
    (work / "sibling" / "src").mkdir(parents=True)
    (work / "sibling" / "src" / "main.py").write_text("print('precious')\n")
    (work / "sibling" / "README").write_text("sibling project\n")
    (work / "note.txt").write_text("a note next to the store\n")
    out = tmp_path / "outside"
    (out / "deep" / "er").mkdir(parents=True)
    (out / "data.bin").write_bytes(bytes(range(256)))
    (out / "deep" / "er" / "x.txt").write_text("x")
    (out / "00000009-0123456789ab.json").write_text("{}")  # named like a store file
    (out / "zzz.0123456789ab").mkdir()                      # named like a staging dir
    age(work / "sibling", work / "note.txt", out)
    return s, work, out


def _outside(work: Path, out: Path) -> dict[str, object]:
    return {"sibling": tree(work / "sibling"), "note": (work / "note.txt").read_bytes(), "out": tree(out)}


def _link_folder(root: Path, name: str, target: str, out: Path) -> None:
    """Replace store folder ``name`` with a symlink: ``..`` (the folder holding the store) or ``outside``
    (the folder's own contents moved there first, as one would to put them on another disk)."""
    if target == "..":
        if (root / name).exists():
            shutil.rmtree(root / name)
        os.symlink("..", root / name)
    else:
        if (root / name).exists():
            for p in (root / name).iterdir():
                shutil.move(str(p), out / p.name)
            (root / name).rmdir()
        os.symlink(out, root / name)


@pytest.mark.parametrize("target", ["..", "outside"])
@pytest.mark.parametrize("folder", ["staging", "deletions", "shards", "router_keys"])
def test_gc_refuses_a_linked_store_folder_and_touches_nothing(world, folder, target):
    s, work, out = world
    root = s.root
    _link_folder(root, folder, target, out)
    age(out)
    before = _outside(work, out)
    for dry_run in (True, False):
        with pytest.raises(E.StoreLayoutError, match=f"{folder}.*symbolic link") as ei:
            open_store(root, 0).gc(dry_run=dry_run, grace_s=0)
        assert str(root / folder) in str(ei.value) and "gc" in str(ei.value)
    with pytest.raises(E.StoreLayoutError):
        open_store(root, 0).gc(dry_run=False, grace_s=0, keep_last=1)
    assert _outside(work, out) == before
    assert (root / "versions" / "00000000.json").exists()  # nothing of the store went either


@pytest.mark.parametrize("folder", ["staging", "deletions", "shards", "router_keys", "versions", "tags"])
def test_verify_fails_on_a_linked_store_folder(world, folder):
    s, work, out = world
    root = s.root
    _link_folder(root, folder, "outside", out)
    before = _outside(work, out)
    rep = open_store(root, 0).verify() if folder != "versions" else None
    if rep is None:  # manifests read through the link: the snapshot opens, verify still refuses the layout
        rep = s.verify()
    assert not rep["ok"]
    assert any(p["file"] == folder and "symbolic link" in p["problem"] for p in rep["problems"]), rep["problems"]
    assert _outside(work, out) == before


def test_verify_fails_when_shards_point_outside_and_reads_nothing_through_them(world):
    s, work, out = world
    _link_folder(s.root, "shards", "outside", out)  # the store still "reads" through the link
    rep = open_store(s.root).verify()
    assert not rep["ok"]
    files = [p["file"] for p in rep["problems"]]
    assert "shards" in files
    assert all("symbolic link" in p["problem"] for p in rep["problems"])  # no file read through it


def test_verify_fails_on_a_linked_shard_entry(world):
    s, work, out = world
    root = s.root
    shutil.move(str(root / "shards" / "a"), out / "a")
    os.symlink(out / "a", root / "shards" / "a")
    rep = open_store(root).verify()
    assert not rep["ok"]
    assert any(p["file"].startswith("shards/a") and "symbolic link" in p["problem"] for p in rep["problems"])


def test_gc_leaves_links_and_foreign_entries_alone_and_reports_them(world):
    s, work, out = world
    root = s.root
    rng = np.random.default_rng(9)
    _, rec, _, _ = add_docs(s, [3], rng, "orphan", commit=False)  # a real orphan shard: gc may remove it
    os.symlink(out, root / "shards" / "evil")                     # a link with a shard's name
    os.symlink(work / "sibling", root / "staging" / "x.0123456789ab")  # a link with a staging dir's name
    (root / "staging" / "notes").mkdir()                           # foreign names
    (root / "staging" / "notes" / "n.txt").write_text("mine")
    (root / "deletions").mkdir(exist_ok=True)
    (root / "deletions" / "readme.txt").write_text("mine")
    os.symlink(out / "00000009-0123456789ab.json", root / "deletions" / "00000009-0123456789ab.json")
    (root / "router_keys").mkdir()
    (root / "router_keys" / "junk").mkdir()
    (root / "my.tmp").write_text("a user's file that happens to end in .tmp")
    (root / "shards" / "nogroup").mkdir()                          # a shard name but not a shard folder
    (root / "shards" / "nogroup" / "f").write_text("mine")
    shutil.copytree(root / "shards" / "orphan", root / "shards" / "linky")  # a shard holding a link
    os.symlink(out / "deep", root / "shards" / "linky" / "kv2")
    age(root / "shards", root / "staging", root / "deletions", root / "router_keys", root / "my.tmp")
    before = _outside(work, out)
    foreign = {p: tree(root / p) if (root / p).is_dir() and not (root / p).is_symlink() else None
               for p in ("staging/notes", "shards/nogroup", "shards/linky", "router_keys/junk")}

    preview = open_store(root).gc(dry_run=True, grace_s=0)
    rep = open_store(root).gc(dry_run=False, grace_s=0)
    assert [o["path"] for o in rep["orphans"]] == ["shards/orphan"] == [o["path"] for o in preview["orphans"]]
    assert rep["bytes"] > 0 and rep["failed"] == []
    skipped = {o["path"] for o in rep["skipped"]}
    assert skipped == {"shards/evil", "staging/x.0123456789ab", "staging/notes", "deletions/readme.txt",
                       "deletions/00000009-0123456789ab.json", "router_keys/junk", "my.tmp", "shards/nogroup",
                       "shards/linky"}
    assert all(o["reason"] for o in rep["skipped"])
    assert not (root / "shards" / "orphan").exists()
    assert _outside(work, out) == before
    for p, t in foreign.items():
        assert tree(root / p) == t
    for p in ("shards/evil", "staging/x.0123456789ab", "deletions/00000009-0123456789ab.json"):
        assert (root / p).is_symlink()
    assert (root / "deletions" / "readme.txt").read_text() == "mine" and (root / "my.tmp").exists()
    assert open_store(root).verify()["ok"]


def test_gc_keep_last_never_deletes_a_linked_manifest(world):
    s, work, out = world
    root = s.root
    v1 = root / "versions" / "00000001.json"
    shutil.move(str(v1), out / "v1.json")
    os.symlink(out / "v1.json", v1)
    before = _outside(work, out)
    rep = open_store(root).gc(dry_run=False, keep_last=1, grace_s=0)
    assert "versions/00000001.json" in {o["path"] for o in rep["skipped"]}
    assert v1.is_symlink() and _outside(work, out) == before


@pytest.mark.parametrize("folder", ["shards", "staging"])
def test_compact_restore_and_writers_refuse_linked_folders(world, folder):
    s, work, out = world
    root = s.root
    _link_folder(root, folder, "outside", out)
    before = _outside(work, out)
    with pytest.raises(E.StoreLayoutError, match=folder):
        open_store(root).compact()
    with pytest.raises(E.StoreLayoutError, match=folder):
        open_store(root).restore(1)
    with pytest.raises(E.StoreLayoutError, match=folder):
        open_store(root).commit(message="x")
    rng = np.random.default_rng(1)
    with pytest.raises(E.StoreLayoutError, match=folder):
        ids = open_store(root).reserve_ids(1)
    p, enc = random_docs(s.identity, np.array([99]), [3], rng)
    with pytest.raises(E.StoreLayoutError, match=folder):
        write_shard(root, "new", p, enc)
    assert _outside(work, out) == before
    assert [v["version"] for v in s.versions()] == [0, 1, 2, 3]


def test_compact_and_restore_refuse_a_linked_shard_entry(world):
    s, work, out = world
    root = s.root
    shutil.move(str(root / "shards" / "b"), out / "b")
    os.symlink(out / "b", root / "shards" / "b")
    before = _outside(work, out)
    with pytest.raises(E.StoreLayoutError, match="shards/b"):
        open_store(root).compact()
    with pytest.raises(E.StoreLayoutError, match="shards/b"):
        open_store(root).restore(2)
    assert _outside(work, out) == before and open_store(root).version == 3


def test_a_linked_lock_file_is_refused_before_it_is_opened(world):
    s, work, out = world
    root = s.root
    (root / "_writer.lock").unlink(missing_ok=True)
    os.symlink(work / "note.txt", root / "_writer.lock")
    before = _outside(work, out)
    with pytest.raises(E.StoreLayoutError, match="_writer.lock"):
        open_store(root).commit(message="x")
    assert _outside(work, out) == before  # filelock would have truncated note.txt


def test_the_store_root_itself_may_be_a_link(world, tmp_path):
    s, work, out = world
    alias = tmp_path / "alias.msa"
    os.symlink(s.root, alias)
    st = open_store(alias)
    assert st.verify()["ok"]
    assert st.gc(dry_run=False, grace_s=0)["failed"] == []
    assert st.compact().version == 4


def test_a_linked_tag_file_is_refused(world):
    s, work, out = world
    (out / "t.json").write_text('{"version": 1}')
    os.symlink(out / "t.json", s.root / "tags" / "t.json")
    with pytest.raises(E.StoreLayoutError, match="t.json"):
        s.tags()
    with pytest.raises(E.StoreLayoutError):
        open_store(s.root, "t")
