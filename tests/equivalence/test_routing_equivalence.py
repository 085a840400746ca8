"""Routing (msa_memory.routing) equals a brute-force numpy implementation of msa-reference §3.3.

Covers every score × head-reduce × query-reduce × chunk-reduce combination with hypothesis-drawn
shapes (GQA ratios, tiles smaller than C, documents of 1..n chunks, unsorted chunk→doc maps), in
float32 (exact ranking) and bfloat16 (scores within bf16 tolerance of the oracle's).
Run: .venv/bin/python -m pytest tests/equivalence/test_routing_equivalence.py -q
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from msa_memory.errors import ConfigError, RuntimeMemoryError
from msa_memory.routing import RouterIndex, RoutingConfig

COMBOS = list(itertools.product(("dot", "cosine"), ("mean", "max"), ("max", "mean", "last"), ("max", "mean")))


def oracle_doc_scores(q, keys, chunk_doc, n_docs, score, head_reduce, query_reduce, chunk_reduce):
    """Brute force, loops over the formula: q (T,Hq,D), keys (C,H,D) float64 numpy."""
    T, Hq, D = q.shape
    C, H, _ = keys.shape
    rep = Hq // H
    if score == "cosine":
        q = q / np.maximum(np.linalg.norm(q, axis=-1, keepdims=True), 1e-12)
        keys = keys / np.maximum(np.linalg.norm(keys, axis=-1, keepdims=True), 1e-12)
        scale = 1.0
    else:
        scale = 1.0 / np.sqrt(D)
    S = np.zeros((T, C, Hq))
    for t in range(T):
        for c in range(C):
            for h in range(Hq):
                S[t, c, h] = float(np.dot(q[t, h], keys[c, h // rep])) * scale
    Stc = S.mean(-1) if head_reduce == "mean" else S.max(-1)
    if query_reduce == "max":
        Sc = Stc.max(0)
    elif query_reduce == "mean":
        Sc = Stc.mean(0)
    else:
        Sc = Stc[-1]
    out = np.empty(n_docs)
    for d in range(n_docs):
        vals = Sc[chunk_doc == d]
        out[d] = vals.max() if chunk_reduce == "max" else vals.mean()
    return out


@st.composite
def routing_case(draw):
    H = draw(st.sampled_from([1, 2]))
    rep = draw(st.sampled_from([1, 2, 4]))
    D = draw(st.sampled_from([4, 8]))
    T = draw(st.integers(1, 4))
    counts = draw(st.lists(st.integers(1, 4), min_size=1, max_size=9))
    seed = draw(st.integers(0, 2**31 - 1))
    tile = draw(st.integers(1, 40))
    k = draw(st.integers(1, 12))
    shuffle = draw(st.booleans())
    return H, rep, D, T, counts, seed, tile, k, shuffle


def _build(case, combo, dtype, compute_dtype="auto"):
    H, rep, D, T, counts, seed, tile, k, shuffle = case
    rng = np.random.default_rng(seed)
    chunk_doc = np.repeat(np.arange(len(counts)), counts)
    if shuffle:
        chunk_doc = rng.permutation(chunk_doc)
    C = chunk_doc.shape[0]
    keys = torch.from_numpy(rng.standard_normal((C, H, D)).astype(np.float32)).to(dtype)
    q = torch.from_numpy(rng.standard_normal((T, H * rep, D)).astype(np.float32))
    score, hr, qr, cr = combo
    cfg = RoutingConfig(score=score, head_reduce=hr, query_reduce=qr, chunk_reduce=cr, top_k=k, tile_chunks=tile,
                        compute_dtype=compute_dtype)
    doc_ids = 1000 + 7 * np.arange(len(counts))
    index = RouterIndex([keys], chunk_doc, doc_ids, cfg)
    # the oracle sees exactly the stored (possibly bf16-rounded) keys
    ref = oracle_doc_scores(q.double().numpy(), keys.double().numpy(), chunk_doc, len(counts), score, hr, qr, cr)
    return index, q, ref, doc_ids


@pytest.mark.parametrize("combo", COMBOS, ids=["-".join(c) for c in COMBOS])
@settings(max_examples=25, deadline=None)
@given(case=routing_case())
def test_route_float32_equals_numpy_oracle(combo, case):
    index, q, ref, doc_ids = _build(case, combo, torch.float32)
    got = index.doc_scores(0, q).double().numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    res = index.route(0, q)
    k = min(case[7], len(ref))
    assert len(res.doc_ids) == k
    np.testing.assert_allclose(res.scores, np.sort(ref)[::-1][:k], rtol=1e-5, atol=1e-5)
    # chosen documents are the oracle's top-k up to ties within tolerance
    kth = np.sort(ref)[::-1][k - 1]
    assert np.all(ref[res.doc_index] >= kth - 1e-5)
    np.testing.assert_array_equal(res.doc_ids, doc_ids[res.doc_index])


@pytest.mark.parametrize("combo", COMBOS[::3], ids=["-".join(c) for c in COMBOS[::3]])
@settings(max_examples=15, deadline=None)
@given(case=routing_case(), compute=st.sampled_from(["auto", "bfloat16"]))
def test_route_bfloat16_within_bf16_tolerance_of_oracle(combo, case, compute):
    index, q, ref, _ = _build(case, combo, torch.bfloat16, compute)
    if compute == "bfloat16":
        assert index.keys[0].dtype == torch.bfloat16      # the bf16 GEMM path itself, not the widened one
    got = index.doc_scores(0, q).double().numpy()
    tol = 0.02 * (np.abs(ref).max() + 1.0)
    np.testing.assert_allclose(got, ref, atol=tol)
    res = index.route(0, q)
    kth = np.sort(ref)[::-1][len(res.doc_index) - 1]
    assert np.all(ref[res.doc_index] >= kth - 2 * tol)


def test_route_multi_layer_each_layer_uses_own_keys():
    rng = np.random.default_rng(0)
    chunk_doc = np.array([0, 0, 1, 2, 2, 2])
    k0 = torch.from_numpy(rng.standard_normal((6, 1, 4)).astype(np.float32))
    k1 = -k0
    index = RouterIndex([k0, k1], chunk_doc, [5, 6, 7], RoutingConfig(top_k=1, query_reduce="mean", chunk_reduce="mean"))
    q = torch.from_numpy(rng.standard_normal((2, 2, 4)).astype(np.float32))
    s0, s1 = index.doc_scores(0, q), index.doc_scores(1, q)
    torch.testing.assert_close(s0, -s1)


def test_resident_keys_widen_only_where_bf16_is_emulated():
    from msa_memory.routing import cpu_has_native_bf16, resident_dtype

    want = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    assert resident_dtype(torch.bfloat16, "cpu") == want
    assert resident_dtype(torch.bfloat16, "cpu", "bfloat16") == torch.bfloat16
    assert resident_dtype(torch.float32, "cpu") == torch.float32


def test_routing_config_rejects_unknown_reducer():
    with pytest.raises(ConfigError, match="head_reduce='median'"):
        RoutingConfig(head_reduce="median")
    cfg = RoutingConfig.from_dict({"head_reduce_method": "max", "top_k_docs": 4, "unrelated": 1})
    assert cfg.head_reduce == "max" and cfg.top_k == 4


def test_route_rejects_bad_query_shape_and_empty_index():
    index = RouterIndex([torch.zeros(3, 2, 4)], [0, 1, 1], [1, 2], RoutingConfig())
    with pytest.raises(ConfigError, match="multiple of H=2"):
        index.route(0, torch.zeros(1, 3, 4))
    empty = RouterIndex([torch.zeros(0, 1, 4)], np.zeros(0, np.int64), np.zeros(0, np.int64), RoutingConfig())
    with pytest.raises(RuntimeMemoryError, match="no documents"):
        empty.route(0, torch.zeros(1, 1, 4))
