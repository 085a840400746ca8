"""Text mode with the real default model (Gemma 3 270M from PyPI) answers a needle question on CPU.

The store is built with the encoder + store APIs directly (Encoder → write_shard → commit) from six
passages, one of which holds the needle. Routing uses the default router projections (copied from
Gemma's own q/k: untrained, weak — trained adapters are what make routing good), so the question
is asked with k = all passages; what is tested is the end-to-end path: real store, real model,
routed passage order, chat/text layout, stop strings, and that the weak base model copies the fact.
Slow (loading + dequantizing the GGUF takes minutes on a busy 2-core CPU): marked ``slow``.
Run: .venv/bin/python -m pytest tests/unit/runtime/test_text_mode_default_model.py -q -m slow
"""

from __future__ import annotations

import warnings

import pytest

from msa_memory.testing.runtime_kit import build_store

PASSAGES = [
    "Python lists are mutable sequences, typically used to store collections of homogeneous items.",
    "The secret code of the blue door is 4471. Keep it safe.",
    "A tuple is an immutable sequence type; tuples are written with parentheses.",
    "The with statement wraps the execution of a block with methods defined by a context manager.",
    "Dictionaries map hashable keys to arbitrary values and preserve insertion order.",
    "The garden behind the museum opens at nine in the morning on weekdays.",
]


@pytest.mark.slow
def test_text_mode_default_model_answers_needle(tmp_path):
    from msa_memory.encode import UntrainedRouterWarning, load_model
    from msa_memory.runtime import Memory

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UntrainedRouterWarning)
        model = load_model("default")
    store = build_store(tmp_path / "mem.msa", model, PASSAGES, dtype="bfloat16")
    mem = Memory(store, model=model)
    table = mem.search("What is the secret code of the blue door?", k=len(PASSAGES))
    assert sorted(table.column("doc_id").to_pylist()) == sorted(store.documents(["doc_id"]).column("doc_id").to_pylist())
    ans = mem.ask("What is the secret code of the blue door?", mode="text", k=len(PASSAGES), max_new_tokens=16)
    assert "4471" in ans.answer, ans
    assert ans.timings["prefill_s"] > 0 and ans.stop_reason in ("stop", "eos", "length")
