"""Questions written in capitals only route as the same words in lower case (``Memory.fold_shouted_questions``).

The repro: NPL's questions are all capitals ("MEASUREMENT OF DIELECTRIC CONSTANT OF LIQUIDS ...") over
lower-case documents; the case-sensitive model routed them at nDCG@10 0.115, the same questions in lower case
0.204 (``benchmarks/bench_retrieval.py``, default model). ``routing.query.fold_shouted`` folds a text with two
or more upper-case letters and no lower-case one; mixed case is kept. Memory folds before routing and
answering; ``fold_shouted_questions = False`` and ``--keep-case`` route as typed.
Run: .venv/bin/python -m pytest tests/unit/runtime/test_question_case.py -q
"""

from __future__ import annotations

import json

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from msa_memory.cli import app
from msa_memory.routing.query import fold_shouted

runner = CliRunner()


@given(st.text(max_size=40))
@settings(max_examples=300, deadline=None)
def test_fold_shouted_folds_capitals_only_text_and_keeps_the_rest(text):
    got = fold_shouted(text)
    shouted = sum(c.isupper() for c in text) >= 2 and not any(c.islower() for c in text)
    assert got == (text.lower() if shouted else text)
    assert fold_shouted(got) == got                                   # folding twice changes nothing more


def test_fold_shouted_examples():
    assert fold_shouted("USE OF DIGITAL COMPUTERS IN FILTER DESIGN?") == "use of digital computers in filter design?"
    assert fold_shouted("What did NASA launch in 1969?") == "What did NASA launch in 1969?"
    assert fold_shouted("I") == "I" and fold_shouted("42") == "42" and fold_shouted("ÉTÉ À PARIS") == "été à paris"


def _route(mem, q):
    ids, scores, _ = mem.route(q, 5)
    return ids.tolist(), scores.tolist()


def test_a_shouted_question_routes_and_answers_as_its_lower_case(tiny_memory):
    """Failed before: the byte-level tiny model saw other bytes, so other scores."""
    mem = tiny_memory
    assert mem.fold_shouted_questions
    assert _route(mem, "WHAT IS THE BLUE DOOR CODE?") == _route(mem, "what is the blue door code?")
    a = mem.ask("WHAT IS THE BLUE DOOR CODE?", mode="pooled", max_new_tokens=3)
    b = mem.ask("what is the blue door code?", mode="pooled", max_new_tokens=3)
    assert a.tokens == b.tokens and a.question == "what is the blue door code?"
    assert _route(mem, "What is the Blue Door code?") != _route(mem, "what is the blue door code?")   # mixed: kept
    try:
        mem.fold_shouted_questions = False
        assert not np.allclose(_route(mem, "WHAT IS THE BLUE DOOR CODE?")[1], _route(mem, "what is the blue door code?")[1])
    finally:
        mem.fold_shouted_questions = True


def test_cli_search_folds_shouted_questions_unless_keep_case(tiny_store, tiny_msa_model):
    base = [str(tiny_store.root), "-k", "4", "--model", tiny_msa_model.source["path"], "--device", "cpu", "--json"]

    def results(q, *extra):
        res = runner.invoke(app, ["search", base[0], q, *base[1:], *extra])
        assert res.exit_code == 0, res.output
        return [(r["doc_id"], r["score"]) for r in json.loads(res.stdout.strip().splitlines()[-1])["results"]]

    lower = results("blue door code")
    assert results("BLUE DOOR CODE") == lower
    assert [s for _, s in results("BLUE DOOR CODE", "--keep-case")] != [s for _, s in lower]
