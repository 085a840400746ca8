"""Memory Parallel (``routing.parallel``): router keys sharded by document, against one unsharded index.

- :func:`shard_bounds` (hypothesis): contiguous, covering, non-empty shards within one document's chunks of
  an equal share;
- :func:`merge_topk` equals a full sort of the candidates;
- :class:`ShardedRouterIndex` against :class:`RouterIndex` over the same keys (random keys, a shared map and
  per-layer maps of different lengths, max and mean chunk reduce): the same documents and the same scores up
  to fp32 rounding. A document's chunks all sit in one shard, so its reduce sees its own chunk scores, but
  each shard's score GEMM has its own shape and the BLAS may block the Dk-long reduction differently per
  shape (it does on AVX512 hosts: one-ulp differences), so bits are not promised. Bound (u = 2^-24,
  γ_n = n·u/(1 − n·u), Higham §3.1): cosine scores have |s| ≤ 1 and Σ_d |lhs_d·k_d| ≤ 1, so a computed
  document score is within γ_N of exact, N = Dk (the dot) + 2·(D + 2) (query and key normalization) + 2
  (the 1/Hq scale) + n + 1 (a mean over ≤ n chunks); two computations differ by at most 2·γ_N; the routes
  then hold the same scores within that (order statistics move by at most it) and every document one
  chooses scores within twice that of the other's k-th.

``Memory`` over these indexes: ``tests/unit/runtime/test_memory_parallel.py``.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from msa_memory.errors import ConfigError
from msa_memory.routing.parallel import ShardedRouterIndex, merge_topk, shard_bounds
from msa_memory.routing import RouterIndex, RoutingConfig
from msa_memory.testing.numerics import gamma



@given(st.lists(st.integers(1, 50), min_size=1, max_size=60), st.integers(1, 8))
@settings(max_examples=200, deadline=None)
def test_shard_bounds_cover_and_balance(chunks, n):
    c = np.array(chunks)
    if len(c) < n:
        with pytest.raises(ConfigError, match="fewer than the"):
            shard_bounds(c, n)
        return
    b = shard_bounds(c, n)
    assert b[0] == 0 and b[-1] == len(c) and len(b) == n + 1
    assert np.all(np.diff(b) >= 1)
    share = c.sum() / n
    for s in range(n):   # a shard over its share by more than one document only when forced to one document
        got = c[b[s]:b[s + 1]].sum()
        assert got <= share + c.max() or b[s + 1] - b[s] == 1


@given(st.lists(st.floats(-1e3, 1e3, width=32), min_size=1, max_size=40), st.integers(1, 40))
@settings(max_examples=100, deadline=None)
def test_merge_topk_equals_a_full_sort(scores, k):
    s = np.array(scores, dtype=np.float32)
    idx = np.random.default_rng(len(scores)).permutation(len(s)).astype(np.int64)
    pad_s, pad_i = np.full(3, -np.inf), np.full(3, -1)
    got_s, got_i = merge_topk(np.concatenate([s, pad_s]), np.concatenate([idx, pad_i]), k)
    order = sorted(range(len(s)), key=lambda j: (-float(s[j]), idx[j]))[:k]
    assert got_i.tolist() == idx[order].tolist()
    assert got_s.tolist() == s[order].tolist()


def _same_route(a, b, full_a, bound):
    """Routes a (one index) and b (sharded) of the same k: their sorted scores within ``bound`` of each other,
    and every document b chose scores (in a's full scores ``full_a``) within 2·bound of a's k-th."""
    assert len(a.doc_ids) == len(b.doc_ids) and set(b.doc_index.tolist()) <= set(range(len(full_a)))
    np.testing.assert_allclose(b.scores, a.scores, rtol=0, atol=bound)
    assert np.all(full_a[b.doc_index] >= a.scores[-1] - 2 * bound)
    assert b.doc_ids.tolist() == [100 + i for i in b.doc_index.tolist()]


def _random_index_inputs(seed, per_layer):
    rng = np.random.default_rng(seed)
    n_docs, L, H, D = 37, 3, 2, 16
    counts = rng.integers(1, 6, size=n_docs)
    base = np.repeat(np.arange(n_docs), counts)
    maps = []
    for layer in range(L):
        if per_layer and layer == 1:                  # a layer with more rows (a second grid), its own order
            m = np.concatenate([base, np.repeat(np.arange(n_docs), rng.integers(1, 3, size=n_docs))])
            maps.append(m[rng.permutation(len(m))])
        else:
            maps.append(base)
    keys = [torch.from_numpy(rng.standard_normal((len(m), H, D)).astype(np.float32)) for m in maps]
    return keys, (maps if per_layer else base), np.arange(100, 100 + n_docs)


@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("reduce", ["max", "mean"])
@pytest.mark.parametrize("n_dev", [2, 3, 5])
def test_sharded_index_equals_one_index(per_layer, reduce, n_dev):
    keys, cmap, ids = _random_index_inputs(n_dev, per_layer)
    cfg = RoutingConfig(chunk_reduce=reduce, top_k=6)
    one = RouterIndex(keys, cmap, ids, cfg)
    sh = ShardedRouterIndex(keys, cmap, ids, cfg, ["cpu"] * n_dev)
    assert sh.n_docs == one.n_docs and sh.n_chunks == one.n_chunks and sh.nbytes() == one.nbytes()
    q = torch.from_numpy(np.random.default_rng(1).standard_normal((5, 2, 16)).astype(np.float32))
    D, n_max = 16, 7                                   # head dim; most chunks a document has in any layer
    bound = 2 * gamma(2 * D + 2 * (D + 2) + 2 + n_max + 1)      # two computations of a score (Dk = H·D = 2·D)
    for layer in range(3):
        full = one.gather_scores(one.doc_scores(layer, q))
        _same_route(one.route(layer, q, 6), sh.route(layer, q, 6), full, bound)
        np.testing.assert_allclose(sh.gather_scores(sh.doc_scores(layer, q)), full, rtol=0, atol=bound)
        summed_one = one.add(one.doc_scores(layer, q), one.doc_scores(layer, q[:1]))
        summed_sh = sh.add(sh.doc_scores(layer, q), sh.doc_scores(layer, q[:1]))
        summed_bound = 2 * bound + 2 * gamma(1) * 2     # two sums of |s| ≤ 2, one more rounding each
        a, b = one.route_scores(layer, summed_one, 40), sh.route_scores(layer, summed_sh, 40)   # k > N: all
        _same_route(a, b, one.gather_scores(summed_one), summed_bound)
    assert sh.collectives == 3 * 3


def test_sharded_index_refuses_more_shards_than_documents():
    keys, cmap, ids = _random_index_inputs(0, False)
    with pytest.raises(ConfigError, match="fewer than the 40"):
        ShardedRouterIndex(keys, cmap, ids, RoutingConfig(), ["cpu"] * 40)
