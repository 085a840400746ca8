"""Hard negatives mined from the router's own scores (trainer.mine_routing_negatives) and from BM25.

Oracle: a brute-force loop over queries, tokens, heads, chunks and layers (cosine, head-mean,
query-max, chunk-max, summed over layers: what routing does) gives every query's scores; the mined
negatives must be exactly its top non-positive passages, in order. BM25 (bm25_negatives.bm25_topk, the
block sparse product): bm25s's own per-query ``get_scores`` is the oracle.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hypothesis import example, given, settings
from hypothesis import strategies as st

from msa_memory.errors import ConfigError
from msa_memory.train import trainer
from msa_memory.train.trainer import Features, RouterProjections, TrainConfig, mine_routing_negatives, train_router


def _toy(seed=0, n_docs=9, n_q=7, L=2, E=12, Hq=4, Hk=2, D=6):
    g = torch.Generator().manual_seed(seed)
    n_chunks = torch.randint(1, 4, (n_docs,), generator=g)
    chunk_doc = torch.repeat_interleave(torch.arange(n_docs), n_chunks)
    x = torch.randn(L, int(n_chunks.sum()), E, generator=g)
    lens = torch.randint(1, 5, (n_q,), generator=g)
    offs = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)])
    qx = torch.randn(int(offs[-1]), L, E, generator=g)
    pos = [tuple(sorted({int(torch.randint(0, n_docs, (1,), generator=g)) for _ in range(1 + i % 2)}))
           for i in range(n_q)]
    feats = Features(tuple(range(L)), x, chunk_doc, n_docs, qx, offs, pos, ["ict"] * n_q)
    proj = RouterProjections(tuple(range(L)), [torch.randn(Hq * D, E, generator=g) for _ in range(L)],
                             [torch.randn(Hk * D, E, generator=g) for _ in range(L)], Hq, Hk, D)
    return feats, proj


def _brute_scores(feats, proj):
    L = len(feats.layers)
    Q, N = feats.n_queries, feats.n_docs
    out = np.zeros((Q, N))
    for li in range(L):
        k = proj.project_k(li, feats.x_chunks[li]).detach().double()        # (C, Hk, D)
        for i in range(Q):
            q = proj.project_q(li, feats.q_x[feats.q_offsets[i]:feats.q_offsets[i + 1], li]).detach().double()
            Hq, Hk = q.shape[1], k.shape[1]
            best = np.full(N, -np.inf)
            for c in range(k.shape[0]):
                s = max(sum(float(q[t, h] @ k[c, h // (Hq // Hk)] / (q[t, h].norm() * k[c, h // (Hq // Hk)].norm()))
                            for h in range(Hq)) / Hq for t in range(q.shape[0]))
                d = int(feats.chunk_doc[c])
                best[d] = max(best[d], s)
            out[i] += best
    return out


@pytest.mark.parametrize("block", [256, 3])
def test_mined_negatives_are_top_non_positive_routing_scores(block):
    feats, proj = _toy()
    n = 4
    got = mine_routing_negatives(proj, feats, n, TrainConfig(), block=block)
    scores = _brute_scores(feats, proj)
    for i, neg in enumerate(got):
        ranked = [int(d) for d in np.argsort(-scores[i], kind="stable") if d not in feats.positives[i]]
        assert list(neg) == ranked[:n], (i, neg, ranked)
        assert not set(neg) & set(feats.positives[i])
    # a score budget of a few query tokens × chunks splits the blocks (down to one query each): same result
    C = feats.x_chunks.shape[1]
    for max_scores in (1, 3 * C, 12 * C):
        assert mine_routing_negatives(proj, feats, n, TrainConfig(), block=block, max_scores=max_scores) == got
    # asking for more negatives than there are non-positive passages gives all of them
    allneg = mine_routing_negatives(proj, feats, 100)
    assert all(len(a) == feats.n_docs - len(set(p)) for a, p in zip(allneg, feats.positives))


@pytest.mark.parametrize("source,every,calls", [("routing", 1, 3), ("routing", 0, 1), ("routing", 2, 2),
                                                 ("both", 1, 3), ("bm25", 1, 0)])
def test_training_re_mines_as_configured(monkeypatch, source, every, calls):
    feats, proj = _toy(1)
    feats.hard_negatives = [tuple(range(2)) for _ in range(feats.n_queries)]
    seen = []
    real = trainer.mine_routing_negatives

    def spy(p, f, n, cfg=None, **kw):
        out = real(p, f, n, cfg, **kw)
        seen.append(out)
        return out
    monkeypatch.setattr(trainer, "mine_routing_negatives", spy)
    before = [w.detach().clone() for w in proj.k]
    hist = train_router(proj, feats, None, TrainConfig(epochs=3, batch_size=4, lr=1e-2, n_random=2, n_hard=2,
                                                       hard_source=source, mine_every=every))
    assert len(seen) == calls and len(hist) == 4 and all(math.isfinite(h["loss"]) for h in hist[1:])
    assert any(not torch.equal(a, b) for a, b in zip(before, proj.k))
    if calls > 1:  # every re-mine covers every query
        assert all(len(m) == feats.n_queries for m in seen)


def test_bad_hard_negative_config():
    with pytest.raises(ConfigError, match="hard_source"):
        TrainConfig(hard_source="dense")
    with pytest.raises(ConfigError, match="mine_every"):
        TrainConfig(mine_every=-1)


def test_cli_command_records_mining_options():
    from msa_memory.train.cli_support import train_router_command as _train_router_command

    cmd = _train_router_command("r/", None, "mem.msa", None, "default", "0,1", 2, 3, 8, 1e-3, 500, 100, 800, 0,
                                None, "cpu", "routing", 0)
    assert cmd.endswith("--hard-negatives routing --mine-every 0") and "--store mem.msa" in cmd


_WORDS = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "lambda", "theta", "zeta", "rho", "tau"]


@settings(max_examples=40, deadline=None)
@given(docs=st.lists(st.lists(st.sampled_from(_WORDS), min_size=1, max_size=12), min_size=2, max_size=25),
       queries=st.lists(st.lists(st.sampled_from(_WORDS + ["unseen", "absent"]), min_size=0, max_size=6),
                        min_size=1, max_size=9),
       k=st.integers(1, 30), block=st.sampled_from([1, 2, 64]))
# passages 2 and 4 differ by 'omega' / 'gamma', one passage each: equal in exact arithmetic, an ulp apart in
# bm25s (0.65187252 < 0.65187258) and the other way round in scipy's order
@example(docs=[["alpha"], ["alpha", "alpha"], ["alpha", "beta", "beta", "beta", "beta", "omega", "delta"],
               ["alpha", "alpha", "alpha", "alpha", "alpha", "delta"],
               ["alpha", "beta", "beta", "beta", "beta", "gamma", "delta"]],
         queries=[["alpha", "gamma", "delta", "omega"]], k=2, block=1)
def test_bm25_topk_is_the_best_bm25s_scores_in_order_ties_by_index(docs, queries, k, block):
    bm25s = pytest.importorskip("bm25s")
    from msa_memory.train.bm25_negatives import bm25_topk

    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize([" ".join(d) for d in docs], show_progress=False), show_progress=False)
    toks = [[w for w in q if w in retriever.vocab_dict] for q in queries]
    got = bm25_topk(retriever, [list(q) for q in queries], k, block=block)
    kk = min(k, len(docs))
    assert got.shape == (len(queries), kk)
    for q, row in zip(toks, got):
        ref = retriever.get_scores(q) if q else np.zeros(len(docs), dtype=np.float32)   # bm25s: one query
        want = sorted(range(len(docs)), key=lambda d: (-round(float(ref[d]), 5), d))[:kk]
        assert np.allclose(ref[row], ref[want], atol=1e-5)        # the same best scores, best first
        # best first up to float32 summation order: scipy's product and bm25s's np.add.at add a passage's
        # per-token scores in other orders, so scores equal in exact arithmetic (other passages, other
        # summands) may differ by an ulp, either way
        assert all(ref[a] >= ref[b] - 1e-5 for a, b in zip(row, row[1:]))

        # passages of the same tokens get the same summands in any order: true ties, which rank by index;
        # so do the passages sharing no token with the query (score 0)
        def tied(a: int, b: int) -> bool:
            return sorted(docs[a]) == sorted(docs[b]) or ref[a] == ref[b] == 0

        assert all(a < b for a, b in zip(row, row[1:]) if tied(a, b))
        left_out = set(range(len(docs))) - set(row.tolist())   # the k-th place cut between true ties: lower index kept
        assert not any(e < d and tied(e, d) for d in row.tolist() for e in left_out)
        assert len(set(row.tolist())) == kk


def test_bm25_hard_negatives_leave_out_positives():
    pytest.importorskip("bm25s")
    from msa_memory.train.pairs import Query
    from msa_memory.train.bm25_negatives import bm25_hard_negatives

    passages = ["the red fox jumps", "a red car parks", "the blue sea", "red red red wine", "green fields"]
    qs = [Query("red fox", (0,), "ict"), Query("blue", (2,), "ict"), Query("nothing known here", (4,), "ict")]
    hard = bm25_hard_negatives(passages, qs, n=2)
    assert hard[0] == (3, 1)                      # the other "red" passages, best first; the positive left out
    assert hard[1][0] != 2 and len(hard[1]) == 2 and len(hard[2]) == 2 and 4 not in hard[2]
