"""Questions given as token ids: ``Memory.search`` / ``ask`` equal the text path, bit for bit.

On the tiny MSA checkpoint's store (runtime conftest; byte-level tokenizer, so the text's tokens
split exactly at the prompt layout's strings) and on a plain-wrap store whose tokenizer adds a BOS:
the ids of ``tokenizer(question, add_special_tokens=False)`` given as a list, numpy array or tensor
give the same search table (scores included) and, in pooled, text and interleave mode, the same
tokens, answer, rounds, routed documents and prompt length as the text; the special tokens a text
question gets are added around ids too. Bad ids are refused with one-line ConfigErrors.

Run: ``.venv/bin/python -m pytest tests/unit/runtime/test_question_ids.py -q``
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from msa_memory.errors import ConfigError
from msa_memory.runtime import Memory
from msa_memory.testing.runtime_kit import PASSAGES, build_store

Q = "What is the blue door code?"


def _ids(mem, text=Q):
    return list(mem.tokenizer(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("form", [list, np.array, torch.tensor], ids=["list", "numpy", "tensor"])
def test_search_with_question_ids_equals_text(tiny_memory, form):
    a = tiny_memory.search(Q, k=4)
    b = tiny_memory.search(form(_ids(tiny_memory)), k=4)
    assert a.equals(b), (a.to_pydict(), b.to_pydict())


def _same_answer(a, b):
    assert b.tokens == a.tokens and b.answer == a.answer and b.stop_reason == a.stop_reason
    assert (b.n_prompt_tokens, b.n_new_tokens) == (a.n_prompt_tokens, a.n_new_tokens)
    assert [(r.index, [(d.doc_id, d.score) for d in r.docs], r.per_layer, r.generated) for r in b.rounds] == \
        [(r.index, [(d.doc_id, d.score) for d in r.docs], r.per_layer, r.generated) for r in a.rounds]
    assert b.question == a.question                          # the decoded ids


@pytest.mark.parametrize("mode", ["pooled", "text", "interleave"])
def test_ask_with_question_ids_equals_text(tiny_memory, mode):
    kw = dict(mode=mode, k=2, max_new_tokens=5, stop_strings=(), max_rounds=2)
    _same_answer(tiny_memory.ask(Q, **kw), tiny_memory.ask(_ids(tiny_memory), **kw))


def test_question_ids_are_checked(tiny_memory, tiny_store, tiny_msa_model):
    mem = tiny_memory
    with pytest.raises(ConfigError, match="no token ids"):
        mem.search([])
    with pytest.raises(ConfigError, match="token id 262, outside the model's vocabulary 0..261"):
        mem.search([5, 262])
    with pytest.raises(ConfigError, match="1-D"):
        mem.search([[5, 6]])
    with pytest.raises(ConfigError, match="integer"):
        mem.ask([5.0, 6.0])
    with pytest.raises(ConfigError, match="empty"):
        mem.ask("   ")
    with pytest.raises(ConfigError, match="tokenizer= was given with a loaded model"):
        Memory(tiny_store, model=tiny_msa_model, tokenizer=tiny_msa_model.tokenizer)


def _bos_tokenizer():
    """The tiny byte tokenizer, with ``add_special_tokens=True`` putting <bos> (id 2) in front."""
    from tokenizers import processors

    from msa_memory.encode.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return tok


def test_plain_store_question_ids_get_the_text_questions_special_tokens(tmp_path):
    from msa_memory.encode import UntrainedRouterWarning, load_model
    from msa_memory.encode.tiny import tiny_model
    from msa_memory.routing.query import query_tokens, special_token_frame

    tok = _bos_tokenizer()
    assert tok("ab", add_special_tokens=True)["input_ids"][0] == 2 and special_token_frame(tok) == ([2], [])
    ids = list(tok(Q, add_special_tokens=False)["input_ids"])
    assert query_tokens(tok, ids) == query_tokens(tok, Q)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UntrainedRouterWarning)
        loaded = load_model(tiny_model("qwen3", seed=3), tokenizer=tok, dtype=torch.float32, chunk_tokens=16,
                            router_layers="2,3")
    build, passages = build_store, PASSAGES
    mem = Memory(build(tmp_path / "plain.msa", loaded), model=loaded)
    assert mem.layout.msa is False
    assert mem.search(Q, k=3).equals(mem.search(ids, k=3))
    for mode in ("text", "interleave"):
        kw = dict(mode=mode, k=2, max_new_tokens=4, stop_strings=(), max_rounds=2)
        _same_answer(mem.ask(Q, **kw), mem.ask(ids, **kw))
