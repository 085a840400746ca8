"""A flipped byte anywhere in a shard: verify names the file and the documents it holds, and
reading the affected documents raises ShardCorruptError instead of returning wrong numbers;
documents of other shards still read. Run: .venv/bin/python -m pytest tests/fault/test_store_corruption.py -q
"""

from __future__ import annotations

import numpy as np
import pytest

from msa_memory.errors import ShardCorruptError
from msa_memory.store import create_store, open_store
from msa_memory.testing.faults import flip_byte
from msa_memory.testing.store_kit import add_docs, tiny_identity

KV = "kv/c.0.0.0.0.0"
KR = "k_router/c.0.0.0.0"


@pytest.fixture
def two_shards(tmp_path):
    rng = np.random.default_rng(3)
    s = create_store(tmp_path / "mem", tiny_identity())
    s, _, _, ea = add_docs(s, [5, 9, 4], rng, "a")
    s, _, _, eb = add_docs(s, [6, 2], rng, "b")
    return s, ea, eb


def _check_report(store, rel, shard, ids):
    rep = open_store(store.root).verify()
    assert not rep["ok"]
    [p] = rep["problems"]
    assert p["file"] == f"shards/{shard}/{rel}" and p["shard_id"] == shard
    assert sorted(p["doc_ids"]) == sorted(int(i) for i in ids)


@pytest.mark.parametrize("doc", [0, 1, 2])
def test_flipped_byte_in_kv_data(two_shards, doc):
    store, ea, eb = two_shards
    offs = ea.offsets
    inner = 2 * 2 * 2 * 8 * 2 + 4  # bytes of one stored chunk row incl. its crc32c
    pos = int(offs[doc]) * inner + 17  # inside the first chunk of `doc`
    flip_byte(store.root / "shards" / "a" / KV, pos)
    _check_report(store, KV, "a", ea.doc_ids)
    fresh = open_store(store.root)
    with pytest.raises(ShardCorruptError, match="checksum mismatch"):
        fresh.load_kv([ea.doc_ids[doc]])
    others = [d for i, d in enumerate(ea.doc_ids) if i != doc]
    assert [a.shape[0] for a in fresh.load_kv(others)]  # other documents of the shard still read
    assert fresh.load_kv(eb.doc_ids)[1].tobytes() == eb.kv[eb.offsets[1]:].tobytes()


def test_flipped_byte_in_shard_index(two_shards):
    store, ea, _ = two_shards
    flip_byte(store.root / "shards" / "a" / KV, -9)
    _check_report(store, KV, "a", ea.doc_ids)
    with pytest.raises(ShardCorruptError, match="index checksum"):
        open_store(store.root).load_kv([ea.doc_ids[0]])


def test_flipped_byte_in_router_keys(two_shards):
    store, _, eb = two_shards
    flip_byte(store.root / "shards" / "b" / KR, 40)
    _check_report(store, KR, "b", eb.doc_ids)
    with pytest.raises(ShardCorruptError):
        open_store(store.root).router_keys(0)


def test_flipped_byte_in_doc_table(two_shards):
    store, ea, _ = two_shards
    path = store.root / "shards" / "a" / "docs.parquet"
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata.row_group(0)
    col = next(meta.column(i) for i in range(meta.num_columns) if meta.column(i).path_in_schema == "text")
    flip_byte(path, col.data_page_offset + col.total_compressed_size - 3)  # inside the text page payload
    _check_report(store, "docs.parquet", "a", ea.doc_ids)
    with pytest.raises(ShardCorruptError):
        open_store(store.root).texts([ea.doc_ids[1]])


def test_flipped_byte_in_record(two_shards):
    store, ea, eb = two_shards
    flip_byte(store.root / "shards" / "a" / "_record.json", 30, mask=0x02)
    with pytest.raises(ShardCorruptError, match="record"):
        open_store(store.root).load_kv([ea.doc_ids[0]])
    rep = open_store(store.root).verify()
    assert not rep["ok"] and rep["problems"][0]["file"] == "shards/a/_record.json"
    assert open_store(store.root).load_kv([eb.doc_ids[0]])[0].shape[0] == 2


def test_deletions_after_delete_then_corrupt_deletion_file(two_shards):
    store, ea, _ = two_shards
    s2 = store.commit(delete_ids=[int(ea.doc_ids[0])])
    [entry] = s2.manifest["deletions"]
    flip_byte(store.root / entry["path"], 5)
    rep = open_store(store.root).verify()
    assert not rep["ok"] and rep["problems"][-1]["file"] == entry["path"]
    with pytest.raises(ShardCorruptError):
        open_store(store.root).load_kv([ea.doc_ids[1]])
