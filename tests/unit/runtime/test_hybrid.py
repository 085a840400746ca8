"""Hybrid retrieval in the runtime (runtime/hybrid.py, Memory.route/search/ask(retriever=...)): the fusion
against a slow reciprocal-rank fusion, Memory's hybrid ranking against that fusion of its own routing and
BM25 scores, questions as token ids, text mode reading the fused passages, pooled mode refusing it, a
store without a lexical index refused with one line, and a store of lex1 (unstemmed) postings answering with
lex1 until reindex_lexical upgrades it to rank as a fresh lex2 store.
Run: .venv/bin/python -m pytest tests/unit/runtime/test_hybrid.py -q
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from msa_memory.errors import ConfigError
from msa_memory.runtime.hybrid import RRF_K, fuse_rrf
from msa_memory.testing.runtime_kit import build_store


def rrf_reference(routing, lexical, depth=None, k=RRF_K):
    """Reciprocal-rank fusion with Python sorts: lists of (document) by score, ties by routing's order."""
    n = len(routing)
    by_route = sorted(range(n), key=lambda d: (-routing[d], d))
    pos = {d: i for i, d in enumerate(by_route)}
    by_lex = sorted((d for d in range(n) if lexical[d] > 0), key=lambda d: (-lexical[d], pos[d]))
    fused = [0.0] * n
    for ranking in (by_route, by_lex):
        for rank, d in enumerate(ranking[:depth] if depth is not None else ranking, start=1):
            fused[d] += 1.0 / (k + rank)
    return sorted(range(n), key=lambda d: (-fused[d], pos[d])), fused


@settings(max_examples=60, deadline=None)
@given(data=st.data(), n=st.integers(1, 40), depth=st.one_of(st.none(), st.integers(1, 12)))
def test_fusion_equals_reference_rrf(data, n, depth):
    few = st.sampled_from([0.0, 0.5, 1.0, 2.0, -1.0])                    # many ties on purpose
    routing = data.draw(st.lists(st.one_of(few, st.floats(-5, 5)), min_size=n, max_size=n))
    lexical = data.draw(st.lists(st.one_of(few, st.floats(0, 9)), min_size=n, max_size=n))
    order, fused = fuse_rrf(np.array(routing), np.array(lexical), depth=depth)
    want_order, want_fused = rrf_reference(routing, lexical, depth)
    assert order.tolist() == want_order
    np.testing.assert_allclose(fused, want_fused, rtol=0, atol=1e-15)


def test_memory_hybrid_is_the_fusion_of_its_routing_and_bm25(tiny_memory):
    mem = tiny_memory
    n = len(mem.doc_ids)
    q = "What is the code of the blue door?"
    r_ids, r_scores, _ = mem.route(q, n)
    routing = np.empty(n)
    routing[np.searchsorted(mem.doc_ids, r_ids)] = r_scores
    lexical = mem.store.lexical_index(mem.doc_ids).scores(q)
    assert lexical.max() > 0 and repr(mem.lexical_index()).startswith("LexicalIndex(analyzer='lex2'")
    want_order, want_fused = rrf_reference(routing.tolist(), lexical.tolist())
    ids, scores, timings = mem.route(q, 4, retriever="hybrid")
    assert ids.tolist() == mem.doc_ids[want_order[:4]].tolist() and "lexical_s" in timings
    np.testing.assert_allclose(scores, np.asarray(want_fused)[want_order[:4]], rtol=1e-12)
    tab = mem.search(q, k=4, retriever="hybrid")
    assert tab.column("doc_id").to_pylist() == ids.tolist() and tab.column("rank").to_pylist() == [1, 2, 3, 4]
    # the passage that shares the question's rare words is first here: BM25 puts it first, routing near the top
    assert "blue door" in tab.column("text")[0].as_py()


def test_hybrid_question_as_token_ids_uses_its_decoded_text(tiny_memory):
    mem = tiny_memory
    q = "blue door code"
    ids = mem.tokenizer(q, add_special_tokens=False)["input_ids"]
    a = mem.route(q, 3, retriever="hybrid")
    b = mem.route(ids, 3, retriever="hybrid")
    assert a[0].tolist() == b[0].tolist()
    np.testing.assert_allclose(a[1], b[1])


def test_ask_text_reads_the_fused_passages_and_pooled_refuses(tiny_memory):
    mem = tiny_memory
    q = "What is the code of the blue door?"
    fused = mem.search(q, k=2, retriever="hybrid").column("doc_id").to_pylist()
    ans = mem.ask(q, k=2, max_new_tokens=2, retriever="hybrid")      # an MSA store: hybrid defaults to text mode
    assert ans.mode == "text" and [d.doc_id for d in ans.docs] == fused
    for mode in ("pooled", "interleave"):
        with pytest.raises(ConfigError, match=f"retriever='hybrid' picks the passages of mode='text'; mode='{mode}'"):
            mem.ask(q, mode=mode, retriever="hybrid")
    with pytest.raises(ConfigError, match="retriever='bm25' is not one of"):
        mem.search(q, retriever="bm25")


def test_store_without_lexical_index_refused_in_one_line(tiny_msa_model, tmp_path, monkeypatch):
    """A store whose shards were written without postings (as by a release without the lexical index)."""
    import functools

    import msa_memory.store as store_pkg
    from msa_memory.runtime import Memory

    monkeypatch.setattr(store_pkg, "write_shard", functools.partial(store_pkg.write_shard, lexical=False))
    old = build_store(tmp_path / "old.msa", tiny_msa_model)
    monkeypatch.undo()
    mem = Memory(old, model=tiny_msa_model)
    assert len(mem.search("blue door", k=2)) == 2                      # routing works as before
    with pytest.raises(ConfigError) as e:
        mem.search("blue door", k=2, retriever="hybrid")
    msg = str(e.value)
    assert "\n" not in msg and str(old.root) in msg and f"msa store reindex-lexical {old.root}" in msg
    new = old.reindex_lexical()
    mem = Memory(new, model=tiny_msa_model)
    assert len(mem.search("blue door", k=2, retriever="hybrid")) == 2


def test_lex1_store_answers_hybrid_and_ranks_as_fresh_after_reindex(tiny_msa_model, tmp_path,
                                                                     monkeypatch):
    """A store encoded before lex2 (postings.lex1.parquet): hybrid fuses routing with BM25 over its lex1
    postings, the question analysed with lex1; after reindex_lexical it ranks as a store encoded now."""
    from msa_memory.runtime import Memory
    from msa_memory.store import lexical

    monkeypatch.setattr(lexical, "ANALYZER", "lex1")
    old = build_store(tmp_path / "old.msa", tiny_msa_model)
    monkeypatch.undo()
    mem = Memory(old, model=tiny_msa_model)
    q = "Which codes open the doors?"                      # 'codes', 'doors': only their stems are in the texts
    n = len(mem.doc_ids)
    r_ids, r_scores, _ = mem.route(q, n)
    routing = np.empty(n)
    routing[np.searchsorted(mem.doc_ids, r_ids)] = r_scores
    assert mem.lexical_index().analyzer == "lex1" and mem.lexical_index().scores(q).max() == 0
    want_order, _ = rrf_reference(routing.tolist(), [0.0] * n)
    assert mem.route(q, n, retriever="hybrid")[0].tolist() == mem.doc_ids[want_order].tolist()
    new = Memory(old.reindex_lexical(), model=tiny_msa_model)
    fresh = Memory(build_store(tmp_path / "fresh.msa", tiny_msa_model), model=tiny_msa_model)
    assert new.lexical_index().analyzer == "lex2" and new.lexical_index().scores(q).max() > 0
    a, b = new.route(q, n, retriever="hybrid"), fresh.route(q, n, retriever="hybrid")
    assert a[0].tolist() == b[0].tolist() and np.array_equal(a[1], b[1])
