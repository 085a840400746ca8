"""The reference scorer (``msa_memory.routing.reference``): chunk and document scores vs a loop
formula for every reducer combination, the same ranking as the resident index, and an adapter's
layer-summed scores (shifted grid, suffix queries) vs the per-layer formula.

Run: ``.venv/bin/python -m pytest tests/unit/routing -x -q``
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from msa_memory.errors import ConfigError
from msa_memory.routing.reference import adapter_doc_scores, chunk_scores, doc_scores


def _brute_doc_scores(q, mask, k, chunk_doc, n_docs, score, head_reduce="mean", query_reduce="max",
                      chunk_reduce="max"):
    """§3.3 written out with Python loops in float64: per (query, chunk, token, head) similarity, then the
    head, query (masked tokens excluded) and chunk reduces."""
    B, T, Hq, D = q.shape
    C, Hk, _ = k.shape
    red = {"mean": lambda xs: sum(xs) / len(xs), "max": max}
    out = np.full((B, n_docs), -np.inf)
    for b in range(B):
        valid = [t for t in range(T) if mask[b, t]]
        per_doc: dict[int, list[float]] = {}
        for c in range(C):
            per_token = []
            for t in valid:
                hs = []
                for h in range(Hq):
                    qv, kv = q[b, t, h].double(), k[c, h // (Hq // Hk)].double()
                    hs.append(float(qv @ kv / (qv.norm() * kv.norm())) if score == "cosine" else float(qv @ kv) / math.sqrt(D))
                per_token.append(red[head_reduce](hs))
            per_doc.setdefault(int(chunk_doc[c]), []).append(
                per_token[-1] if query_reduce == "last" else red[query_reduce](per_token))
        for d, xs in per_doc.items():
            out[b, d] = red[chunk_reduce](xs)
    return out


@pytest.mark.parametrize("score", ["cosine", "dot"])
def test_doc_scores_equal_brute_force(score):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 3, 4, 8, generator=g)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    k = torch.randn(7, 2, 8, generator=g)
    chunk_doc = torch.tensor([0, 0, 1, 2, 2, 2, 3])
    got = doc_scores(chunk_scores(q, mask, k, score=score), chunk_doc, 4)
    np.testing.assert_allclose(got.numpy(), _brute_doc_scores(q, mask, k, chunk_doc, 4, score), atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(combo=st.sampled_from(list(itertools.product(["cosine", "dot"], ["mean", "max"], ["max", "mean", "last"],
                                                     ["max", "mean"]))),
       B=st.integers(1, 3), T=st.integers(1, 5), hk=st.sampled_from([(1, 1), (2, 1), (4, 2), (4, 4)]),
       C=st.integers(1, 9), seed=st.integers(0, 2**31 - 1))
def test_every_reducer_combination_equals_brute_force(combo, B, T, hk, C, seed):
    """Training scores (with the folded head-mean + query-mean path) == the loop formula, masks included
    (query tokens masked off at the front, as BOS is: "last" is the last valid token either way)."""
    score, head_reduce, query_reduce, chunk_reduce = combo
    g = torch.Generator().manual_seed(seed)
    Hq, Hk = hk
    q = torch.randn(B, T, Hq, 6, generator=g, dtype=torch.float64).float()
    k = torch.randn(C, Hk, 6, generator=g, dtype=torch.float64).float()
    lead = torch.randint(0, T, (B,), generator=g)                     # masked-off leading tokens (< T)
    mask = torch.arange(T)[None, :] >= lead[:, None]
    chunk_doc = torch.sort(torch.randint(0, C, (C,), generator=g)).values
    n_docs = int(chunk_doc.max()) + 1
    got = doc_scores(chunk_scores(q, mask, k, score=score, head_reduce=head_reduce, query_reduce=query_reduce),
                     chunk_doc, n_docs, chunk_reduce=chunk_reduce)
    want = _brute_doc_scores(q, mask, k, chunk_doc, n_docs, score, head_reduce, query_reduce, chunk_reduce)
    owned = np.isin(np.arange(n_docs), chunk_doc.numpy())
    np.testing.assert_allclose(got.numpy()[:, owned], want[:, owned], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("score,head_reduce,query_reduce,chunk_reduce",
                         [("cosine", "mean", "max", "max"), ("dot", "mean", "max", "max"),
                          ("cosine", "max", "mean", "mean"), ("dot", "mean", "last", "max")])
def test_scores_rank_like_runtime_router(score, head_reduce, query_reduce, chunk_reduce):
    from msa_memory.routing import RouterIndex, RoutingConfig

    g = torch.Generator().manual_seed(2)
    k = torch.randn(40, 2, 16, generator=g)
    chunk_doc = torch.sort(torch.randint(0, 12, (40,), generator=g)).values
    chunk_doc[:12] = torch.arange(12)  # every doc owns a chunk
    chunk_doc = torch.sort(chunk_doc).values
    q = torch.randn(1, 5, 4, 16, generator=g)
    idx = RouterIndex([k], chunk_doc.numpy(), np.arange(100, 112),
                      RoutingConfig(score=score, head_reduce=head_reduce, query_reduce=query_reduce,
                                    chunk_reduce=chunk_reduce, top_k=5))
    theirs = idx.doc_scores(0, q[0])
    ours = doc_scores(chunk_scores(q, torch.ones(1, 5, dtype=torch.bool), k, score=score, head_reduce=head_reduce,
                                   query_reduce=query_reduce), chunk_doc, 12, chunk_reduce=chunk_reduce)[0]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert torch.equal(ours.topk(5).indices, theirs.topk(5).indices)


def test_scores_reject_bad_config():
    with pytest.raises(ConfigError, match="score"):
        chunk_scores(torch.zeros(1, 1, 2, 4), torch.ones(1, 1, dtype=torch.bool), torch.zeros(3, 1, 4), score="l2")
    with pytest.raises(ConfigError, match="heads"):
        chunk_scores(torch.zeros(1, 1, 3, 4), torch.ones(1, 1, dtype=torch.bool), torch.zeros(3, 2, 4))


@pytest.mark.parametrize("kw", [{}, {"shifted_layers": (1,)}, {"query_suffix": "x", "suffix_layers": (2,)},
                                {"score": "dot", "head_reduce": "max", "query_reduce": "mean", "chunk_reduce": "mean"}])
def test_adapter_doc_scores_sum_the_layers_and_their_suffix_queries(kw):
    from msa_memory.routing.adapter import RouterAdapter
    from msa_memory.routing.config import RouterConfig

    torch.manual_seed(3)
    ad = RouterAdapter(RouterConfig((1, 2), n_q_heads=4, n_kv_heads=2, head_dim=8, hidden_size=16, **kw))
    for p in ad.parameters():
        torch.nn.init.normal_(p)
    keys = {1: torch.randn(30, 2, 8), 2: torch.randn(20, 2, 8)}
    maps = {1: torch.sort(torch.randint(0, 6, (30,))).values, 2: torch.sort(torch.randint(0, 6, (20,))).values}
    xq = {l: torch.randn(3, 4, 16) for l in (1, 2)}
    mask = torch.tensor([[True] * 4, [False, True, True, True], [True, True, False, False]])
    xs = {2: torch.randn(3, 1, 16)} if ad.config.suffix_layers else None
    got = adapter_doc_scores(ad, keys, maps, 6, xq, mask, xs)
    c = ad.config
    kw2 = dict(score=c.score, head_reduce=c.head_reduce, query_reduce=c.query_reduce)
    want = sum(doc_scores(chunk_scores(ad.router_q(l, xq[l]), mask, keys[l], **kw2), maps[l], 6,
                          chunk_reduce=c.chunk_reduce) for l in (1, 2))
    if xs is not None:
        want = want + doc_scores(chunk_scores(ad.router_sq(2, xs[2]), torch.ones(3, 1, dtype=torch.bool), keys[2], **kw2),
                                 maps[2], 6, chunk_reduce=c.chunk_reduce)
    torch.testing.assert_close(got, want)
