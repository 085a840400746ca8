"""Reader training data (``msa_memory.train.reader``): the corpus maker, the questions file and the checks
``run_reader_training`` makes before it encodes anything.

- ``make_reader_corpus`` writes one passage per file with its planted fact's answer in it (and in no other
  passage's file), questions naming that file, a train/dev split by fact; it refuses a folder that is not empty;
- ``load_questions`` names the line of a malformed record;
- a data folder without dev (or training) questions is refused with a clear error before the store is encoded.
"""

from __future__ import annotations

import json

import pytest

from msa_memory.errors import ConfigError
from msa_memory.train.reader import load_questions, make_reader_corpus, run_reader_training


def test_the_corpus_holds_each_answer_in_its_gold_passage_and_splits_by_fact(tmp_path):
    info = make_reader_corpus(tmp_path / "d", 40, seed=1, dev_fraction=0.3, sources="stdlib")
    qs = load_questions(tmp_path / "d" / "questions.jsonl")
    assert info["passages"] == 40 and info["questions"] == len(qs) > 0
    assert info["dev_questions"] == sum(q.split == "dev" for q in qs) > 0
    texts = {p.name: p.read_text() for p in (tmp_path / "d" / "corpus").iterdir()}
    assert len(texts) == 40
    for q in qs:
        assert len(q.files) == 1 and q.answer in texts[q.files[0]]
    split_of: dict[int, set[str]] = {}
    for q in qs:
        split_of.setdefault(q.fact, set()).add(q.split)
    assert all(len(s) == 1 for s in split_of.values())          # no fact is asked in both splits
    with pytest.raises(ConfigError, match="not empty"):
        make_reader_corpus(tmp_path / "d", 5)


def test_a_malformed_question_names_its_line(tmp_path):
    p = tmp_path / "q.jsonl"
    p.write_text(json.dumps({"question": "a?", "answer": "b", "files": ["x.txt"]}) + "\n\n" + '{"question": "c?"}\n')
    with pytest.raises(ConfigError, match=r"q\.jsonl:3: not a reader question"):
        load_questions(p)


@pytest.mark.parametrize("missing", ["dev", "train"])
def test_data_without_dev_or_training_questions_is_refused_before_encoding(tmp_path, missing):
    data = tmp_path / "data"
    (data / "corpus").mkdir(parents=True)
    (data / "corpus" / "p0.txt").write_text("The blue door code is 4471.\n")
    keep = "train" if missing == "dev" else "dev"
    (data / "questions.jsonl").write_text(json.dumps(
        {"question": "What is the blue door code?", "answer": "4471", "files": ["p0.txt"], "fact": 0,
         "split": keep}) + "\n")
    with pytest.raises(ConfigError, match="no dev" if missing == "dev" else "no training") as e:
        run_reader_training(data=data, out=tmp_path / "out", steps=1)
    assert "--passages" in (e.value.hint or "")
    assert not (data / "mem.msa").exists() and not (tmp_path / "out").exists()
