"""Per-version routers (store/rekey.py): re-keying a store into a new version, no model needed.

keys_fn is a fixed random linear map of the kept router inputs, so the expected keys of every
chunk are computed independently here. Oracles: the new version's keys equal the map of its
inputs; older versions keep their keys and router; commit / delete / compact / restore / gc /
verify keep each version's keys right; bad input publishes nothing and leaves no files.
"""

from __future__ import annotations

import numpy as np
import pytest

from msa_memory.errors import (
    ConfigError,
    IdentityMismatchError,
    SchemaMismatchError,
    ShardCorruptError,
    ShardMissingError,
    VersionConflictError,
    VersionNotFoundError,
)
from msa_memory.schemas.records import from_float32, to_float32
from msa_memory.store import create_store, open_store
from msa_memory.testing.faults import flip_byte
from msa_memory.testing.store_kit import add_docs, tiny_identity


def linear_keys(seed: int, identity):
    """keys_fn: (L, C, E) inputs -> (L, C, H, D) keys = x @ W_l, per layer, in storage dtype."""
    L, H, D, E = identity.n_layers, identity.n_kv_heads, identity.head_dim, identity.hidden_size
    W = np.random.default_rng(seed).standard_normal((L, E, H * D)).astype(np.float32)

    def fn(shard_id, x):
        xf = to_float32(x, identity.dtype)                                   # (L, C, E)
        k = np.einsum("lce,lef->lcf", xf, W).reshape(L, x.shape[1], H, D)
        return from_float32(k, identity.dtype)
    return fn


def expected_keys(store, fn, layer):
    """Independent oracle: apply fn to the live router inputs of one layer."""
    x, docs = store.router_inputs(layer)
    L = store.identity.n_layers
    full = np.zeros((L,) + x.shape, dtype=x.dtype)
    full[layer] = x
    return fn("any", full)[layer], docs


def router(rid, identity, **kw):
    return {"router_id": rid, "router_layers": list(identity.router_layers), **kw}


def all_keys(store):
    return [store.router_keys(i)[0].tobytes() for i in range(store.identity.n_layers)]


@pytest.fixture
def store(tmp_path):
    """The aligned grid alone (the shifted grid's re-keying: test_rekey_shifted_grid)."""
    return create_store(tmp_path / "mem.msa", tiny_identity(hidden_size=4))


@pytest.fixture
def two_shards(store, rng):
    s, *_ = add_docs(store, [5, 9, 2], rng, "a")
    s, *_ = add_docs(s, [7, 4], rng, "b")
    return s


def test_rekey_new_version_keeps_old_one(two_shards):
    s1 = two_shards
    old_keys = all_keys(s1)
    fn = linear_keys(1, s1.identity)
    s2 = s1.rekey(router("newrouter0000001", s1.identity, adapter_path="router/"), fn, message="re-key")
    assert s2.version == s1.version + 1 and s2.manifest["operation"] == "reindex"
    assert s2.identity.router_id == "newrouter0000001" and s2.router["adapter_path"] == "router/"
    assert s2.stored_identity == s1.stored_identity == s1.identity  # msa_store.json untouched
    assert s2.manifest["changes"]["previous_router_id"] == s1.identity.router_id
    for layer in range(s2.identity.n_layers):
        k, docs = s2.router_keys(layer)
        want, wdocs = expected_keys(s2, fn, layer)
        assert np.array_equal(docs, wdocs) and k.tobytes() == want.tobytes()
    # the old version still reads its own keys and router; content and rows are unchanged
    v1 = open_store(s1.root, version=s1.version)
    assert all_keys(v1) == old_keys and v1.identity.router_id == s1.identity.router_id
    ids = s2.documents(["doc_id"]).column(0).to_pylist()
    assert [a.tobytes() for a in s2.load_kv(ids)] == [a.tobytes() for a in v1.load_kv(ids)]
    assert [v["router_id"] for v in s2.versions()][-2:] == [s1.identity.router_id, "newrouter0000001"]
    assert s2.stats()["disk_bytes"] > v1.stats()["disk_bytes"]
    assert s2.verify()["ok"]
    # the same router again: nothing to do, no version
    assert s2.rekey(router("newrouter0000001", s2.identity), fn).version == s2.version


def test_identity_check_names_matching_versions(two_shards):
    s1 = two_shards
    s2 = s1.rekey(router("newrouter0000001", s1.identity), linear_keys(1, s1.identity))
    s2.check_identity(s2.identity)
    s1.check_identity(s1.identity)
    with pytest.raises(IdentityMismatchError, match=rf"versions \[0, 1, {s1.version}\]"):
        s2.check_identity(s1.identity)
    with pytest.raises(IdentityMismatchError, match=rf"versions \[{s2.version}\].*version={s2.version}"):
        open_store(s1.root, version=s1.version).check_identity(s2.identity)
    import dataclasses

    with pytest.raises(IdentityMismatchError, match="no version of this store uses it"):
        s2.check_identity(dataclasses.replace(s2.identity, router_id="unknown"))


def test_commit_delete_compact_restore_follow_the_version_router(two_shards, rng):
    s1 = two_shards
    fn = linear_keys(2, s1.identity)
    s2 = s1.rekey(router("r2", s1.identity), fn)
    # an append after the reindex brings its own keys (made with the version's router)
    s3, rec, _, enc = add_docs(s2, [6, 3], rng, "c")
    assert s3.router["router_id"] == "r2" and "router_keys" not in s3.manifest["shards"][-1]
    assert sum("router_keys" in e for e in s3.manifest["shards"]) == 2
    k3, d3 = s3.router_keys(0)
    assert k3[np.isin(d3, enc.doc_ids)].tobytes() == enc.k_router[0].tobytes()
    # delete one re-keyed document: the re-keyed keys are filtered like any others
    victim = int(s2.documents(["doc_id"]).column(0).to_pylist()[1])
    s4 = s3.commit(delete_ids=[victim])
    k3_1, d3_1 = s3.router_keys(1)
    k4, d4 = s4.router_keys(1)
    assert victim in d3_1.tolist() and victim not in d4.tolist()
    assert np.array_equal(d4, d3_1[d3_1 != victim]) and k4.tobytes() == k3_1[d3_1 != victim].tobytes()
    k_before = [s4.router_keys(i) for i in range(s4.identity.n_layers)]
    s5 = s4.compact(merge_below_chunks=1000)
    assert s5.router["router_id"] == "r2" and not any("router_keys" in e for e in s5.manifest["shards"])
    for i, (k, d) in enumerate(k_before):
        k5, d5 = s5.router_keys(i)
        order = np.argsort(d5, kind="stable")
        ref = np.argsort(d, kind="stable")
        assert np.array_equal(d5[order], d[ref]) and k5[order].tobytes() == k[ref].tobytes()
    # restoring the pre-reindex version brings back its router and keys
    s6 = s5.restore(s1.version)
    assert s6.router["router_id"] == s1.identity.router_id and all_keys(s6) == all_keys(s1)
    s7 = s6.restore(s2.version)
    assert s7.router["router_id"] == "r2" and all_keys(s7) == all_keys(s2)


def test_gc_keeps_keys_a_kept_version_needs(two_shards):
    s1 = two_shards
    s2 = s1.rekey(router("r2", s1.identity), linear_keys(3, s1.identity))
    rk = sorted((s2.root / "router_keys").iterdir())
    assert len(rk) == 2
    s2.tag("orig", s1.version)  # keeps the pre-reindex manifest through gc(keep_last=1)
    rep = s2.gc(dry_run=False, keep_last=1, grace_s=0)
    assert not any(o["kind"] == "router_keys" for o in rep["orphans"]) and all(p.exists() for p in rk)
    assert all_keys(open_store(s2.root)) == all_keys(s2)
    # a restore of the pre-reindex version: now no kept version names the keys; all versions kept: still kept
    s3 = s2.restore("orig")
    s3.delete_tag("orig")
    assert not any(o["kind"] == "router_keys" for o in s3.gc(dry_run=True, grace_s=0)["orphans"])
    rep = s3.gc(dry_run=False, keep_last=1, grace_s=0)
    assert sorted(o["path"] for o in rep["orphans"] if o["kind"] == "router_keys") == \
        sorted(f"router_keys/{p.name}" for p in rk)
    assert not any(p.exists() for p in rk) and open_store(s3.root).verify()["ok"]
    assert all_keys(open_store(s3.root)) == all_keys(s1)


def test_restore_of_version_whose_keys_gc_removed(two_shards):
    s1 = two_shards
    s2 = s1.rekey(router("r2", s1.identity), linear_keys(3, s1.identity))
    s2.tag("rekeyed")
    s3 = s2.restore(s1.version)
    s3.delete_tag("rekeyed")
    s3.gc(dry_run=False, keep_last=1, grace_s=0)
    with pytest.raises(VersionNotFoundError):  # the manifest of version 2 went with gc (keep_last=1)
        s3.restore(s2.version)
    # with all manifests kept but the keys directory lost, restore says what is missing
    s4 = s3.rekey(router("r4", s3.identity), linear_keys(4, s3.identity))
    import shutil

    shutil.rmtree(s4.root / s4.manifest["shards"][0]["router_keys"]["path"])
    with pytest.raises(ShardMissingError, match="router keys"):
        s4.restore(s4.version)
    rep = open_store(s4.root).verify()
    assert not rep["ok"] and any("router_keys/" in p["file"] and p["problem"] == "missing" for p in rep["problems"])


def test_damaged_router_keys_raise_and_verify_reports(two_shards):
    s2 = two_shards.rekey(router("r2", two_shards.identity), linear_keys(5, two_shards.identity))
    e = s2.manifest["shards"][0]
    path = s2.root / e["router_keys"]["path"] / "k_router" / "c.0.0.0.0"
    flip_byte(path, 10)
    rep = open_store(s2.root).verify()
    assert not rep["ok"] and rep["problems"][0]["file"].startswith("router_keys/")
    assert rep["problems"][0]["shard_id"] == e["shard_id"] and rep["problems"][0]["doc_ids"]
    with pytest.raises(ShardCorruptError):
        open_store(s2.root).router_keys(0)


def test_bad_input_changes_nothing(two_shards, tmp_path, rng):
    s1 = two_shards
    files_before = sorted(p.relative_to(s1.root).as_posix() for p in s1.root.rglob("*"))

    def unchanged():
        assert open_store(s1.root).version == s1.version
        assert not (s1.root / "router_keys").exists() or not any((s1.root / "router_keys").iterdir())
        assert not any(p.name.startswith("rk-") for p in (s1.root / "staging").iterdir())

    with pytest.raises(IdentityMismatchError, match="layers"):
        s1.rekey({"router_id": "x", "router_layers": [1]}, linear_keys(1, s1.identity))
    unchanged()
    with pytest.raises(ConfigError, match="router_id"):
        s1.rekey({"router_layers": [1, 3]}, linear_keys(1, s1.identity))
    unchanged()

    def wrong_shape(sid, x):
        return linear_keys(1, s1.identity)(sid, x)[:, :-1]
    with pytest.raises(SchemaMismatchError, match="expected"):
        s1.rekey(router("x", s1.identity), wrong_shape)
    unchanged()
    # a stale snapshot: another writer published meanwhile; nothing published, nothing left
    s2, *_ = add_docs(s1, [3], rng, "late")
    with pytest.raises(VersionConflictError):
        s1.rekey(router("x", s1.identity), linear_keys(1, s1.identity))
    assert open_store(s1.root).version == s2.version
    assert not (s1.root / "router_keys").exists() or not any((s1.root / "router_keys").iterdir())
    # a store without router inputs
    plain = create_store(tmp_path / "plain.msa", tiny_identity())
    plain, *_ = add_docs(plain, [4], rng, "p")
    with pytest.raises(ConfigError, match="keeps no router inputs"):
        plain.rekey(router("x", plain.identity), linear_keys(1, plain.identity))
    assert open_store(plain.root).version == plain.version and not (plain.root / "router_keys").exists()
    assert files_before  # the fixture store had files to compare


def test_rekey_shifted_grid(tmp_path, rng):
    """A store with the shifted grid re-keys both grids: the new shifted keys are shifted_keys_fn of the
    kept shifted inputs; a router with other shifted layers, or no shifted_keys_fn, publishes nothing."""
    import dataclasses

    ident = tiny_identity(hidden_size=4, shifted_layers=(3,))
    s1 = create_store(tmp_path / "s.msa", ident)
    s1, *_ = add_docs(s1, [5, 9, 2], rng, "a")
    s1, *_ = add_docs(s1, [7, 4], rng, "b")
    old_s = s1.router_keys_shifted(0)[0].tobytes()
    fn = linear_keys(1, ident)
    one = dataclasses.replace(ident, router_layers=(3,), shifted_layers=(3,))
    fn_s = linear_keys(2, one)                      # one layer: (1, Cs, E) -> (1, Cs, H, D)
    with pytest.raises(IdentityMismatchError, match="shifted layers"):
        s1.rekey(router("r2", ident), fn, shifted_keys_fn=fn_s)
    with pytest.raises(ConfigError, match="shifted_keys_fn"):
        s1.rekey(router("r2", ident, shifted_layers=[3]), fn)
    with pytest.raises(IdentityMismatchError, match="windows of 2 tokens, store .* windows of 4 tokens"):
        s1.rekey(router("r2", ident, shifted_layers=[3], shifted_window=2), fn, shifted_keys_fn=fn_s)
    assert open_store(s1.root).version == s1.version
    s2 = s1.rekey(router("r2", ident, shifted_layers=[3]), fn, shifted_keys_fn=fn_s)
    assert s2.router["shifted_layers"] == [3] and s2.version == s1.version + 1
    x, docs = s2.router_inputs_shifted(0)
    k, kdocs = s2.router_keys_shifted(0)
    assert np.array_equal(docs, kdocs) and k.tobytes() == fn_s("any", x[None])[0].tobytes()
    for layer in range(2):
        want, _ = expected_keys(s2, fn, layer)
        assert s2.router_keys(layer)[0].tobytes() == want.tobytes()
    assert open_store(s1.root, version=s1.version).router_keys_shifted(0)[0].tobytes() == old_s
    assert s2.verify()["ok"]
    # compaction after the reindex writes the version's shifted keys into the new shard
    s3 = s2.commit(delete_ids=[int(docs[0])]).compact()
    k3, docs3 = s3.router_keys_shifted(0)
    by_doc = lambda k_, d_: {int(i): k_[d_ == i].tobytes() for i in np.unique(d_)}  # noqa: E731
    assert by_doc(k3, docs3) == {i: b for i, b in by_doc(k, docs).items() if i != int(docs[0])}
    # damage to the reindexed shifted keys is found
    e = s2.manifest["shards"][0]
    flip_byte(s2.root / e["router_keys"]["path"] / "k_router_s" / "c.0.0.0.0", 5)
    assert not open_store(s2.root, version=s2.version).verify()["ok"]
