"""Round trips of everything the store keeps, bit-exact; the fast read path vs zarr-python.

Run: .venv/bin/python -m pytest tests/unit/store/test_roundtrip.py -q
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from msa_memory.errors import DocumentNotFoundError
from msa_memory.schemas.arrow import DOCUMENT_COLUMNS
from msa_memory.schemas.records import ShardRecord, to_float32
from msa_memory.store import create_store, open_store, write_shard
from msa_memory.testing.store_kit import add_docs, random_docs, tiny_identity


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_roundtrip_every_array_bit_exact(tmp_path, rng, dtype):
    store = create_store(tmp_path / "s", tiny_identity(hidden_size=5, dtype=dtype))
    store, rec, passages, enc = add_docs(store, [1, 4, 5, 17, 3], rng, "s0")
    offs = enc.offsets
    order = [3, 0, 4, 1, 2]
    kv = store.load_kv(enc.doc_ids[order])
    for j, i in enumerate(order):
        assert kv[j].dtype == enc.kv.dtype and kv[j].shape == (offs[i + 1] - offs[i], 2, 2, 2, 8)
        assert kv[j].tobytes() == enc.kv[offs[i]:offs[i + 1]].tobytes()
    for layer in range(2):
        keys, chunk_doc = store.router_keys(layer)
        assert keys.tobytes() == enc.k_router[layer].tobytes()
        assert np.array_equal(chunk_doc, np.repeat(enc.doc_ids, enc.n_chunks))
        x, _ = store.router_inputs(layer)
        assert x.tobytes() == enc.x_router[layer].tobytes()
    assert store.texts(enc.doc_ids[order]) == [passages[i].text for i in order]
    docs = store.documents()
    assert docs.column_names == list(DOCUMENT_COLUMNS)
    assert docs.column("doc_id").to_pylist() == enc.doc_ids.tolist()
    assert docs.column("text").to_pylist() == [p.text for p in passages]
    assert docs.column("source_path").to_pylist() == [p.source_path for p in passages]
    assert docs.column("byte_end").to_pylist() == [p.byte_end for p in passages]
    assert docs.column("n_chunks").to_pylist() == enc.n_chunks.tolist()
    assert docs.column("chunk_start").to_pylist() == offs[:-1].tolist()


def test_bf16_special_values_survive(tmp_path):
    store = create_store(tmp_path / "s", tiny_identity())
    ids = store.reserve_ids(1)
    passages, enc = random_docs(store.identity, ids, [4], np.random.default_rng(0))
    special = np.array([0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC1, 0x0001, 0x7F7F, 0xFFFF], dtype=np.uint16)
    enc.kv.reshape(-1)[: special.size] = special
    store = store.commit(add=[write_shard(store.root, "sp", passages, enc)])
    got = store.load_kv(ids)[0]
    assert np.array_equal(got.reshape(-1)[: special.size], special)  # NaN payloads, -0, inf, subnormal
    f = to_float32(got, "bfloat16").reshape(-1)
    assert np.isinf(f[2]) and np.isnan(f[4]) and np.signbit(f[1])


def test_fast_path_equals_zarr_python(store, rng):
    zarr = pytest.importorskip("zarr")
    store, rec, _, enc = add_docs(store, [6, 1, 9, 2], rng, "z")
    g = zarr.open_group(store.root / "shards" / "z", mode="r")
    assert np.array_equal(g["kv"][:], enc.kv)
    assert np.array_equal(g["k_router"][:], enc.k_router)
    assert np.array_equal(g["x_router"][:], enc.x_router)
    assert np.array_equal(g["chunk_doc"][:], np.repeat(enc.doc_ids, enc.n_chunks))
    assert g["kv"].attrs["msa_logical_dtype"] == "bfloat16"
    offs = enc.offsets
    for i, d in enumerate(enc.doc_ids):
        assert np.array_equal(store.load_kv([d])[0], g["kv"][offs[i]:offs[i + 1]])


def test_document_kv_is_one_contiguous_range(store, rng):
    store, rec, _, enc = add_docs(store, [5, 9, 13], rng, "c")
    view = store._view("c")
    idx = view.array("kv").index()
    assert np.all(np.diff(idx[:, 0].astype(np.int64)) == idx[0, 1])  # inner chunks back to back, C order
    assert idx[0, 0] == 0


def test_reopen_and_snapshot_isolation(store, rng):
    s1, _, _, enc1 = add_docs(store, [4, 4], rng, "a")
    snapshot = open_store(store.root, 1)
    before = (snapshot.router_keys(0)[0].copy(), snapshot.documents().to_pydict())
    s2, _, _, enc2 = add_docs(s1, [8], rng, "b")
    s3 = s2.commit(delete_ids=[int(enc1.doc_ids[0])])
    assert s3.version == 3 and open_store(store.root).version == 3
    assert np.array_equal(snapshot.router_keys(0)[0], before[0])
    assert snapshot.documents().to_pydict() == before[1]
    assert np.array_equal(snapshot.load_kv([enc1.doc_ids[0]])[0], s1.load_kv([enc1.doc_ids[0]])[0])
    assert s3.documents(["doc_id"]).column(0).to_pylist() == [int(enc1.doc_ids[1]), int(enc2.doc_ids[0])]


def test_stats_and_versions(store, rng):
    s1, rec, _, enc = add_docs(store, [3, 8, 5], rng, "a", message="first")
    st = s1.stats()
    per_chunk = 2 * (2 * 2 * 2 * 8 + 2 * 2 * 8 + 2 * 4)  # bf16 bytes of kv + k_router + x_router (L=2,H=2,D=8,E=4)
    # the shifted grid (P=4: windows from token 2) at one layer: 1 + 2 + 1 chunks of k_router_s + x_router_s
    # (the finer grid, windows of 2 tokens from tokens 0 and 1: 3 + 8 + 5 chunks)
    n_s = 16 if store.identity.shifted_window else 4
    shifted = n_s * 2 * (2 * 8 + 4) if store.identity.shifted_layers else 0
    assert st["n_docs"] == 3 and st["n_chunks"] == 1 + 2 + 2 and st["n_tokens"] == 16
    assert st["bytes_per_chunk"] == per_chunk and st["n_bytes"] == 5 * per_chunk + shifted
    assert st["bytes_per_token"] == pytest.approx((5 * per_chunk + shifted) / 16)
    s2 = s1.commit(delete_ids=[int(enc.doc_ids[1])], message="second")
    assert s2.stats()["n_docs"] == 2 and s2.stats()["n_chunks"] == 3 and s2.stats()["n_tokens"] == 8
    assert s2.stats()["n_bytes"] == 3 * per_chunk + shifted // 2     # doc 1 (8 tokens) had 2 of the 4
    vs = s2.versions()
    assert [v["version"] for v in vs] == [0, 1, 2]
    assert [v["operation"] for v in vs] == ["create", "add", "delete"]
    assert vs[1]["message"] == "first" and vs[2]["n_docs"] == 2


def test_shard_record_round_trips_json(store, rng):
    _, rec, _, _ = add_docs(store, [3, 5], rng, "r", commit=False)
    again = ShardRecord.from_dict(json.loads(json.dumps(rec.to_dict())))
    assert again.to_dict() == rec.to_dict()
    assert rec.n_docs == 2 and rec.n_chunks == 3 and rec.n_bytes > 0


def test_replace_and_delete_by_path(store, rng):
    s1, _, _, enc_a = add_docs(store, [4, 4], rng, "a", source="alpha")
    s2, _, _, enc_b = add_docs(s1, [4], rng, "b", source="beta")
    ids = s2.reserve_ids(1)
    passages, enc = random_docs(s2.identity, ids, [7], rng, source="alpha")
    rec = write_shard(s2.root, "a2", passages, enc)
    s3 = s2.commit(add=[rec], delete_paths=[f"alpha/{int(enc_a.doc_ids[0])}.txt"], message="replace")
    assert s3.versions()[-1]["operation"] == "replace"
    assert s3.documents(["doc_id"]).column(0).to_pylist() == [int(enc_a.doc_ids[1]), int(enc_b.doc_ids[0]), int(ids[0])]


def test_deleting_every_doc_of_a_shard_drops_the_shard(store, rng):
    s1, _, _, enc = add_docs(store, [4, 4], rng, "a")
    s2 = s1.commit(delete_ids=enc.doc_ids.tolist())
    assert s2.manifest["shards"] == [] and s2.manifest["changes"]["removed_shards"] == ["a"]
    assert s2.stats()["n_docs"] == 0 and s2.router_keys(0)[0].shape == (0, 2, 8)


def test_restore_and_tags(store, rng):
    s1, _, _, enc = add_docs(store, [4, 4], rng, "a")
    s1.tag("good")
    s2 = s1.commit(delete_ids=[int(enc.doc_ids[0])])
    s3 = s2.restore("good")
    assert s3.version == 3 and s3.manifest["changes"]["restored_from"] == 1
    assert s3.documents().to_pydict() == open_store(store.root, "good").documents().to_pydict()
    assert s3.tags() == {"good": 1}
    # restored ids stay used: a new reservation never hands them out again
    assert s3.reserve_ids(1)[0] > enc.doc_ids.max()


def test_compact_keeps_live_content(store, rng):
    s1, _, _, enc = add_docs(store, [4, 9, 2, 6], rng, "a")
    s2 = s1.commit(delete_ids=[int(enc.doc_ids[1])])
    live = [int(enc.doc_ids[i]) for i in (0, 2, 3)]
    want_kv = s2.load_kv(live)
    want_keys = s2.router_keys(1)
    want_docs = s2.documents(["doc_id", "text", "source_path", "n_tokens"]).to_pydict()
    s3 = s2.compact()
    assert s3.manifest["operation"] == "compact" and "a" in s3.manifest["changes"]["removed_shards"]
    assert s3.manifest["deletions"] == []
    for a, b in zip(s3.load_kv(live), want_kv):
        assert a.tobytes() == b.tobytes()
    assert s3.router_keys(1)[0].tobytes() == want_keys[0].tobytes()
    assert np.array_equal(s3.router_keys(1)[1], want_keys[1])
    assert s3.documents(["doc_id", "text", "source_path", "n_tokens"]).to_pydict() == want_docs
    assert s3.stats()["disk_bytes"] < s2.stats()["disk_bytes"]
    assert s3.compact().version == s3.version  # nothing left to compact


def test_find_shard_resumes_uncommitted(store, rng):
    _, rec, _, _ = add_docs(store, [4, 4], rng, "job-0", commit=False)
    found = store.find_shard("job-0")
    assert found is not None and found.to_dict() == rec.to_dict()
    assert store.find_shard("job-1") is None
    s2 = store.commit(add=[found])
    assert s2.find_shard("job-0") is None  # committed shards are not offered for resume


def test_gc_removes_unreferenced_after_compact(store, rng):
    s1, _, _, enc = add_docs(store, [4, 4], rng, "a")
    s2 = s1.commit(delete_ids=[int(enc.doc_ids[0])])
    s3 = s2.compact()
    rep = s3.gc(dry_run=True, grace_s=0)
    assert rep["orphans"] == []  # all versions are kept: shard a still referenced by v1, v2
    rep = s3.gc(dry_run=False, keep_last=1, grace_s=0)
    kinds = sorted({o["kind"] for o in rep["orphans"]})
    assert kinds == ["deletion", "manifest", "shard"] and rep["removed_versions"] == [0, 1, 2]
    assert not (store.root / "shards" / "a").exists()
    s4 = open_store(store.root)
    assert s4.version == 3 and s4.verify()["ok"]
    assert s4.load_kv([int(enc.doc_ids[1])])[0].shape[0] == 1


def test_locate_with_overlapping_id_ranges(store, rng):
    # two jobs reserve interleaved ids: shard id ranges overlap, lookups must still be exact
    a, b = store.reserve_ids(3), store.reserve_ids(3)
    ids1, ids2 = np.array([a[0], b[1], a[2]]), np.array([b[0], a[1], b[2]])
    p1, e1 = random_docs(store.identity, ids1, [3, 5, 9], rng, source="x")
    p2, e2 = random_docs(store.identity, ids2, [2, 6, 1], rng, source="y")
    s = store.commit(add=[write_shard(store.root, "x", p1, e1), write_shard(store.root, "y", p2, e2)])
    want = {int(i): e1.kv[e1.offsets[j]:e1.offsets[j + 1]] for j, i in enumerate(ids1)}
    want |= {int(i): e2.kv[e2.offsets[j]:e2.offsets[j + 1]] for j, i in enumerate(ids2)}
    order = [5, 0, 3, 1, 4, 2]
    for i, got in zip(order, s.load_kv(order)):
        assert got.tobytes() == want[i].tobytes()
    assert s.texts([int(ids2[1])]) == [p2[1].text]


def test_locate_many_disjoint_shards(store, rng):
    s = store
    encs = []
    for k in range(5):
        s, _, _, enc = add_docs(s, [4, 5], rng, f"s{k}")
        encs.append(enc)
    s = s.commit(delete_ids=[int(encs[2].doc_ids[0])])
    ids = [int(e.doc_ids[1]) for e in encs][::-1]
    for i, got in zip(ids, s.load_kv(ids)):
        e = next(e for e in encs if i in e.doc_ids)
        j = int(np.flatnonzero(e.doc_ids == i)[0])
        assert got.tobytes() == e.kv[e.offsets[j]:e.offsets[j + 1]].tobytes()
    with pytest.raises(DocumentNotFoundError):
        s.load_kv([int(encs[2].doc_ids[0])])
    with pytest.raises(DocumentNotFoundError):
        s.load_kv([10_000, -1])
    assert s.load_kv([]) == []


def test_reprs_do_not_load_tensors(store, rng):
    s, *_ = add_docs(store, [3, 9], rng, "a")
    fresh = open_store(s.root)
    assert "version=1" in repr(fresh) and "docs=2" in repr(fresh)
    assert "<table>" in fresh._repr_html_() and "router layers" in fresh._repr_html_()
    assert fresh._views == {}  # nothing read beyond the manifest


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_shifted_grid_round_trips_and_follows_deletes_and_compaction(tmp_path, rng, dtype):
    """The shifted router-key grid (k_router_s, x_router_s): bit-exact, one run of chunks per document in the
    order of router_keys, chunk counts from the token counts alone; deletes and compaction keep it right."""
    from msa_memory.schemas.records import shifted_chunk_counts

    ident = tiny_identity(hidden_size=5, dtype=dtype, shifted_layers=(1, 3))
    store = create_store(tmp_path / "s", ident)
    counts = [1, 2, 3, 4, 5, 6, 9, 17]             # P = 4: windows from token 2
    store, rec, _, enc = add_docs(store, counts, rng, "s0")
    assert enc.n_chunks_s.tolist() == [1, 1, 1, 1, 1, 1, 2, 4] == shifted_chunk_counts(counts, 4).tolist()
    for j in range(2):
        keys, docs = store.router_keys_shifted(j)
        assert keys.tobytes() == enc.k_router_s[j].tobytes()
        assert np.array_equal(docs, np.repeat(enc.doc_ids, enc.n_chunks_s))
        x, xdocs = store.router_inputs_shifted(j)
        assert x.tobytes() == enc.x_router_s[j].tobytes() and np.array_equal(xdocs, docs)
    with pytest.raises(Exception, match="Shifted layer position 2 out of range"):
        store.router_keys_shifted(2)
    # a second shard, then a delete from each: the live runs of both grids, in the same document order
    store, _, _, enc2 = add_docs(store, [7, 3], rng, "s1")
    dead = [int(enc.doc_ids[6]), int(enc2.doc_ids[0])]
    s2 = store.commit(delete_ids=dead)
    live_a, live_s = [], []
    for e in (enc, enc2):
        for i, d in enumerate(e.doc_ids):
            if int(d) not in dead:
                live_a += [int(d)] * int(e.n_chunks[i])
                live_s.append(e.k_router_s[:, e.offsets_s[i]:e.offsets_s[i + 1]])
    want = np.concatenate(live_s, axis=1)
    for j in range(2):
        keys, docs = s2.router_keys_shifted(j)
        assert keys.tobytes() == np.ascontiguousarray(want[j]).tobytes()
        a_docs = s2.router_keys(j)[1]
        assert a_docs.tolist() == live_a
        # the runs of documents are in the same order on both grids
        run = lambda d: d[np.r_[True, d[1:] != d[:-1]]].tolist()  # noqa: E731
        assert run(docs) == run(a_docs)
    s3 = s2.compact(merge_below_chunks=1000)
    assert s3.manifest["operation"] == "compact" and len(s3.manifest["shards"]) == 1
    for j in range(2):
        assert s3.router_keys_shifted(j)[0].tobytes() == s2.router_keys_shifted(j)[0].tobytes()
        assert s3.router_inputs_shifted(j)[0].tobytes() == s2.router_inputs_shifted(j)[0].tobytes()
    assert s3.stats()["n_bytes"] == s2.stats()["n_bytes"] and s3.verify()["ok"]


def test_shifted_grid_damage_is_found(tmp_path, rng):
    from msa_memory.errors import ShardCorruptError
    from msa_memory.testing.faults import flip_byte

    store = create_store(tmp_path / "s", tiny_identity(shifted_layers=(3,)))
    store, rec, _, _ = add_docs(store, [9, 13], rng, "s0")
    assert "k_router_s/c.0.0.0.0" in rec.files and "x_router_s/c.0.0.0" not in rec.files   # no router inputs kept
    flip_byte(tmp_path / "s" / "shards" / "s0" / "k_router_s" / "c.0.0.0.0", 3)
    rep = store.verify()
    assert not rep["ok"] and any("k_router_s" in p["file"] for p in rep["problems"])
    with pytest.raises(ShardCorruptError):
        store.router_keys_shifted(0)
    assert store.router_keys(1)[0].shape[0] == 3 + 4        # the aligned grid is unharmed


def test_identity_hash_of_stores_without_a_shifted_grid_is_unchanged():
    """Stores written before the shifted grid existed keep their identity (and so their manifests'
    identity_sha256): the field is left out of the JSON when empty."""
    import dataclasses

    from msa_memory.schemas.records import StoreIdentity, identity_sha256

    ident = tiny_identity()
    assert "shifted_layers" not in ident.to_dict()
    assert StoreIdentity.from_dict(ident.to_dict()) == ident
    with_grid = dataclasses.replace(ident, shifted_layers=(3,))
    assert with_grid.to_dict()["shifted_layers"] == [3] and StoreIdentity.from_dict(with_grid.to_dict()) == with_grid
    assert identity_sha256(with_grid) != identity_sha256(ident)
    assert ident.compatible_with(with_grid) == ["shifted_layers"]
    with pytest.raises(Exception, match="shifted_layers must be ascending distinct router layers"):
        dataclasses.replace(ident, shifted_layers=(2,))
