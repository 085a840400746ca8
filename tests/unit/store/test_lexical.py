"""The store's lexical index (store/lexical.py, store-format.md section 13): the analyzers (lex1; lex2 = lex1 +
Snowball stems), postings written with every shard, BM25 against a slow reference computed from the passages'
text and against bm25s with PyStemmer, sidecars added by reindex_lexical to shards without lex2 postings, a
store of lex1 postings (every store encoded before lex2) still answering and upgraded by reindex_lexical, and
verify / gc / compact / restore keeping them consistent.
Run: .venv/bin/python -m pytest tests/unit/store/test_lexical.py -q
"""

from __future__ import annotations

import functools
import math
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from msa_memory.errors import ConfigError, VersionConflictError
from msa_memory.store import create_store, open_store, write_shard
from msa_memory.store import lexical, shards
from msa_memory.store._stem import stem
from msa_memory.store.lexical import ANALYZER, analyze, term_hash
from msa_memory.testing.store_kit import random_docs, tiny_identity


def add_texts(store, texts, rng, shard_id, *, lexical_index=True, commit=True):
    """Reserve ids and write one shard of random tensors whose passages have ``texts``; commit it."""
    ids = store.reserve_ids(len(texts))
    passages, enc = random_docs(store.identity, ids, [3 + len(t) % 7 for t in texts], rng, source=shard_id,
                                texts=texts)
    rec = write_shard(Path(store.root), shard_id, passages, enc, lexical=lexical_index)
    return (store.commit(add=[rec], message=f"add {shard_id}") if commit else store), ids


def bm25_reference(texts: dict[int, str], query: str, k1: float = 1.2, b: float = 0.75,
                   analyzer: str = ANALYZER) -> dict[int, float]:
    """BM25 straight from the formula of store-format.md section 13, over the documents ``texts``."""
    docs = {d: analyze(t, analyzer) for d, t in texts.items()}
    n = len(docs)
    avgdl = sum(len(v) for v in docs.values()) / n
    out = {}
    for d, toks in docs.items():
        s = 0.0
        for t in set(analyze(query, analyzer)):
            tf = toks.count(t)
            if tf == 0:
                continue
            df = sum(1 for v in docs.values() if t in v)
            idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
            s += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len(toks) / avgdl))
        out[d] = s
    return out


def test_analyzer_lex1_nfkc_lower_letters_digits_stopwords():
    lex1 = functools.partial(analyze, analyzer="lex1")
    assert lex1("The Blue-door CODE is 4471; don't tell_anyone!") == ["blue", "door", "code", "4471", "tell", "anyone"]
    assert lex1("ＡＢＣ ﬁle Ⅻ ½") == ["abc", "file", "xii", "1", "2"]          # NFKC: full width, ligature, numerals
    assert lex1("Zoë's café, naïve résumé") == ["zoë", "café", "naïve", "résumé"]
    assert lex1("it is what it is, and so on") == []
    assert lex1("") == [] and "the" in lexical.STOPWORDS and 150 <= len(lexical.STOPWORDS) <= 200


def test_analyzer_lex2_is_lex1_then_stems():
    assert ANALYZER == "lex2" and lexical.ANALYZERS == ("lex2", "lex1")
    assert analyze("The runners were running; Generously, the skies' 1990s cafés!") == [
        "runner", "run", "generous", "sky", "1990s", "café"]
    assert analyze("Ours is ours") == []                 # stopwords go before stemming ("ours" is one)
    with pytest.raises(ConfigError, match="analyzer 'lex9' is not one this release knows"):
        analyze("door", "lex9")


_TEXT = st.lists(st.one_of(st.sampled_from(["The", "running", "Skies", "ies", "generously", "don't", "4471",
                                            "café", "ＡＢＣ", "ﬁles", "of", "-", " ", ", "]),
                           st.text(st.characters(codec="utf-8"), max_size=6)), max_size=20).map(" ".join)


@settings(max_examples=200, deadline=None)
@given(text=_TEXT)
def test_analyzer_lex2_equals_lex1_plus_stem(text):
    assert analyze(text, "lex2") == [stem(t) for t in analyze(text, "lex1")]
    assert lexical._term_counts(text, "lex2") == Counter(analyze(text, "lex2"))


def test_term_hash_is_stable():
    # blake2b-64 little-endian: pinned, since every store written keeps these numbers
    assert term_hash("door") == int.from_bytes(__import__("hashlib").blake2b(b"door", digest_size=8).digest(), "little")
    assert term_hash("door") != term_hash("doors") and 0 <= term_hash("zoë") < 2**64


def test_shard_holds_postings_covered_by_its_record(store, rng):
    s, ids = add_texts(store, ["the blue door code 4471", "red door", "apples grow"], rng, "s1")
    rec = s._view("s1").record
    assert lexical.postings_file() == "postings.lex2.parquet" and "postings.lex2.parquet" in rec.files
    d, t, f = lexical.read_postings(s.backend, "shards/s1/postings.lex2.parquet")
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
    assert "postings.lex2.parquet" not in s._view("old").record.files
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
    assert old["lexical"]["path"].startswith("lexical/old.lex2.") and "lexical" not in s2.manifest["shards"][1]
    assert s2.reindex_lexical().version == s2.version                   # nothing left to index: no version
    assert open_store(s.root, v).lexical_info()["complete"] is False     # older versions keep what they had
    texts = dict(zip(s2.documents(["doc_id"]).column("doc_id").to_pylist(), ["blue door", "red door", "green door"]))
    ref = bm25_reference(texts, "blue door")
    np.testing.assert_allclose(s2.lexical_index().scores("blue door"), [ref[d] for d in sorted(texts)])
    assert s2.verify()["ok"]


def test_unknown_analyzer_is_refused_and_rebuilt(store, rng, monkeypatch):
    """Postings of an analyzer this release does not know (a newer release's) are not read."""
    monkeypatch.setattr(lexical, "ANALYZERS", ("lex0", *lexical.ANALYZERS))
    monkeypatch.setattr(lexical, "ANALYZER", "lex0")
    s, _ = add_texts(store, ["blue door"], rng, "s1")
    monkeypatch.undo()
    assert "postings.lex0.parquet" in s._view("s1").record.files
    with pytest.raises(ConfigError, match="analyzer 'lex0' for 1 of its 1 shards.*does not read.*reads 'lex2' and "
                                          "'lex1'.*msa store reindex-lexical"):
        s.lexical_index()
    assert s.verify()["ok"]                          # covered by the shard's record; not parsed
    s = s.reindex_lexical()
    assert s.manifest["shards"][0]["lexical"]["analyzer"] == "lex2" and s.lexical_index().scores("door")[0] > 0


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
    orphan = Path(s.root) / "lexical" / "s1.lex2.0123456789ab.parquet"
    orphan.write_bytes(b"x")
    (Path(s.root) / "lexical" / ".s1.lex2.0123456789ab.parquet.aaaaaaaaaaaa.tmp").write_bytes(b"x")
    report = s.gc(dry_run=False, grace_s=0)
    kinds = {o["path"]: o["kind"] for o in report["orphans"]}
    assert kinds.get("lexical/s1.lex2.0123456789ab.parquet") == "lexical"
    assert kinds.get("lexical/.s1.lex2.0123456789ab.parquet.aaaaaaaaaaaa.tmp") == "temp"
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
    assert "postings.lex2.parquet" in c._view(new).record.files
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
    inside = Path(s.root) / "shards/s1/postings.lex2.parquet"
    side = Path(s.root) / s.manifest["shards"][1]["lexical"]["path"]
    for path in (inside, side):
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x40
        path.write_bytes(bytes(data))
    rep = s.verify()
    files = {p["file"]: p["problem"] for p in rep["problems"]}
    assert not rep["ok"] and files == {"shards/s1/postings.lex2.parquet": "crc32c mismatch",
                                       s.manifest["shards"][1]["lexical"]["path"]: "crc32c mismatch"}
    side.unlink()
    assert {p["problem"] for p in s.verify()["problems"] if p["shard_id"] == "s2"} == {"missing"}


def test_verify_reports_postings_of_documents_the_shard_does_not_hold(store, rng, monkeypatch):
    s, ids = add_texts(store, ["blue door"], rng, "s1", lexical_index=False)
    real = lexical.postings_bytes
    monkeypatch.setattr(lexical, "postings_bytes", lambda d, t, a=None: real(np.asarray(d) + 1000, t, a))
    s = s.reindex_lexical()
    [p] = s.verify()["problems"]
    assert p["file"].startswith("lexical/s1.lex2.") and f"documents [{int(ids[0]) + 1000}]" in p["problem"]


# ----------------------------------------------------------------------------- lex1 stores (encoded before lex2)


def lex1_texts(store, texts_by_shard, rng, monkeypatch):
    """Shards written as a release before lex2 wrote them (postings.lex1.parquet inside); {doc_id: text}."""
    monkeypatch.setattr(lexical, "ANALYZER", "lex1")
    live = {}
    for sid, texts in texts_by_shard.items():
        store, ids = add_texts(store, texts, rng, sid)
        live.update(zip(ids.tolist(), texts))
    monkeypatch.undo()
    return store, live


_INFLECTED = {"a": ["The runners were running", "a runner runs home", "doors and a door"],
              "b": ["connected connections", "the connection of runners", "door"]}


def test_lex1_store_answers_then_reindex_upgrades_it_to_lex2(store, rng, monkeypatch, tmp_path):
    s, live = lex1_texts(store, _INFLECTED, rng, monkeypatch)
    assert all(f"postings.lex1.parquet" in s._view(sid).record.files for sid in _INFLECTED)
    queries = ("running runner", "door connection", "connect")
    index = s.lexical_index()
    assert index.analyzer == "lex1" and repr(index).startswith("LexicalIndex(analyzer='lex1'")
    for q in queries:                                   # the question is analysed as the postings were: lex1
        ref = bm25_reference(live, q, analyzer="lex1")
        np.testing.assert_allclose(index.scores(q), [ref[d] for d in sorted(live)], rtol=1e-12, atol=1e-12)
    assert index.scores("connect").max() == 0           # unstemmed: 'connect' is in no document
    assert s.verify()["ok"] and s.lexical_info()["indexed_shards"] == 0   # no lex2 postings yet
    v = s.version
    s2 = s.reindex_lexical()
    assert s2.version == v + 1 and s2.manifest["changes"]["lexical_analyzer"] == "lex2"
    assert [e["lexical"]["path"].split(".")[1] for e in s2.manifest["shards"]] == ["lex2", "lex2"]
    assert s2.lexical_info()["complete"] and s2.verify()["ok"]
    assert open_store(s.root, v).lexical_index().analyzer == "lex1"      # the older version keeps its own
    upgraded = s2.lexical_index()
    assert upgraded.analyzer == "lex2" and upgraded.scores("connect").max() > 0
    # a store encoded fresh by this release from the same texts, in the same shards
    fresh = create_store(tmp_path / "fresh.msa", tiny_identity())
    for sid, texts in _INFLECTED.items():
        fresh, _ = add_texts(fresh, texts, np.random.default_rng(0), sid)
    assert fresh.documents(["doc_id"]).column("doc_id").to_pylist() == sorted(live)
    for q in queries:
        ref = bm25_reference(live, q)
        np.testing.assert_allclose(upgraded.scores(q), [ref[d] for d in sorted(live)], rtol=1e-12, atol=1e-12)
        # the same postings, rows and arithmetic: the same floats, hence the same ranking
        assert np.array_equal(upgraded.scores(q), fresh.lexical_index().scores(q))


def test_lex1_and_lex2_shards_together_are_refused_until_reindexed(store, rng, monkeypatch):
    s, live = lex1_texts(store, {"old": ["blue doors", "red door"]}, rng, monkeypatch)
    s, ids = add_texts(s, ["green doors"], rng, "new")              # appended by this release: lex2 inside
    live[int(ids[0])] = "green doors"
    with pytest.raises(ConfigError) as e:
        s.lexical_index()
    msg = str(e.value)
    assert "\n" not in msg and f"`msa store reindex-lexical {s.root}`" in msg
    assert "has lexical postings of analyzer 'lex1' for 1 of its 2 shards (e.g. 'old') and of 'lex2' for the other 1" in msg
    s = s.reindex_lexical()
    assert "lexical" in s.manifest["shards"][0] and "lexical" not in s.manifest["shards"][1]   # only 'old' lacked lex2
    ref = bm25_reference(live, "door")
    np.testing.assert_allclose(s.lexical_index().scores("door"), [ref[d] for d in sorted(live)], rtol=1e-12)


def test_verify_parses_the_lex1_postings_too(store, rng, monkeypatch):
    real = lexical.postings_bytes
    monkeypatch.setattr(lexical, "postings_bytes", lambda d, t, a=None: real(np.asarray(d) + 1000, t, a))
    s, live = lex1_texts(store, {"s1": ["blue door"]}, rng, monkeypatch)
    [d] = live
    [p] = s.verify()["problems"]
    assert p["file"] == "shards/s1/postings.lex1.parquet" and f"documents [{d + 1000}]" in p["problem"]
    s = s.reindex_lexical()                               # lex2 sidecar written right; the lex1 file stays
    assert [q["file"] for q in s.verify()["problems"]] == ["shards/s1/postings.lex1.parquet"]


# ----------------------------------------------------------------------------- against bm25s + PyStemmer

_VOCAB = ["running", "runs", "runner", "ran", "generously", "generous", "generator", "door", "doors", "skies",
          "sky", "café", "cafés", "1990s", "the", "of", "agreed", "agreement", "connection", "connected", "happily"]


@settings(max_examples=40, deadline=None)
@given(texts=st.lists(st.lists(st.sampled_from(_VOCAB), max_size=10).map(" ".join), min_size=1, max_size=8),
       queries=st.lists(st.lists(st.sampled_from(_VOCAB), min_size=1, max_size=4).map(" ".join), min_size=1,
                        max_size=3))
def test_bm25_over_lex2_postings_equals_bm25s_with_pystemmer(texts, queries):
    """Our BM25 over lex2 postings vs bm25s (method 'lucene', float64) over the lex1 terms stemmed by PyStemmer.

    bm25s scores Lucene's BM25, without the (k1 + 1) factor of our numerator, so ours = (k1 + 1) · bm25s.
    Tolerance: each term's contribution takes at most ~12 roundings in either implementation, the sum over
    the q <= 4 distinct query terms q more, the scaling 1 more; every contribution is positive, so
    |ours - ref| <= (2·12 + 2·4 + 2)·eps·score < 64·eps·score (eps = 2**-53)."""
    bm25s = pytest.importorskip("bm25s", reason="bm25s (a baseline extra) is not installed")
    stemmer = pytest.importorskip("Stemmer", reason="PyStemmer (a baseline extra) is not installed")
    import pyarrow as pa
    import pyarrow.parquet as pq

    assume(any(analyze(t) for t in texts))                 # bm25s needs a term in its corpus (avgdl > 0)
    ps = stemmer.Stemmer("english")
    tab = pq.read_table(pa.BufferReader(lexical.postings_bytes(np.arange(len(texts)), texts)))
    index = lexical.LexicalIndex(np.arange(len(texts)), tab.column("doc_id").to_numpy(),
                                 tab.column("term_hash").to_numpy(), tab.column("tf").to_numpy())
    ref = bm25s.BM25(k1=lexical.BM25_K1, b=lexical.BM25_B, method="lucene", dtype="float64")
    ref.index([ps.stemWords(analyze(t, "lex1")) for t in texts], show_progress=False)
    for q in queries:
        terms = [t for t in sorted(set(ps.stemWords(analyze(q, "lex1")))) if t in ref.vocab_dict]
        want = (lexical.BM25_K1 + 1.0) * ref.get_scores(terms) if terms else np.zeros(len(texts))
        np.testing.assert_allclose(index.scores(q), want, rtol=64 * 2.0**-53, atol=0)
