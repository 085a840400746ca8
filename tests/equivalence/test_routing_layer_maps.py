"""Per-layer chunk → document maps of ``RouterIndex`` equal a brute-force reference, layer by layer.

A router layer that also keeps router keys of a shifted chunk grid gets more key rows than the others
(C_l > C: aligned and shifted chunks, document by document) and its own chunk → document map over
the same documents 0..N-1. Checked here against the loop oracle of ``test_routing_equivalence``
(chunk scores over each layer's own keys, then the per-document max / mean over each layer's own map,
then top-k):

- every score × head-reduce × query-reduce × chunk-reduce combination, float32 keys (chunk-minor CPU
  path, ``kernel="torch"`` too), with sorted maps (what the runtime builds: the segment-reduce path) and
  interleaved maps (the scatter / index_add fallback), documents of one chunk in one layer and many in
  another, and two layers with equal maps (one shared ``_ChunkMap``);
- bf16 keys on the blocked AVX512-BF16 kernel (``layout == "blocked"``, its ``doc_reduce``) and on the
  chunk-minor torch path (``cpu_kernel=False``), within bf16 tolerance;
- the device chunk → document paths run on CPU by hand: each map's ``doc_gather_index`` + amax, and the
  Triton document top-k and fused scores under ``TRITON_INTERPRET=1`` (skipped without triton);
- a hypothesis property over random document / chunk counts per layer;
- the single-map form is unchanged (one map object; bit-identical to equal per-layer maps), and the
  validation errors name the layer.
Run: .venv/bin/python -m pytest tests/equivalence/test_routing_layer_maps.py -q
"""

from __future__ import annotations

import importlib.util
import itertools
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from msa_memory.errors import ConfigError
from msa_memory.routing.kernels import cpu_avx512 as routing_cpu
from msa_memory.routing import RouterIndex, RoutingConfig, doc_gather_index
from test_routing_equivalence import oracle_doc_scores  # the loop oracle (same folder: tests/equivalence)
from test_routing_paths import run_under_triton_interpreter

KERNEL = routing_cpu.available()
COMBOS = list(itertools.product(("dot", "cosine"), ("mean", "max"), ("max", "mean", "last"), ("max", "mean")))
IDS = ["-".join(c) for c in COMBOS]

# aligned-grid chunks per document, and the shifted grid's extra chunks at the layer that has both
ALIGNED = np.array([1, 3, 1, 2, 1, 4, 1])
SHIFTED = np.array([6, 2, 0, 1, 3, 3, 1])        # document 0: 1 chunk at layers 0 / 2, 7 at layer 1


def reference(q, keys, maps, n_docs, combo, k):
    """Per layer: (chunk scores (C_l,), document scores (N,), top-k dense indices), float64, by loops."""
    score, hr, qr, cr = combo
    q64 = q.double().numpy()
    out = []
    for kl, m in zip(keys, maps):
        k64 = kl.double().numpy()
        C = k64.shape[0]
        cs = oracle_doc_scores(q64, k64, np.arange(C), C, score, hr, qr, "max")      # identity map: chunk scores
        ds = oracle_doc_scores(q64, k64, np.asarray(m), n_docs, score, hr, qr, cr)
        out.append((cs, ds, np.argsort(-ds, kind="stable")[:k]))
    return out


def layer_maps(kind, rng):
    """Maps of three layers: aligned (0), aligned + shifted (1), a copy of layer 0's map (2)."""
    n = len(ALIGNED)
    maps = [np.repeat(np.arange(n), ALIGNED), np.repeat(np.arange(n), ALIGNED + SHIFTED)]
    if kind == "interleaved":
        maps = [rng.permutation(m) for m in maps]
    return [*maps, maps[0].copy()]


def build(combo, kind, dtype=torch.float32, seed=0, k=4, **cfg):
    rng = np.random.default_rng(seed)
    maps = layer_maps(kind, rng)
    H, rep, D, T = 2, 2, 8, 3
    keys = [torch.from_numpy(rng.standard_normal((len(m), H, D)).astype(np.float32)).to(dtype) for m in maps]
    q = torch.from_numpy(rng.standard_normal((T, H * rep, D)).astype(np.float32))
    score, hr, qr, cr = combo
    config = RoutingConfig(score=score, head_reduce=hr, query_reduce=qr, chunk_reduce=cr, top_k=k, tile_chunks=5,
                           **cfg)
    doc_ids = 100 + 3 * np.arange(len(ALIGNED))
    index = RouterIndex(keys, maps, doc_ids, config)
    return index, keys, maps, q, doc_ids


def check_against_reference(index, keys, maps, q, doc_ids, combo, kernel="auto", tol=1e-5, rank_tol=1e-5):
    k = index.config.top_k
    for layer, (cs, ds, top) in enumerate(reference(q, keys, maps, index.n_docs, combo, k)):
        got_cs = index.chunk_scores(layer, q, kernel)
        assert got_cs.shape == (len(maps[layer]),) == (index.layer_chunks(layer),)
        np.testing.assert_allclose(got_cs.double().numpy(), cs, rtol=tol, atol=tol, err_msg=f"layer {layer}")
        got_ds = index.doc_scores(layer, q, kernel).double().numpy()
        np.testing.assert_allclose(got_ds, ds, rtol=tol, atol=tol, err_msg=f"layer {layer}")
        res = index.route(layer, q)
        np.testing.assert_allclose(res.scores, ds[top], rtol=tol, atol=tol, err_msg=f"layer {layer}")
        assert np.all(ds[res.doc_index] >= ds[top[-1]] - rank_tol)     # the reference's top-k, up to near-ties
        np.testing.assert_array_equal(res.doc_ids, doc_ids[res.doc_index])
        if tol <= 1e-5:
            assert res.doc_index.tolist() == top.tolist()
        packed = index.route_device(layer, q, k, kernel)
        vals, idx = torch.topk(index.doc_scores(layer, q, kernel), k)
        torch.testing.assert_close(packed[0].float(), vals)
        assert packed[1].long().tolist() == idx.tolist()


@pytest.mark.parametrize("kind", ["sorted", "interleaved"])
@pytest.mark.parametrize("combo", COMBOS, ids=IDS)
def test_per_layer_maps_float32_equal_reference(combo, kind):
    index, keys, maps, q, doc_ids = build(combo, kind)
    assert index.layout == "chunk_minor" and index.n_layers == 3
    assert [index.layer_chunks(i) for i in range(3)] == [len(m) for m in maps] == [13, 29, 13]
    assert index._maps[0] is index._maps[2] and index._maps[1] is not index._maps[0]   # equal maps: one state
    assert (index._maps[1].lengths is not None) == (kind == "sorted")
    assert index.n_chunks == 13 and index.chunk_doc.tolist() == maps[0].tolist()
    assert index.doc_chunk_count.tolist() == ALIGNED.tolist()
    check_against_reference(index, keys, maps, q, doc_ids, combo)
    check_against_reference(index, keys, maps, q, doc_ids, combo, kernel="torch")


@pytest.mark.parametrize("path", ["blocked", "blocked-torch", "chunk_minor"])
@pytest.mark.parametrize("kind", ["sorted", "interleaved"])
@pytest.mark.parametrize("combo", COMBOS[::3], ids=IDS[::3])
def test_per_layer_maps_bf16_within_tolerance_of_reference(combo, kind, path):
    """bf16 keys: the blocked AVX512-BF16 kernel (and its ``kernel="torch"`` tile loop), or chunk-minor torch."""
    if path.startswith("blocked") and not KERNEL:
        pytest.skip("no AVX512-BF16 CPU routing kernel here (CPU or build)")
    index, keys, maps, q, doc_ids = build(combo, kind, torch.bfloat16, seed=1, compute_dtype="bfloat16",
                                          cpu_kernel=path != "chunk_minor")
    assert index.layout == ("chunk_minor" if path == "chunk_minor" else "blocked")
    for layer in range(3):                                              # unpacked with its own C_l
        want = keys[layer]
        if combo[0] == "cosine":                                        # normalized once, at load
            want = torch.nn.functional.normalize(want.float(), dim=-1).bfloat16()
        torch.testing.assert_close(index.keys[layer], want, rtol=0, atol=0)
    # the oracle sees the stored bf16 keys; the kernels also round the folded query rows to bf16
    ref = reference(q, keys, maps, index.n_docs, combo, 1)
    tol = 0.02 * (max(np.abs(r[1]).max() for r in ref) + 1.0)
    check_against_reference(index, keys, maps, q, doc_ids, combo, kernel="torch" if path == "blocked-torch" else "auto",
                            tol=tol, rank_tol=2 * tol)


@pytest.mark.skipif(not KERNEL, reason="no AVX512-BF16 CPU routing kernel here (CPU or build)")
def test_per_layer_maps_blocked_doc_reduce_kernel_and_run_time_fallback(monkeypatch):
    """Blocked keys: each layer's sorted map goes through ``routing_cpu.doc_reduce`` with its own offsets; a
    kernel failing at run time moves every layer (each with its own C_l) to the chunk-minor layout."""
    combo = ("dot", "max", "max", "max")
    index, keys, _, q, _ = build(combo, "sorted", torch.bfloat16, seed=2, compute_dtype="bfloat16")
    assert index.layout == "blocked"
    before = [index.doc_scores(layer, q) for layer in range(3)]
    calls = []
    real = routing_cpu.doc_reduce
    monkeypatch.setattr(routing_cpu, "doc_reduce",
                        lambda cs, off, *a: (calls.append(len(off) - 1), real(cs, off, *a))[1])
    for layer in range(3):
        torch.testing.assert_close(index.doc_scores(layer, q), before[layer], rtol=0, atol=0)
        want = torch.segment_reduce(index.chunk_scores(layer, q), "max", lengths=index._maps[layer].lengths)
        torch.testing.assert_close(before[layer], want, rtol=1e-6, atol=1e-6)
    assert calls == [len(ALIGNED)] * 3

    def boom(*a, **k):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(routing_cpu, "score_blocked", boom)
    with pytest.warns(RuntimeWarning, match="chunk-minor layout"):
        index.doc_scores(1, q)
    assert index.layout == "chunk_minor"
    for layer in range(3):
        torch.testing.assert_close(index.keys[layer], keys[layer], rtol=0, atol=0)
        torch.testing.assert_close(index.doc_scores(layer, q), before[layer], rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("chunk_reduce", ["max", "mean"])
def test_per_layer_maps_device_gather_and_scatter_paths_on_cpu(chunk_reduce):
    """The device chunk → document reduce, run on CPU by hand: each sorted map's gather index + amax (what
    ``_ChunkMap`` builds off the CPU), and with no run tables the scatter_reduce_ / index_add_ fallback."""
    combo = ("dot", "mean", "max", chunk_reduce)
    index, _, _, q, _ = build(combo, "sorted", seed=3)
    want = [index.doc_scores(layer, q) for layer in range(3)]          # segment_reduce over the runs
    for m in {id(m): m for m in index._maps}.values():
        m.gather = torch.from_numpy(doc_gather_index(m.runs[0].numpy(), m.runs[1].numpy()))
        m.lengths = m.offsets = None
    assert index._maps[1].gather.shape == (len(ALIGNED), (ALIGNED + SHIFTED).max())
    for layer in range(3):
        torch.testing.assert_close(index.doc_scores(layer, q), want[layer], rtol=1e-6, atol=1e-6)
    for m in index._maps:
        m.gather = None
    for layer in range(3):
        torch.testing.assert_close(index.doc_scores(layer, q), want[layer], rtol=1e-6, atol=1e-6)


def test_single_map_form_is_one_shared_state_and_equals_equal_per_layer_maps():
    rng = np.random.default_rng(4)
    chunk_doc = np.repeat(np.arange(6), [2, 1, 3, 1, 1, 4])
    keys = [torch.from_numpy(rng.standard_normal((12, 1, 8)).astype(np.float32)) for _ in range(3)]
    q = torch.from_numpy(rng.standard_normal((4, 2, 8)).astype(np.float32))
    cfg = RoutingConfig(top_k=3)
    shared = RouterIndex(keys, chunk_doc, np.arange(6), cfg)
    listed = RouterIndex(keys, chunk_doc.tolist(), np.arange(6), cfg)                 # a list of ints: ONE map
    same = RouterIndex(keys, [chunk_doc] * 3, np.arange(6), cfg)
    copies = RouterIndex(keys, (chunk_doc.copy(), list(chunk_doc), torch.from_numpy(chunk_doc)), np.arange(6), cfg)
    for index in (shared, listed, same, copies):
        assert len({id(m) for m in index._maps}) == 1 and index._maps[0] is index._map0
        assert index.n_chunks == 12 and [index.layer_chunks(i) for i in range(3)] == [12] * 3
        for layer in range(3):
            assert torch.equal(index.doc_scores(layer, q), shared.doc_scores(layer, q))
            assert index.route(layer, q).doc_index.tolist() == shared.route(layer, q).doc_index.tolist()


def test_per_layer_map_validation_names_the_layer():
    keys = [torch.zeros(3, 1, 4), torch.zeros(5, 1, 4)]
    maps = [np.array([0, 0, 1]), np.array([0, 1, 1, 0, 1])]
    RouterIndex(keys, maps, [7, 8], RoutingConfig())                                  # valid
    with pytest.raises(ConfigError, match="gives 3 chunk → document maps for 2 router layers"):
        RouterIndex(keys, [*maps, maps[0]], [7, 8], RoutingConfig())
    with pytest.raises(ConfigError, match="gives 1 chunk → document maps for 2 router layers"):
        RouterIndex(keys, [maps[1]], [7, 8], RoutingConfig())
    with pytest.raises(ConfigError, match=r"layer 1 have 5 rows but its chunk → document map has 3 chunks"):
        RouterIndex(keys, [maps[0], maps[0]], [7, 8], RoutingConfig())
    with pytest.raises(ConfigError, match=r"layer 0 have 3 rows but its chunk → document map has 5 chunks"):
        RouterIndex(keys, [maps[1], maps[1]], [7, 8], RoutingConfig())
    with pytest.raises(ConfigError, match=r"one chunk of layer 1; 1 documents have none \(dense indices \[1\]\)"):
        RouterIndex(keys, [maps[0], np.array([0, 0, 0, 0, 0])], [7, 8], RoutingConfig())
    with pytest.raises(ConfigError, match=r"chunk_doc of layer 1 must index 0\.\.1, got range \[0, 2\]"):
        RouterIndex(keys, [maps[0], np.array([0, 1, 2, 0, 1])], [7, 8], RoutingConfig())
    with pytest.raises(ConfigError, match="map of layer 1 must be 1-D"):
        RouterIndex(keys, [maps[0], np.zeros((5, 1), np.int64)], [7, 8], RoutingConfig())
    with pytest.raises(ConfigError, match=r"Router keys of layer 0 must be \(C=3, H, D\)"):
        RouterIndex([torch.zeros(3, 4), keys[1]], maps, [7, 8], RoutingConfig())


@st.composite
def layer_maps_case(draw):
    n_docs = draw(st.integers(1, 8))
    n_layers = draw(st.integers(1, 3))
    counts = [draw(st.lists(st.integers(1, 5), min_size=n_docs, max_size=n_docs)) for _ in range(n_layers)]
    shuffle = draw(st.lists(st.booleans(), min_size=n_layers, max_size=n_layers))
    combo = draw(st.sampled_from(COMBOS))
    path = draw(st.sampled_from(["float32", "bf16-chunk_minor"] + (["bf16-blocked"] if KERNEL else [])))
    H, rep = draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2, 4]))
    T, tile, k = draw(st.integers(1, 4)), draw(st.integers(1, 25)), draw(st.integers(1, 10))
    return n_docs, counts, shuffle, combo, path, H, rep, T, tile, k, draw(st.integers(0, 2**31 - 1))


@settings(max_examples=60, deadline=None)
@given(case=layer_maps_case())
def test_per_layer_routing_equals_reference_property(case):
    n_docs, counts, shuffle, combo, path, H, rep, T, tile, k, seed = case
    rng = np.random.default_rng(seed)
    maps = [np.repeat(np.arange(n_docs), c) for c in counts]
    maps = [rng.permutation(m) if s else m for m, s in zip(maps, shuffle)]
    dtype = torch.float32 if path == "float32" else torch.bfloat16
    keys = [torch.from_numpy(rng.standard_normal((len(m), H, 8)).astype(np.float32)).to(dtype) for m in maps]
    q = torch.from_numpy(rng.standard_normal((T, H * rep, 8)).astype(np.float32))
    score, hr, qr, cr = combo
    cfg = RoutingConfig(score=score, head_reduce=hr, query_reduce=qr, chunk_reduce=cr, top_k=k, tile_chunks=tile,
                        compute_dtype="float32" if dtype == torch.float32 else "bfloat16",
                        cpu_kernel=path == "bf16-blocked")
    index = RouterIndex(keys, maps, np.arange(n_docs) * 10, cfg)
    assert index.layout == ("blocked" if path == "bf16-blocked" else "chunk_minor")
    distinct = {tuple(m.tolist()) for m in maps}
    assert len({id(m) for m in index._maps}) == len(distinct)
    ref = reference(q, keys, maps, n_docs, combo, min(k, n_docs))
    for layer, (_, ds, top) in enumerate(ref):
        got = index.doc_scores(layer, q).double().numpy()
        tol = 1e-5 if dtype == torch.float32 else 0.02 * (np.abs(ds).max() + 1.0)
        np.testing.assert_allclose(got, ds, rtol=tol, atol=tol)
        res = index.route(layer, q)
        assert len(res.doc_index) == min(k, n_docs)
        np.testing.assert_allclose(res.scores, ds[top], rtol=tol, atol=tol)
        assert np.all(ds[res.doc_index] >= ds[top[-1]] - 2 * tol)


_TRITON_SCRIPT = textwrap.dedent("""
    import numpy as np, torch
    from msa_memory.routing import RouterIndex, RoutingConfig
    g = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    a = rng.integers(1, 4, 300)
    maps = [np.repeat(np.arange(300), a), np.repeat(np.arange(300), a + rng.integers(0, 4, 300))]
    keys = [torch.randn(len(m), 1, 16, generator=g) for m in maps]
    q = torch.randn(5, 2, 16, generator=g)
    fast = RouterIndex(keys, maps, np.arange(300), RoutingConfig(top_k=16))
    slow = RouterIndex(keys, maps, np.arange(300), RoutingConfig(top_k=16, fused_topk=False, fused_scores=False))
    assert fast.kernel_for("doc_topk", 0, k=16) == fast.kernel_for("doc_topk", 1, k=16) == "triton_doc_topk"
    for layer in range(2):
        fused = fast.chunk_scores(layer, q, kernel="triton")
        assert fused.shape == (len(maps[layer]),)
        assert torch.allclose(fused, slow.chunk_scores(layer, q), rtol=1e-4, atol=1e-4), layer
        r, e = fast.route(layer, q), slow.route(layer, q)
        assert r.doc_index.tolist() == e.doc_index.tolist(), layer
        assert np.allclose(r.scores, e.scores, rtol=1e-5, atol=1e-5), layer
    assert not fast.broken_kernels
    print("TRITON-OK")
""")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed (GPU hosts check it)")
def test_per_layer_maps_triton_doc_topk_under_interpreter():
    """Fused scores (C_l rows each) and ``doc_max_topk`` over each layer's own runs equal the eager torch path."""
    run_under_triton_interpreter(_TRITON_SCRIPT)
