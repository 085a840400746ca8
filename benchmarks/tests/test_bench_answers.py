"""bench_answers' own internals: SQuAD metrics, the question generator, planting, haystacks, the BM25-RAG retriever.

Checks that EM/F1 normalise as SQuAD v1.1 does; that every planted fact lands in its host passage and its answer
is recoverable from the planted text alone (and occurs nowhere else); that the two facts of a 2-hop question sit
in different documents and chain through the bridge entity; that questions rephrase rather than cloze their
statements; that a larger haystack is a superset of a smaller one; and that the generator is disjoint from the
training data's fact generator (``msa_memory.train.pairs.FactMaker``: kinds, people, cities, templates, values).
These test a benchmark's internals, not the product: they live beside the benchmarks and run with
``make bench-test`` (not ``make test``). No model is loaded.
Run: .venv/bin/python -m pytest benchmarks/tests/test_bench_answers.py -q
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))          # benchmarks/

import bench_answers as ba  # noqa: E402
from msa_memory.train import pairs  # noqa: E402
from msa_memory.train.texts import pydoc_topics  # noqa: E402


@pytest.fixture(scope="module")
def built():
    items = ba.make_items(0, 20, 20)
    docs = pydoc_topics()
    corpus = ba.build_corpus(items, 0, pydoc=docs, fillers=[])   # fillers: the pydoc passages left over
    return items, corpus


# ----------------------------------------------------------------------------- metrics
@pytest.mark.parametrize("pred, gold, em, f1", [
    ("The 6:40.", "6:40", 1.0, 1.0),                 # article and punctuation dropped
    ("  Ines   Rowe ", "Ines Rowe", 1.0, 1.0),
    ("at 6:40 am", "6:40", 0.0, 0.5),                # P 1/3, R 1
    ("Tanner Street", "Tanner Street, Dunedin", 0.0, 0.8),
    ("1000000000", "1531", 0.0, 0.0),
    ("", "1531", 0.0, 0.0),
])
def test_metrics_normalise_as_squad(pred, gold, em, f1):
    assert ba.exact_match(pred, gold) == em
    assert ba.token_f1(pred, gold) == pytest.approx(f1)


def test_normalize_answer_drops_articles_punctuation_and_case():
    assert ba.normalize_answer("The  Cedar-Shingles, an A!") == "cedarshingles"
    assert ba.normalize_answer("Theatre") == "theatre"                    # articles only as whole words


def test_prediction_is_the_first_non_empty_line_and_contains_needs_whole_words():
    assert ba.prediction_text("\n  534 beds\nQuestion: more") == "534 beds"
    assert ba.contains("It has 534 beds.", "534") == 1.0
    assert ba.contains("It has 5341 beds.", "534") == 0.0


# ----------------------------------------------------------------------------- questions and planting
def test_items_are_unique_and_deterministic(built):
    items, _ = built
    assert [i.question for i in items] == [i.question for i in ba.make_items(0, 20, 20)]
    assert [i.question for i in items] != [i.question for i in ba.make_items(1, 20, 20)]
    assert len({i.answer for i in items}) == len(items)
    assert len({e for i in items for e in i.entities}) == sum(len(i.entities) for i in items)
    assert sum(i.kind == "needle" for i in items) == 20 and sum(i.kind == "2hop" for i in items) == 20


def test_planted_facts_land_in_their_host_and_answers_are_recoverable(built):
    items, corpus = built
    files = corpus.files(len(corpus.fillers))
    for it in items:
        for f in it.facts:
            assert f.statement in corpus.planted[f.host]
        last = it.facts[-1].statement                    # the fact that holds the answer
        assert ba.contains(last, it.answer) == 1.0
        pat = re.compile(rf"\b{re.escape(it.answer)}\b", re.I)
        holders = [name for name, text in files.items() if pat.search(text)]
        assert holders == [f"q{it.facts[-1].host:03d}.txt"], (it.qid, holders)   # the answer occurs nowhere else


def test_two_hop_facts_sit_in_different_documents_and_chain(built):
    items, corpus = built
    hops = [i for i in items if i.kind == "2hop"]
    for it in hops:
        (f1, f2), (a, b) = it.facts, it.entities
        assert f1.host != f2.host
        assert a.lower() in f1.statement.lower() and b.lower() in f1.statement.lower()
        assert b.lower() in f2.statement.lower() and it.answer in f2.statement
        assert a.lower() not in corpus.planted[f2.host].lower()    # hop 2's document does not name A
        assert it.answer not in corpus.planted[f1.host]            # hop 1's document does not hold the answer
        assert a.lower() in it.question.lower() and b.lower() not in it.question.lower()
    assert len({f.host for it in items for f in it.facts}) == sum(len(it.facts) for it in items)


def test_questions_rephrase_their_statements(built):
    items, _ = built
    for it in items:
        stmt = ba.normalize_answer(it.facts[-1].statement.replace(it.answer, ""))
        q = ba.normalize_answer(it.question)
        assert q not in stmt and stmt not in q
        assert it.answer.lower() not in it.question.lower()


def test_larger_haystacks_are_supersets(built):
    items, corpus = built
    chars = lambda t: len(t) // 4        # noqa: E731
    n16, t16 = ba.fillers_for(corpus, 16384, chars)
    n32, t32 = ba.fillers_for(corpus, 32768, chars)
    assert n16 < n32 and 16384 <= t16 < t32
    small, big = corpus.files(n16), corpus.files(n32)
    assert small.items() <= big.items()
    assert all(f"q{h:03d}.txt" in small for h in range(len(corpus.planted)))


def test_write_corpus_rewrites_only_what_differs(tmp_path):
    ba.write_corpus(tmp_path, {"a.txt": "one", "b.txt": "two"})
    mtime = (tmp_path / "a.txt").stat().st_mtime_ns
    ba.write_corpus(tmp_path, {"a.txt": "one", "c.txt": "three"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "c.txt"]
    assert (tmp_path / "a.txt").stat().st_mtime_ns == mtime


# ----------------------------------------------------------------------------- disjoint from training
def test_generator_is_disjoint_from_the_training_fact_generator(built):
    items, _ = built
    assert not set(ba.KINDS) & set(pairs._KINDS)
    assert not set(ba.PEOPLE) & {p for v in pairs._PEOPLE.values() for p in v}
    assert not set(ba.CITIES) & {c for v in pairs._CITIES.values() for c in v}
    words = {w for v in (*pairs._COLOURS.values(), *pairs._ANIMALS.values()) for w in v}
    assert not (set(ba.ROOFS) | set(ba.RIVERS)) & words
    templates = {t for _, _, st, qs in ba.NEEDLE_RELATIONS for t in st + qs}
    templates |= {t for r in ba.HOP_RELATIONS for t in (r[2], r[3], *r[5])}
    assert not templates & set(pairs._STATEMENTS + pairs._QUESTIONS_TRAIN + pairs._QUESTIONS_EVAL)
    attrs = {a for a, _ in pairs._ATTRS}
    for it in items:
        assert not any(a in it.question.lower() for a in attrs), it.question
        if it.answer.isdigit():
            assert len(it.answer) != 4 or int(it.answer) < 1700     # FactMaker: 4-digit codes, years 1700-1899
    # the training generator (both splits, many draws) never asks one of these questions nor names these entities
    ents = {e.lower() for it in items for e in it.entities}
    qs = {it.question for it in items}
    for split in ("train", "eval"):
        fm = pairs.FactMaker(split, 0)
        for _ in range(2000):
            statement, questions, _ = fm.make()
            assert not qs & set(questions)
            assert not any(e in statement.lower() for e in ents)


# ----------------------------------------------------------------------------- BM25-RAG retriever
def test_bm25_route_finds_the_planted_passage(built):
    pa = pytest.importorskip("pyarrow")
    items, corpus = built
    texts = corpus.planted + corpus.fillers[:200]

    class FakeStore:
        def documents(self, columns):
            return pa.table({"doc_id": list(range(100, 100 + len(texts))), "text": texts})

    route = ba.BM25Route(FakeStore())
    hit = 0
    for it in items:
        ids, scores, timings = route(it.question, 4)
        assert len(ids) == 4 and list(scores) == sorted(scores, reverse=True) and timings["route_total_s"] >= 0
        hit += (100 + it.facts[0].host) in set(ids.tolist())
    assert hit >= 0.9 * len(items)      # the entity's rare name makes hop 1 (and needles) easy for BM25


def test_summarise_groups_rows_by_size_row_and_kind():
    rows = [{"size": "16K", "mode": m, "k": 4, "kind": kind, "em": em, "f1": em, "contains": em, "gold_read": 1.0,
             "first_token_s": t, "total_s": 2 * t, "prompt_tokens": 10}
            for m, kind, em, t in [("text", "needle", 1.0, 1.0), ("text", "2hop", 0.0, 3.0), ("pooled", "needle", 0.0, 0.1)]]
    s = ba.summarise(rows)
    assert s["16K"]["text k=4"]["all"]["em"] == 0.5 and s["16K"]["text k=4"]["needle"]["em"] == 1.0
    assert s["16K"]["text k=4"]["all"]["ttft_s"] == 2.0 and s["16K"]["pooled k=4"]["all"]["n"] == 1
