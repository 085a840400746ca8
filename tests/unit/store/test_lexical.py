"""The store's lexical index (store/lexical.py, store-format.md section 13): the analyzer, postings written
with every shard, BM25 against a slow reference computed from the passages' text, sidecars added by
reindex_lexical to shards without postings, and verify / gc / compact / restore keeping them consistent.
Run: .venv/bin/python -m pytest tests/unit/store/test_lexical.py -q
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from msa_memory.errors import ConfigError, VersionConflictError
from msa_memory.store import create_store, open_store, write_shard
from msa_memory.store import lexical, shards
from msa_memory.store.lexical import ANALYZER, analyze, term_hash
from msa_memory.testing.store_kit import random_docs, tiny_identity


def add_texts(store, texts, rng, shard_id, *, lexical_index=True, commit=True):
    """Reserve ids and write one shard of random tensors whose passages have ``texts``; commit it."""
    ids = store.reserve_ids(len(texts))
    passages, enc = random_docs(store.identity, ids, [3 + len(t) % 7 for t in texts], rng, source=shard_id,
                                texts=texts)
    rec = write_shard(Path(store.root), shard_id, passages, enc, lexical=lexical_index)
    return (store.commit(add=[rec], message=f"add {shard_id}") if commit else store), ids


def bm25_reference(texts: dict[int, str], query: str, k1: float = 1.2, b: float = 0.75) -> dict[int, float]:
    """BM25 straight from the formula of store-format.md section 13, over the documents ``texts``."""
    docs = {d: analyze(t) for d, t in texts.items()}
    n = len(docs)
    avgdl = sum(len(v) for v in docs.values()) / n
    out = {}
    for d, toks in docs.items():
        s = 0.0
        for t in set(analyze(query)):
            tf = toks.count(t)
            if tf == 0:
                continue
            df = sum(1 for v in docs.values() if t in v)
            idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
            s += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len(toks) / avgdl))
        out[d] = s
    return out


def test_analyzer_nfkc_lower_letters_digits_stopwords():
    assert analyze("The Blue-door CODE is 4471; don't tell_anyone!") == ["blue", "door", "code", "4471", "tell",
                                                                          "anyone"]
    assert analyze("ＡＢＣ ﬁle Ⅻ ½") == ["abc", "file", "xii", "1", "2"]          # NFKC: full width, ligature, numerals
    assert analyze("Zoë's café, naïve résumé") == ["zoë", "café", "naïve", "résumé"]
    assert analyze("it is what it is, and so on") == []
    assert analyze("") == [] and "the" in lexical.STOPWORDS and 150 <= len(lexical.STOPWORDS) <= 200


def test_term_hash_is_stable():
    # blake2b-64 little-endian: pinned, since every store written keeps these numbers
    assert term_hash("door") == int.from_bytes(__import__("hashlib").blake2b(b"door", digest_size=8).digest(), "little")
    assert term_hash("door") != term_hash("doors") and 0 <= term_hash("zoë") < 2**64


def test_shard_holds_postings_covered_by_its_record(store, rng):
    s, ids = add_texts(store, ["the blue door code 4471", "red door", "apples grow"], rng, "s1")
    rec = s._view("s1").record
    assert lexical.postings_file() == "postings.lex1.parquet" and "postings.lex1.parquet" in rec.files
    d, t, f = lexical.read_postings(s.backend, "shards/s1/postings.lex1.parquet")
    assert d.tolist() == sorted(d.tolist()) and set(d.tolist()) == set(ids.tolist())
    want = sorted((int(ids[0]), term_hash(x), 1) for x in ("blue", "door", "code", "4471"))
    assert sorted(zip(d.tolist(), t.tolist(), f.tolist()))[:4] == want
    assert s.lexical_info() == {"analyzer": ANALYZER, "n_shards": 1, "indexed_shards": 1, "complete": True}


_WORDS = ["door", "Door", "code", "blue", "red", "the", "is", "4471", "café", "ÉCOLE", "x_y", "apples", "of"]


@settings(max_examples=25, deadline=None)
@given(texts=st.lists(st.lists(st.sampled_from(_WORDS + [" ", ", ", "!"]), max_size=12).map("".join),
                      min_size=1, max_size=9),
       split=st.integers(0, 9), dead=st.sets(st.integers(0, 8), max_size=3),
       queries=st.lists(st.lists(st.sampled_from(_WORDS), min_size=1, max_size=4).map(" ".join), min_size=1,
                        max_size=3))
def test_bm25_equals_reference_on_random_corpora(texts, split, dead, queries):
    """Two shards, some documents deleted: the index over the live documents scores as the formula does."""
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        s = create_store(Path(tmp) / "m.msa", tiny_identity())
        cut = min(split, len(texts))
        ids: list[int] = []
        for sid, part in (("a", texts[:cut]), ("b", texts[cut:])):
            if part:
                s, new = add_texts(s, part, rng, sid)
                ids += new.tolist()
        gone = sorted({ids[i] for i in dead if i < len(ids)})
        if gone and len(gone) < len(ids):
            s = s.commit(delete_ids=gone)
        else:
            gone = []
        live = {d: t for d, t in zip(ids, texts) if d not in gone}
        index = s.lexical_index()
        assert index.doc_ids.tolist() == sorted(live)
        for q in queries:
            ref = bm25_reference(live, q)
            np.testing.assert_allclose(index.scores(q), [ref[d] for d in sorted(live)], rtol=1e-12, atol=1e-12)


def test_store_without_postings_is_refused_then_reindexed(store, rng):
    s, _ = add_texts(store, ["blue door", "red door"], rng, "old", lexical_index=False)
    assert "postings.lex1.parquet" not in s._view("old").record.files
    with pytest.raises(ConfigError) as e:
        s.lexical_index()
    msg = str(e.value)
    assert "\n" not in msg and str(s.root) in msg and f"msa store reindex-lexical {s.root}" in msg
    assert "no lexical index for 1 of its 1 shards" in msg
    s, _ = add_texts(s, ["green door"], rng, "new")     # a shard of this release: postings inside it
    assert s.lexical_info()["indexed_shards"] == 1
    v = s.version
    s2 = s.reindex_lexical()
    assert s2.version == v + 1 and s2.manifest["operation"] == "reindex"
    assert s2.manifest["changes"]["lexical_analyzer"] == ANALYZER
    [old] = [e for e in s2.manifest["shards"] if e["shard_id"] == "old"]
    assert old["lexical"]["path"].startswith("lexical/old.lex1.") and "lexical" not in s2.manifest["shards"][1]
    assert s2.reindex_lexical().version == s2.version                   # nothing left to index: no version
    assert open_store(s.root, v).lexical_info()["complete"] is False     # older versions keep what they had
    texts = dict(zip(s2.documents(["doc_id"]).column("doc_id").to_pylist(), ["blue door", "red door", "green door"]))
    ref = bm25_reference(texts, "blue door")
    np.testing.assert_allclose(s2.lexical_index().scores("blue door"), [ref[d] for d in sorted(texts)])
    assert s2.verify()["ok"]


def test_other_analyzer_is_refused_and_rebuilt(store, rng, monkeypatch):
    monkeypatch.setattr(lexical, "ANALYZER", "lex0")
    s, _ = add_texts(store, ["blue door"], rng, "s1")
    monkeypatch.setattr(lexical, "ANALYZER", "lex1")
    assert "postings.lex0.parquet" in s._view("s1").record.files
    with pytest.raises(ConfigError, match="analyzer 'lex0' for 1 of its 1 shards.*reads 'lex1'.*reindex-lexical"):
        s.lexical_index()
    s = s.reindex_lexical()
    assert s.manifest["shards"][0]["lexical"]["analyzer"] == "lex1" and s.lexical_index().scores("door")[0] > 0


def test_reindex_conflict_publishes_nothing_and_leaves_no_sidecar(store, rng):
    s, _ = add_texts(store, ["blue door"], rng, "s1", lexical_index=False)
    s.commit(message="another writer")                                   # noop version published meanwhile
    with pytest.raises(VersionConflictError):
        s.reindex_lexical()
    assert not list((Path(s.root) / "lexical").glob("*.parquet")) and s.latest_version() == s.version + 1


def test_crash_before_publish_leaves_an_orphan_gc_removes(store, rng, monkeypatch):
    s, _ = add_texts(store, ["blue door"], rng, "s1", lexical_index=False)

    def boom(point: str) -> None:
        if point == "lexical:written":
            raise KeyboardInterrupt

    monkeypatch.setattr(shards, "fault_hook", boom)
    with pytest.raises(KeyboardInterrupt):
        s.reindex_lexical()
    monkeypatch.undo()
    assert s.latest_version() == s.version
    # a sidecar a killed process left (the removal above is best effort): gc's to remove
    orphan = Path(s.root) / "lexical" / "s1.lex1.0123456789ab.parquet"
    orphan.write_bytes(b"x")
    (Path(s.root) / "lexical" / ".s1.lex1.0123456789ab.parquet.aaaaaaaaaaaa.tmp").write_bytes(b"x")
    report = s.gc(dry_run=False, grace_s=0)
    kinds = {o["path"]: o["kind"] for o in report["orphans"]}
    assert kinds.get("lexical/s1.lex1.0123456789ab.parquet") == "lexical"
    assert kinds.get("lexical/.s1.lex1.0123456789ab.parquet.aaaaaaaaaaaa.tmp") == "temp"
    assert not list((Path(s.root) / "lexical").iterdir())


def test_restore_compact_gc_keep_postings_consistent(store, rng):
    s, ids = add_texts(store, ["blue door", "red door", "old map"], rng, "s1", lexical_index=False)
    s = s.reindex_lexical()                                   # a version with a sidecar for s1
    with_sidecar = s.version
    sidecar = s.manifest["shards"][0]["lexical"]["path"]
    s, more = add_texts(s, ["blue car", "door"], rng, "s2")   # postings inside s2
    s = s.commit(delete_ids=[int(ids[1])])
    texts = {int(ids[0]): "blue door", int(ids[2]): "old map", int(more[0]): "blue car", int(more[1]): "door"}
    want = bm25_reference(texts, "blue door")

    def check(snap):
        np.testing.assert_allclose(snap.lexical_index().scores("blue door"), [want[d] for d in sorted(texts)])

    check(s)                                                  # commits carry the sidecar; deletions masked
    r = s.restore(with_sidecar)                               # a restore takes the version's sidecar
    assert r.manifest["shards"][0]["lexical"]["path"] == sidecar and r.verify()["ok"]
    s = r.restore(s.version)
    c = s.compact()                                           # the dirty s1 is rewritten, postings inside
    [new] = c.manifest["changes"]["added_shards"]
    assert "postings.lex1.parquet" in c._view(new).record.files
    assert all("lexical" not in e for e in c.manifest["shards"]) and c.verify()["ok"]
    check(c)
    rep = c.gc(dry_run=False, keep_last=1, grace_s=0)         # no kept version names the sidecar any more
    assert {"path": sidecar, "kind": "lexical"}.items() <= next(o for o in rep["orphans"] if o["path"] == sidecar).items()
    assert not (Path(s.root) / sidecar).exists()
    check(open_store(s.root))


def test_restore_refuses_a_version_whose_sidecar_gc_removed(store, rng):
    from msa_memory.errors import ShardMissingError

    s, _ = add_texts(store, ["blue door"], rng, "s1", lexical_index=False)
    s = s.reindex_lexical()
    sidecar = Path(s.root) / s.manifest["shards"][0]["lexical"]["path"]
    sidecar.unlink()
    with pytest.raises(ShardMissingError, match="needs lexical postings"):
        s.restore(s.version)


def test_verify_reports_damaged_postings_inside_a_shard_and_in_a_sidecar(store, rng):
    s, _ = add_texts(store, ["blue door", "red door"], rng, "s1")
    s, _ = add_texts(s, ["green door"], rng, "s2", lexical_index=False)
    s = s.reindex_lexical()
    inside = Path(s.root) / "shards/s1/postings.lex1.parquet"
    side = Path(s.root) / s.manifest["shards"][1]["lexical"]["path"]
    for path in (inside, side):
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x40
        path.write_bytes(bytes(data))
    rep = s.verify()
    files = {p["file"]: p["problem"] for p in rep["problems"]}
    assert not rep["ok"] and files == {"shards/s1/postings.lex1.parquet": "crc32c mismatch",
                                       s.manifest["shards"][1]["lexical"]["path"]: "crc32c mismatch"}
    side.unlink()
    assert {p["problem"] for p in s.verify()["problems"] if p["shard_id"] == "s2"} == {"missing"}


def test_verify_reports_postings_of_documents_the_shard_does_not_hold(store, rng, monkeypatch):
    s, ids = add_texts(store, ["blue door"], rng, "s1", lexical_index=False)
    real = lexical.postings_bytes
    monkeypatch.setattr(lexical, "postings_bytes", lambda d, t: real(np.asarray(d) + 1000, t))
    s = s.reindex_lexical()
    [p] = s.verify()["problems"]
    assert p["file"].startswith("lexical/s1.lex1.") and f"documents [{int(ids[0]) + 1000}]" in p["problem"]
