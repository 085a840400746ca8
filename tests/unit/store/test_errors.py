"""Every named store error: raised on the bad input, a subclass of the matching builtin, with a
message naming the offending thing. Run: .venv/bin/python -m pytest tests/unit/store/test_errors.py -q
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from msa_memory import errors as E
from msa_memory.store import create_store, open_store, write_shard
from msa_memory.testing.store_kit import add_docs, random_docs, tiny_identity


def test_store_not_found(tmp_path):
    with pytest.raises(E.StoreNotFoundError, match="No msa-memory store") as ei:
        open_store(tmp_path / "nope")
    assert isinstance(ei.value, FileNotFoundError)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError):
        open_store(tmp_path / "empty")
    with pytest.raises(E.StoreNotFoundError):
        write_shard(tmp_path / "empty", "s", [], None)  # type: ignore[arg-type]


def test_store_exists(store, tmp_path, rng):
    with pytest.raises(E.StoreExistsError) as ei:
        create_store(store.root, tiny_identity())
    assert isinstance(ei.value, FileExistsError)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    with pytest.raises(E.StoreExistsError, match="not an empty directory"):
        create_store(tmp_path / "other", tiny_identity())
    add_docs(store, [3], rng, "dup", commit=False)
    ids = store.reserve_ids(1)
    p, enc = random_docs(store.identity, ids, [3], rng)
    with pytest.raises(E.StoreExistsError, match="'dup' already exists"):
        write_shard(store.root, "dup", p, enc)


def test_create_exist_ok_checks_identity(store):
    again = create_store(store.root, store.identity, exist_ok=True)
    assert again.version == store.version
    other = dataclasses.replace(store.identity, model_fingerprint="x" * 64)
    with pytest.raises(E.IdentityMismatchError, match="model_fingerprint") as ei:
        create_store(store.root, other, exist_ok=True)
    assert isinstance(ei.value, ValueError)
    with pytest.raises(E.IdentityMismatchError, match="head_dim"):
        store.check_identity(dataclasses.replace(store.identity, head_dim=16))


def test_newer_format_refused(store):
    ident = store.root / "msa_store.json"
    d = json.loads(ident.read_text())
    d["format_version"] = 99
    ident.write_text(json.dumps(d))
    with pytest.raises(E.StoreFormatError, match="format_version 99") as ei:
        open_store(store.root)
    assert isinstance(ei.value, ValueError) and "Upgrade" in str(ei.value)


def test_newer_manifest_format_refused(store):
    p = store.root / "versions" / "00000000.json"
    d = json.loads(p.read_text())
    d["format_version"] = 7
    p.write_text(json.dumps(d))
    with pytest.raises(E.StoreFormatError):
        open_store(store.root, 0)
    d["format_version"] = 1
    p.write_text(json.dumps(d))


def test_corrupt_manifest(store, rng):
    s1, *_ = add_docs(store, [3], rng, "a")
    p = store.root / "versions" / "00000001.json"
    good = p.read_bytes()
    p.write_bytes(good[: len(good) // 2])
    with pytest.raises(E.ManifestCorruptError, match="not valid JSON") as ei:
        open_store(store.root, 1)
    assert isinstance(ei.value, ValueError)
    d = json.loads(good)
    d["shards"][0]["n_docs"] = "three"
    p.write_text(json.dumps(d))
    with pytest.raises(E.ManifestCorruptError, match="n_docs"):
        open_store(store.root, 1)
    d["shards"][0]["n_docs"] = 0  # type-correct but violates the schema (minimum 1)
    p.write_text(json.dumps(d))
    with pytest.raises(E.ManifestCorruptError, match="JSON Schema"):
        open_store(store.root, 1)
    p.write_bytes(good)
    (store.root / "msa_store.json").write_text("{not json")
    with pytest.raises(E.ManifestCorruptError, match="identity record"):
        open_store(store.root)


def test_shard_missing(store, rng):
    s1, _, _, enc = add_docs(store, [3, 9], rng, "a")
    s1.load_kv(enc.doc_ids)  # caches nothing that avoids disk
    shutil.rmtree(store.root / "shards" / "a" / "kv")
    with pytest.raises(E.ShardMissingError, match="missing") as ei:
        open_store(store.root).load_kv(enc.doc_ids)
    assert isinstance(ei.value, FileNotFoundError)
    shutil.rmtree(store.root / "shards" / "a")
    with pytest.raises(E.ShardMissingError, match="'a'"):
        open_store(store.root).router_keys(0)
    rep = open_store(store.root).verify()
    assert not rep["ok"] and rep["problems"][0]["shard_id"] == "a"


def test_version_not_found(store):
    with pytest.raises(E.VersionNotFoundError, match="Version 5 not found") as ei:
        open_store(store.root, 5)
    assert isinstance(ei.value, KeyError)
    with pytest.raises(E.VersionNotFoundError, match="Tag 'nope'"):
        open_store(store.root, "nope")
    with pytest.raises(E.VersionNotFoundError):
        store.tag("t", 9)


def test_version_conflict(store, rng):
    stale = open_store(store.root)
    add_docs(store, [3], rng, "a")
    ids = stale.reserve_ids(1)
    p, enc = random_docs(stale.identity, ids, [3], rng)
    rec = write_shard(stale.root, "b", p, enc)
    with pytest.raises(E.VersionConflictError, match="at version 1") as ei:
        stale.commit(add=[rec])
    assert isinstance(ei.value, RuntimeError)
    assert open_store(store.root).version == 1
    assert open_store(store.root).commit(add=[rec]).version == 2  # the retry from a fresh snapshot works
    with pytest.raises(E.VersionConflictError):
        open_store(store.root).commit(delete_ids=[0], read_version=1)


def test_lock_timeout(store):
    code = (f"import filelock,time,sys; l=filelock.FileLock({str(store.root / '_writer.lock')!r}); l.acquire(); "
            "print('held', flush=True); time.sleep(30)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b"held"
        with pytest.raises(E.LockTimeoutError, match="writer lock") as ei:
            store.reserve_ids(1, lock_timeout=0.2)
        assert isinstance(ei.value, TimeoutError)
        with pytest.raises(E.LockTimeoutError):
            store.commit(message="x", lock_timeout=0.1)
    finally:
        proc.kill()
        proc.wait()
    assert store.reserve_ids(1).size == 1  # lock released with the process


def _enc(store, rng, n_tokens=(3, 6)):
    ids = store.reserve_ids(len(n_tokens))
    return random_docs(store.identity, ids, list(n_tokens), rng)


@pytest.mark.parametrize("field,bad,msg", [
    ("kv", lambda a: a[:, :1], "kv has shape"),
    ("k_router", lambda a: a.astype(np.float32), "k_router has dtype"),
    ("x_router", lambda a: None, "x_router is None"),
    ("n_chunks", lambda a: a + 1, "n_chunks="),
    ("n_tokens", lambda a: a * 0, "at least one token"),
    ("dtype", lambda a: "float32", "EncodedChunks.dtype"),
])
def test_schema_mismatch(store, rng, field, bad, msg):
    p, enc = _enc(store, rng)
    enc = dataclasses.replace(enc, **{field: bad(getattr(enc, field))})
    with pytest.raises(E.SchemaMismatchError, match=msg) as ei:
        write_shard(store.root, "s", p, enc)
    assert isinstance(ei.value, ValueError)
    assert not (store.root / "shards" / "s").exists()


def test_schema_mismatch_passage_count(store, rng):
    p, enc = _enc(store, rng)
    with pytest.raises(E.SchemaMismatchError, match="1 passages for 2"):
        write_shard(store.root, "s", p[:1], enc)


def test_identity_mismatch_on_commit(tmp_path, store, rng):
    other = create_store(tmp_path / "other", dataclasses.replace(store.identity, router_id="zz"))
    other.reserve_ids(5)
    store.reserve_ids(5)
    p, enc = random_docs(other.identity, np.arange(2), [3, 3], rng)
    rec = write_shard(other.root, "x", p, enc)
    shutil.copytree(other.root / "shards" / "x", store.root / "shards" / "x")
    with pytest.raises(E.IdentityMismatchError, match="another store identity"):
        store.commit(add=[rec])


def test_document_not_found(store, rng):
    s1, _, _, enc = add_docs(store, [3, 3], rng, "a")
    with pytest.raises(E.DocumentNotFoundError, match=r"\[999\]") as ei:
        s1.load_kv([999])
    assert isinstance(ei.value, KeyError) and "not live in version 1" in str(ei.value)
    with pytest.raises(E.DocumentNotFoundError):
        s1.commit(delete_ids=[999])
    with pytest.raises(E.DocumentNotFoundError, match="nowhere.txt"):
        s1.commit(delete_paths=["nowhere.txt"])
    s2 = s1.commit(delete_ids=[int(enc.doc_ids[0])])
    with pytest.raises(E.DocumentNotFoundError):
        s2.texts([int(enc.doc_ids[0])])
    with pytest.raises(E.DocumentNotFoundError):
        s2.commit(delete_ids=[int(enc.doc_ids[0])])  # already deleted
    assert s1.texts([int(enc.doc_ids[0])])  # still live in the older snapshot


def test_duplicate_document(store, rng):
    p, enc = _enc(store, rng)
    enc = dataclasses.replace(enc, doc_ids=np.array([enc.doc_ids[0]] * 2))
    with pytest.raises(E.DuplicateDocumentError, match="more than once") as ei:
        write_shard(store.root, "s", p, enc)
    assert isinstance(ei.value, ValueError)
    s1, rec, p1, enc1 = add_docs(store, [3], rng, "a")
    with pytest.raises(E.DuplicateDocumentError, match="already used"):
        write_shard(store.root, "again", p1, enc1)
    s2 = s1.commit(delete_ids=enc1.doc_ids.tolist())
    with pytest.raises(E.DuplicateDocumentError, match="never reused"):
        write_shard(store.root, "again", p1, enc1)
    # two uncommitted shards with the same ids: the second commit is refused
    ids = s2.reserve_ids(1)
    pa, ea = random_docs(s2.identity, ids, [3], rng)
    r1, r2 = write_shard(store.root, "x1", pa, ea), write_shard(store.root, "x2", pa, ea)
    with pytest.raises(E.DuplicateDocumentError):
        s2.commit(add=[r1, r2])
    s3 = s2.commit(add=[r1])
    with pytest.raises(E.DuplicateDocumentError):
        s3.commit(add=[r2])
    with pytest.raises(E.DuplicateDocumentError, match="already part of version"):
        s3.commit(add=[r1])


def test_ids_not_reserved(store, rng):
    store.reserve_ids(3)
    p, enc = random_docs(store.identity, np.array([2, 3]), [3, 3], rng)
    with pytest.raises(E.IdNotReservedError, match=r"\[3\] were never reserved") as ei:
        write_shard(store.root, "s", p, enc)
    assert isinstance(ei.value, ValueError)


def test_reserve_ids_never_repeat(store, rng):
    a = store.reserve_ids(3)
    b = open_store(store.root).reserve_ids(2)
    assert a.tolist() == [0, 1, 2] and b.tolist() == [3, 4]
    (store.root / "_ids.json").unlink()  # even if the counter is lost, committed ids are never handed out
    s1, _, _, enc = add_docs(store, [3], rng, "a")
    assert enc.doc_ids[0] == 0 and store.reserve_ids(1)[0] == 1
    with pytest.raises(E.ConfigError):
        store.reserve_ids(-1)


@pytest.mark.parametrize("name", ["", "../x", "a/b", ".hidden", "x" * 200, "x.tmp"])
def test_bad_shard_ids(store, rng, name):
    p, enc = _enc(store, rng)
    with pytest.raises(E.ConfigError, match="Invalid shard id"):
        write_shard(store.root, name, p, enc)


def test_bad_tags_and_layers(store):
    with pytest.raises(E.ConfigError, match="all digits"):
        store.tag("123")
    with pytest.raises(E.ConfigError):
        store.tag("a b")
    store.tag("v0")
    with pytest.raises(E.StoreExistsError, match="already exists"):
        store.tag("v0")
    store.tag("v0", force=True)
    with pytest.raises(E.ConfigError, match="out of range"):
        store.router_keys(2)
    with pytest.raises(E.ConfigError, match="Unknown document columns"):
        store.documents(["nope"])
    store.delete_tag("v0")
    with pytest.raises(E.VersionNotFoundError):
        store.delete_tag("v0")


def test_commit_extra_must_be_json(store):
    s = store.commit(message="x", extra={"job": {"workers": 2}})
    assert open_store(store.root).manifest["extra"] == {"job": {"workers": 2}}
    with pytest.raises(E.ConfigError, match="JSON-serialisable"):
        s.commit(extra={"bad": object()})


@pytest.mark.parametrize("field,bad,msg", [
    ("k_router_s", lambda a: None, "n_chunks_s / k_router_s are None"),
    ("n_chunks_s", lambda a: a + 1, r"shifted-grid chunk count is (2|4), not the (1|3) its 3 tokens give"),
    ("n_chunks_s", lambda a: a[:1], "n_chunks_s must be an integer array of shape"),
    ("k_router_s", lambda a: a[:, :-1], "k_router_s has shape"),
    ("x_router_s", lambda a: None, "x_router_s .the shifted grid's. is None"),
    ("x_router_s", lambda a: a.astype(np.float32), "x_router_s has dtype"),
])
def test_schema_mismatch_of_the_shifted_grid(store, rng, field, bad, msg):
    p, enc = _enc(store, rng)
    if not store.identity.shifted_layers:          # a store without the grid refuses one
        enc = dataclasses.replace(enc, k_router_s=enc.k_router[:1])
        msg = "the store keeps none"
    else:
        enc = dataclasses.replace(enc, **{field: bad(getattr(enc, field))})
    with pytest.raises(E.SchemaMismatchError, match=msg):
        write_shard(store.root, "s", p, enc)
    assert not (store.root / "shards" / "s").exists()


def test_layout_write_and_space_errors_catch_as_builtins():
    """The errors of links, read-only stores and full disks are StoreErrors a notebook user can also catch as the
    builtin they would expect, and their message carries the hint."""
    cases = [(E.StoreLayoutError, ValueError), (E.StoreNotWritableError, PermissionError), (E.DiskFullError, OSError)]
    for cls, builtin in cases:
        err = cls("what failed.", hint="What to do.")
        assert isinstance(err, E.StoreError) and isinstance(err, builtin)
        assert str(err) == "what failed. What to do."
