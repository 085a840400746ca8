"""Query centring (``RouterIndex.set_query_centres``): a chunk's offset ``mu . k_c`` comes off its score.

Against a float64 reference written from the definition: the document score is the chunk reduce over the
document's chunks of ``max_t head_mean((prep(q_t) - mu) . k_c)`` (``prep``: L2 normalisation per head under
``score="cosine"``, nothing under ``"dot"``, times 1/sqrt(D)), with GQA (two query heads per key head).
Tolerance from the arithmetic: each score is a float32 sum of Hq·D = 64 products of magnitude <= 2 (unit
vectors minus a mean of unit vectors) under cosine, so its rounding error is below 64 · 2 · 2^-24 < 1e-5;
under dot the operands are standard normal (|x| < 6 here), so below 64 · 36 · 2^-24 / 4 < 4e-5 after the
1/sqrt(D) = 1/4 scale.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from msa_memory.errors import ConfigError
from msa_memory.routing import RouterIndex, RoutingConfig
from msa_memory.routing.parallel import ShardedRouterIndex

H, G, D = 2, 2, 16            # key heads, query heads per key head, head dim
ATOL = {"cosine": 1e-5, "dot": 4e-5}


def _inputs(seed: int, n_docs: int = 23, n_layers: int = 2):
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 5, size=n_docs)
    cmap = np.repeat(np.arange(n_docs), counts)
    keys = [torch.from_numpy(rng.standard_normal((len(cmap), H, D)).astype(np.float32)) for _ in range(n_layers)]
    return keys, cmap, np.arange(1000, 1000 + n_docs), rng


def _prep(x: torch.Tensor, score: str) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1) if score == "cosine" else x


def _reference(keys, cmap, q, mu, score, reduce):
    """(N,) float64 document scores of (T, Hq, D) queries ``q`` with centre ``mu`` (Hq, D) or None."""
    k = _prep(keys.double(), score)                                        # (C, H, D)
    qq = _prep(q.double(), score) - (0 if mu is None else mu.double())      # (T, Hq, D)
    scale = 1.0 if score == "cosine" else D ** -0.5
    s = torch.einsum("thgd,chd->tc", qq.view(len(q), H, G, D), k) * scale / (H * G)   # head mean
    cs = s.max(0).values.numpy()
    n = int(cmap.max()) + 1
    out = np.full(n, -np.inf) if reduce == "max" else np.zeros(n)
    if reduce == "max":
        np.maximum.at(out, cmap, cs)
    else:
        np.add.at(out, cmap, cs)
        out /= np.bincount(cmap, minlength=n)
    return out


@given(seed=st.integers(0, 10_000), score=st.sampled_from(["cosine", "dot"]), reduce=st.sampled_from(["max", "mean"]),
       t=st.integers(1, 6))
@settings(max_examples=60, deadline=None)
def test_centred_doc_scores_equal_the_definition(seed, score, reduce, t):
    keys, cmap, ids, rng = _inputs(seed)
    cfg = RoutingConfig(score=score, chunk_reduce=reduce, compute_dtype="float32", top_k=5)
    idx = RouterIndex(keys, cmap, ids, cfg)
    q = torch.from_numpy(rng.standard_normal((t, H * G, D)).astype(np.float32))
    sq = torch.from_numpy(rng.standard_normal((1, H * G, D)).astype(np.float32))
    mu = _prep(torch.from_numpy(rng.standard_normal((50, H * G, D)).astype(np.float32)), score).mean(0)
    mu_s = _prep(torch.from_numpy(rng.standard_normal((50, H * G, D)).astype(np.float32)), score).mean(0)
    plain = [idx.doc_scores(l, q).numpy().copy() for l in range(2)]
    idx.set_query_centres({0: mu, 1: mu}, suffix={1: mu_s})
    assert idx.centred
    for layer in range(2):
        got = idx.doc_scores(layer, q).numpy()
        np.testing.assert_allclose(got, _reference(keys[layer], cmap, q, mu, score, reduce), rtol=0, atol=ATOL[score])
    # the suffix queries take their own centre; a layer without one is scored plain
    np.testing.assert_allclose(idx.doc_scores(1, sq, suffix=True).numpy(),
                               _reference(keys[1], cmap, sq, mu_s, score, reduce), rtol=0, atol=ATOL[score])
    np.testing.assert_allclose(idx.doc_scores(0, sq, suffix=True).numpy(),
                               _reference(keys[0], cmap, sq, None, score, reduce), rtol=0, atol=ATOL[score])
    # route takes the same scores' top-k; clearing the centres gives back the plain scores exactly
    r = idx.route(1, q, 5)
    full = idx.doc_scores(1, q).numpy()
    assert r.scores.tolist() == np.sort(full)[::-1][:5].astype(np.float32).tolist()
    idx.set_query_centres(None)
    assert not idx.centred
    for layer in range(2):
        assert np.array_equal(idx.doc_scores(layer, q).numpy(), plain[layer])


def test_centring_demotes_a_hub_chunk():
    """A document whose chunk leans towards every question's common direction wins every question plain,
    and only the questions it answers once centred."""
    rng = np.random.default_rng(0)
    basis, _ = torch.linalg.qr(torch.from_numpy(rng.standard_normal((D, 5)).astype(np.float32)))
    common, topics = basis[:, 0], basis[:, 1:].T                     # orthonormal: a common direction, 4 topics
    hub = common.clone()                                             # doc 0: a hub
    docs = [0.3 * common + 0.95 * topics[i] for i in range(4)]       # doc i+1: about topic i
    keys = torch.stack([hub, *docs]).view(5, 1, D).repeat(1, H, 1)
    idx = RouterIndex([keys], np.arange(5), np.arange(5), RoutingConfig(score="cosine", compute_dtype="float32", top_k=1))
    qs = [(0.9 * common + 0.44 * topics[i]).view(1, 1, D).repeat(1, H * G, 1) for i in range(4)]
    assert [int(idx.route(0, q, 1).doc_ids[0]) for q in qs] == [0, 0, 0, 0]
    mu = torch.stack([torch.nn.functional.normalize(q[0], dim=-1) for q in qs]).mean(0)
    idx.set_query_centres({0: mu})
    assert [int(idx.route(0, q, 1).doc_ids[0]) for q in qs] == [1, 2, 3, 4]


@pytest.mark.parametrize("n_dev", [2, 3])
def test_sharded_index_centres_every_shard(n_dev):
    keys, cmap, ids, rng = _inputs(n_dev)
    cfg = RoutingConfig(score="cosine", compute_dtype="float32", top_k=6)
    one, sh = RouterIndex(keys, cmap, ids, cfg), ShardedRouterIndex(keys, cmap, ids, cfg, ["cpu"] * n_dev)
    mu = torch.nn.functional.normalize(torch.from_numpy(rng.standard_normal((9, H * G, D)).astype(np.float32)), dim=-1).mean(0)
    for x in (one, sh):
        x.set_query_centres({0: mu, 1: mu})
    assert sh.centred
    assert torch.equal(one._offsets[(False, 0)], torch.cat([s._offsets[(False, 0)] for s in sh.shards]))
    q = torch.from_numpy(rng.standard_normal((3, H * G, D)).astype(np.float32))
    for layer in range(2):
        # each chunk's offset is the same float on either side; the chunk scores' GEMM may block differently
        # over a shard's chunks than over all of them, so scores agree to float32 rounding, not bitwise
        a, b = one.route(layer, q, 6), sh.route(layer, q, 6)
        assert a.doc_ids.tolist() == b.doc_ids.tolist()
        np.testing.assert_allclose(a.scores, b.scores, rtol=0, atol=ATOL["cosine"])
        np.testing.assert_allclose(one.gather_scores(one.doc_scores(layer, q)), sh.gather_scores(sh.doc_scores(layer, q)),
                                   rtol=0, atol=ATOL["cosine"])


def test_bad_centres_are_refused_and_change_nothing():
    keys, cmap, ids, rng = _inputs(1)
    idx = RouterIndex(keys, cmap, ids, RoutingConfig(compute_dtype="float32"))
    q = torch.from_numpy(rng.standard_normal((2, H * G, D)).astype(np.float32))
    before = idx.doc_scores(0, q).numpy().copy()
    with pytest.raises(ConfigError, match=r"must be \(Hq, D=16\)"):
        idx.set_query_centres({0: torch.zeros(H * G, D + 1)})
    with pytest.raises(ConfigError, match="must be"):
        idx.set_query_centres({0: torch.zeros(3, D)})                # Hq not a multiple of H
    with pytest.raises(ConfigError, match="has 2 router layers"):
        idx.set_query_centres({5: torch.zeros(H * G, D)})
    assert not idx.centred and np.array_equal(idx.doc_scores(0, q).numpy(), before)
