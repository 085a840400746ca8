"""The fast routing paths equal the eager / brute-force path, on CPU.

- the GEMV / folded-mean / tile-loop paths of ``score_tile`` (row-major keys, the device layout) and
  ``score_tile_cm`` (chunk-minor keys, the CPU layout) against a plain einsum of the formula;
- ``pad_query_rows`` (what lets one CUDA graph serve many query lengths) changes no score;
- the reused scratch buffer gives the same scores as fresh allocations, across query shapes;
- ``route_device`` (what the CUDA graph captures, packed (2, k) float64) equals top-k of ``doc_scores``;
- the fused Triton kernel equals the eager path under ``TRITON_INTERPRET=1`` (skipped where triton is
  not installed; bf16 and the real GPU are checked by ``bench_runtime.py --gpu-check`` on a GPU).
The CUDA graph itself (capture + replay) runs only on a GPU: ``bench_runtime.py --gpu-check`` compares
it with the eager path there.
Run: .venv/bin/python -m pytest tests/equivalence/test_routing_paths.py -q
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from msa_memory.errors import ConfigError
from msa_memory.routing import (
    RouterIndex,
    RoutingConfig,
    doc_gather_index,
    pad_query_rows,
    prepare_lhs,
    score_tile,
    score_tile_cm,
    topk_blocked,
)

COMBOS = list(itertools.product(("dot", "cosine"), ("mean", "max"), ("max", "mean", "last")))


def einsum_chunk_scores(q, keys, score, head_reduce, query_reduce):
    """The formula in one einsum, float64: q (T,Hq,D), keys (C,H,D)."""
    q, keys = q.double(), keys.double()
    D = q.shape[-1]
    rep = q.shape[1] // keys.shape[1]
    if score == "cosine":
        q = torch.nn.functional.normalize(q, dim=-1)
        keys = torch.nn.functional.normalize(keys, dim=-1)
        scale = 1.0
    else:
        scale = D ** -0.5
    S = torch.einsum("thd,chd->tch", q, keys.repeat_interleave(rep, dim=1)) * scale   # (T, C, Hq)
    S = S.mean(-1) if head_reduce == "mean" else S.amax(-1)
    return {"max": S.amax(0), "mean": S.mean(0), "last": S[-1]}[query_reduce]


@pytest.mark.parametrize("combo", COMBOS, ids=["-".join(c) for c in COMBOS])
@settings(max_examples=20, deadline=None)
@given(H=st.sampled_from([1, 2, 3]), rep=st.sampled_from([1, 2, 4]), T=st.integers(1, 9), C=st.integers(1, 70),
       tile=st.integers(1, 80), seed=st.integers(0, 2**31 - 1))
def test_score_paths_equal_einsum(combo, H, rep, T, C, tile, seed):
    score, hr, qr = combo
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(C, H, 8, generator=g)
    q = torch.randn(T, H * rep, 8, generator=g)
    index = RouterIndex([keys], np.arange(C), np.arange(C), RoutingConfig(score=score, head_reduce=hr, query_reduce=qr,
                                                                          tile_chunks=tile))
    want = einsum_chunk_scores(q, keys, score, hr, qr)
    torch.testing.assert_close(index.chunk_scores(0, q).double(), want, rtol=1e-5, atol=1e-5)
    # padding rows for graph buckets changes nothing (max: repeated rows; last: one row; mean: untouched)
    qp = pad_query_rows(q, index.config)
    assert qp.shape[0] & (qp.shape[0] - 1) == 0 or qr == "mean"
    # (equal in exact maths; the GEMM may block a padded R differently, hence rounding-level tolerance)
    torch.testing.assert_close(index.chunk_scores(0, qp), index.chunk_scores(0, q), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("combo", COMBOS, ids=["-".join(c) for c in COMBOS])
@settings(max_examples=15, deadline=None)
@given(H=st.sampled_from([1, 2, 3]), rep=st.sampled_from([1, 2, 4]), T=st.integers(1, 9), C=st.integers(1, 40),
       seed=st.integers(0, 2**31 - 1))
def test_row_major_and_chunk_minor_tiles_equal_einsum(combo, H, rep, T, C, seed):
    """``score_tile`` on (C, G, Dk) keys (the layout devices keep) and ``score_tile_cm`` on (G, Dk, C) keys
    (the CPU layout, which RouterIndex tests above exercise) both equal the formula, on CPU."""
    score, hr, qr = combo
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(C, H, 8, generator=g)
    q = torch.randn(T, H * rep, 8, generator=g)
    cfg = RoutingConfig(score=score, head_reduce=hr, query_reduce=qr)
    k = torch.nn.functional.normalize(keys, dim=-1) if score == "cosine" else keys
    lhs, plan = prepare_lhs(q, cfg, H, torch.float32)
    rows = k.reshape(C, 1, H * 8) if lhs.shape[0] == 1 else k
    want = einsum_chunk_scores(q, keys, score, hr, qr)
    for fn, kv in ((score_tile, rows), (score_tile_cm, rows.permute(1, 2, 0).contiguous())):
        out = torch.empty(C)
        fn(lhs, kv, plan, out)
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5, msg=fn.__name__)


def test_gemv_path_is_taken_for_last_and_folded_mean():
    keys = torch.randn(10, 2, 4)
    for qr in ("last", "mean"):
        lhs, plan = prepare_lhs(torch.randn(5, 4, 4), RoutingConfig(head_reduce="mean", query_reduce=qr), 2, torch.float32)
        assert lhs.shape == (1, 1, 8) and plan.T == 1
    out = torch.empty(10)
    score_tile(lhs, keys.view(10, 1, 8), plan, out)                  # G = R = 1 → torch.mv, no scratch
    torch.testing.assert_close(out, keys.view(10, 8) @ lhs[0, 0])


@pytest.mark.parametrize("qr", ["last", "mean", "max"])
def test_half_precision_chunk_minor_gemv_equals_formula(qr):
    """bf16 CPU keys with a one-row query (head-mean + last / folded mean / T = 1) take the one-row GEMM
    into the scratch instead of ``torch.mv``; over several tiles it equals the formula on the bf16 keys
    (scores are rounded to bf16 once, as the GEMM writes them). ``cpu_kernel=False``: the chunk-minor torch
    path even where the AVX512-BF16 kernel would take bf16 keys (test_routing_cpu_kernel.py tests that)."""
    g = torch.Generator().manual_seed(5)
    keys = torch.randn(1000, 1, 64, generator=g).to(torch.bfloat16)
    T = 1 if qr == "max" else 4
    q = torch.randn(T, 4, 64, generator=g)
    cfg = RoutingConfig(score="dot", head_reduce="mean", query_reduce=qr, tile_chunks=300, compute_dtype="bfloat16",
                        cpu_kernel=False)
    index = RouterIndex([keys], np.arange(1000) // 10, np.arange(100), cfg)
    assert index.keys[0].dtype == torch.bfloat16 and index.layout == "chunk_minor"
    want = einsum_chunk_scores(q, keys.float(), "dot", "mean", qr)
    got = index.chunk_scores(0, q)
    torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2)
    lhs, plan = index._query(0, q)[1:]
    assert lhs.shape[:2] == (1, 1)


def test_scratch_reuse_across_query_shapes_equals_fresh_index():
    g = torch.Generator().manual_seed(3)
    keys = torch.randn(57, 2, 8, generator=g)
    cfg = RoutingConfig(head_reduce="max", tile_chunks=13)
    shared = RouterIndex([keys], np.arange(57) // 3, np.arange(19), cfg)
    for T in (9, 2, 16, 1, 5):                                       # grow, shrink, grow the scratch
        q = torch.randn(T, 4, 8, generator=g)
        fresh = RouterIndex([keys], np.arange(57) // 3, np.arange(19), cfg)
        torch.testing.assert_close(shared.doc_scores(0, q), fresh.doc_scores(0, q), rtol=0, atol=0)


@pytest.mark.parametrize("chunk_reduce", ["max", "mean"])
def test_sorted_map_segment_reduce_equals_scatter_reduce(chunk_reduce):
    """Contiguous documents take the segment_reduce path; a permuted copy of the same index takes scatter."""
    rng = np.random.default_rng(1)
    chunk_doc = np.repeat(np.arange(30), rng.integers(1, 6, 30))
    perm = rng.permutation(len(chunk_doc))
    keys = torch.from_numpy(rng.standard_normal((len(chunk_doc), 1, 8)).astype(np.float32))
    cfg = RoutingConfig(chunk_reduce=chunk_reduce)
    srt = RouterIndex([keys], chunk_doc, np.arange(30), cfg)
    shuf = RouterIndex([keys[perm]], chunk_doc[perm], np.arange(30), cfg)
    assert srt._maps[0].lengths is not None and shuf._maps[0].lengths is None
    q = torch.from_numpy(rng.standard_normal((3, 2, 8)).astype(np.float32))
    torch.testing.assert_close(srt.doc_scores(0, q), shuf.doc_scores(0, q), rtol=1e-6, atol=1e-6)


@given(st.lists(st.integers(1, 9), min_size=1, max_size=60), st.integers(0, 2**31 - 1))
@settings(max_examples=60, deadline=None)
def test_doc_gather_max_equals_scatter_reduce(counts, seed):
    """The device chunk→doc max (gather of doc_gather_index + amax) equals scatter_reduce amax."""
    counts = np.asarray(counts)
    chunk_doc = np.repeat(np.arange(len(counts)), counts)
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    cs = torch.from_numpy(np.random.default_rng(seed).standard_normal(len(chunk_doc)).astype(np.float32))
    want = torch.full((len(counts),), float("-inf")).scatter_reduce_(0, torch.from_numpy(chunk_doc), cs, "amax")
    idx = torch.from_numpy(doc_gather_index(starts, counts))
    assert idx.shape == (len(counts), counts.max())
    assert torch.equal(cs[idx].amax(1), want)


@given(st.integers(1, 5000), st.integers(1, 40), st.sampled_from([8, 32, 1024]), st.booleans(),
       st.integers(0, 2**31 - 1))
@settings(max_examples=60, deadline=None)
def test_topk_blocked_equals_topk(n, k, block, ties, seed):
    """Two-stage top-k gives torch.topk's values; its indices point at those values (ties may reorder)."""
    k = min(k, n)
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 20, n).astype(np.float32) if ties else rng.standard_normal(n).astype(np.float32)
    x = torch.from_numpy(x)
    vals, idx = topk_blocked(x, k, block=block)
    ref_vals, ref_idx = torch.topk(x, k)
    assert torch.equal(vals, ref_vals)
    assert len(set(idx.tolist())) == k and torch.equal(x[idx], vals)
    if not ties:
        assert idx.tolist() == ref_idx.tolist()


def test_scratch_made_in_inference_mode_is_reusable_outside_it():
    """The engine routes under torch.inference_mode(); a later plain call must reuse the same scratch."""
    g = torch.Generator().manual_seed(4)
    index = RouterIndex([torch.randn(40, 1, 8, generator=g)], np.arange(40), np.arange(40), RoutingConfig(tile_chunks=7))
    q = torch.randn(3, 2, 8, generator=g)
    with torch.inference_mode():
        a = index.chunk_scores(0, q)
    b = index.chunk_scores(0, q)                                      # raised "inplace update to inference tensor"
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("chunk_reduce", ["max", "mean"])
def test_route_device_packs_topk_of_doc_scores(chunk_reduce):
    g = torch.Generator().manual_seed(5)
    chunk_doc = np.random.default_rng(0).permutation(np.repeat(np.arange(40), 3))
    index = RouterIndex([torch.randn(120, 1, 16, generator=g)], chunk_doc, 500 + np.arange(40),
                        RoutingConfig(chunk_reduce=chunk_reduce, top_k=7))
    q = torch.randn(6, 4, 16, generator=g)
    packed = index.route_device(0, q, 7)
    assert packed.shape == (2, 7) and packed.dtype == torch.float64
    vals, idx = torch.topk(index.doc_scores(0, q), 7)
    torch.testing.assert_close(packed[0].float(), vals)
    assert packed[1].long().tolist() == idx.tolist()
    res = index.route(0, q, path="eager")
    assert res.doc_index.tolist() == idx.tolist() and res.doc_ids.tolist() == (500 + idx.numpy()).tolist()


def test_route_rejects_graph_path_on_cpu_and_unknown_path():
    index = RouterIndex([torch.zeros(3, 1, 4)], [0, 1, 1], [1, 2], RoutingConfig())
    with pytest.raises(ConfigError, match="CUDA device"):
        index.route(0, torch.zeros(1, 1, 4), path="graph")
    with pytest.raises(ConfigError, match="path='fast'"):
        index.route(0, torch.zeros(1, 1, 4), path="fast")
    with pytest.raises(ConfigError, match="kernel='cuda'"):
        index.chunk_scores(0, torch.zeros(1, 1, 4), kernel="cuda")
    with pytest.raises(ConfigError, match="fused_min_rows"):
        RoutingConfig(fused_min_rows=0)
    with pytest.raises(ConfigError, match="query_reduce 'max'"):
        RouterIndex([torch.zeros(3, 1, 4)], [0, 1, 1], [1, 2], RoutingConfig(query_reduce="mean", head_reduce="max")
                    ).chunk_scores(0, torch.zeros(2, 1, 4), kernel="triton")


_TRITON_SCRIPT = textwrap.dedent("""
    import numpy as np, torch
    from msa_memory.routing import RouterIndex, RoutingConfig
    g = torch.Generator().manual_seed(0)
    for H, rep, T, C, D, hr, score in [(1, 4, 70, 300, 64, "mean", "dot"), (2, 2, 33, 77, 16, "max", "cosine"),
                                       (1, 1, 130, 129, 32, "mean", "dot"), (3, 1, 64, 5, 8, "max", "dot")]:
        keys = torch.randn(C, H, D, generator=g)
        q = torch.randn(T, H * rep, D, generator=g)
        cfg = RoutingConfig(score=score, head_reduce=hr, query_reduce="max", fused_min_rows=1, top_k=3)
        index = RouterIndex([keys], np.arange(C) // 2, np.arange((C + 1) // 2), cfg)
        fused = index.chunk_scores(0, q, kernel="triton")
        eager = index.chunk_scores(0, q, kernel="torch")
        assert torch.allclose(fused, eager, rtol=1e-4, atol=1e-4), (H, rep, T, C, (fused - eager).abs().max())
        assert torch.equal(index.chunk_scores(0, q), fused)          # "auto" takes the kernel under the interpreter
        assert index.route(0, q).doc_index.tolist() == index.route(0, q, path="eager").doc_index.tolist()
    # both MMA orientations of the score kernel (CHUNKS_M), whatever CONFIGS picks by row count
    from msa_memory.routing.kernels import fused_triton as rt
    for G, R, C in ((1, 1, 50), (1, 16, 300), (2, 40, 77), (1, 130, 64)):
        lhs, keys = torch.randn(G, R, 32, generator=g), torch.randn(C, G, 32, generator=g)
        ref = torch.einsum("grd,cgd->cgr", lhs, keys).amax(dim=(1, 2))
        for cm in (0, 1):
            out = rt.fused_max_scores(lhs, keys, torch.empty(C), CHUNKS_M=cm, BLOCK_C=64, BLOCK_R=16, BLOCK_D=16)
            assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5), (G, R, C, cm, (out - ref).abs().max())
    # the document max + top-k kernels (doc_max_topk) against scatter amax + torch.topk
    from msa_memory.routing.kernels import fused_triton as rt
    rng = np.random.default_rng(0)
    for n_docs, max_c, k in [(1, 1, 1), (5, 3, 5), (300, 4, 16), (3000, 6, 64), (700, 1, 7), (12000, 2, 16)]:
        counts = rng.integers(1, max_c + 1, n_docs)
        chunk_doc = np.repeat(np.arange(n_docs), counts)
        cs = torch.from_numpy(rng.standard_normal(len(chunk_doc)).astype(np.float32))
        if n_docs > 10:
            cs[5:40] = 0.25                                   # exact ties
        ds = torch.full((n_docs,), float("-inf")).scatter_reduce_(0, torch.from_numpy(chunk_doc), cs, "amax")
        starts = torch.from_numpy(np.r_[0, np.cumsum(counts)[:-1]].astype(np.int32))
        got = rt.doc_max_topk(cs, starts, torch.from_numpy(counts.astype(np.int32)), int(counts.max()), k)
        want = torch.topk(ds, k).values.double()
        assert torch.equal(got[0], want), (n_docs, k, got[0], want)
        ids = got[1].long()
        assert ids.unique().numel() == k and torch.equal(ds[ids].double(), got[0]), (n_docs, k)
        assert rt.doc_max_topk_plan(n_docs, k)[1] * k <= rt.MERGE_MAX
    assert rt.doc_max_topk_plan(10, 65) is None and rt.doc_max_topk_plan(10**7, 64) is None
    keys = torch.randn(4000, 1, 16, generator=g)
    cd = np.repeat(np.arange(1000), 4)
    q = torch.randn(3, 2, 16, generator=g)
    a = RouterIndex([keys], cd, np.arange(1000), RoutingConfig(top_k=16)).route(0, q)
    b = RouterIndex([keys], cd, np.arange(1000), RoutingConfig(top_k=16, fused_topk=False)).route(0, q)
    assert a.doc_index.tolist() == b.doc_index.tolist() and np.array_equal(a.scores, b.scores)
    print("TRITON-OK")
""")


_INTERPRETER_PATCH = textwrap.dedent("""
    import triton.runtime.interpreter as ti
    _orig = ti._patch_lang_tensor
    def _patched(tensor, *args):               # numpy >= 2.4 refuses int() of a 1-element array
        _orig(tensor, *args)
        tensor.__index__ = lambda self: int(self.handle.data.reshape(-1)[0])
    ti._patch_lang_tensor = _patched
""")


def run_under_triton_interpreter(script: str) -> None:
    """Run ``script`` in a fresh interpreter with ``TRITON_INTERPRET=1`` (set before triton imports) and the
    interpreter patched for numpy >= 2.4; it prints TRITON-OK when its checks pass."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", _INTERPRETER_PATCH + script], env=env, capture_output=True, text=True,
                       timeout=600, check=False)
    assert r.returncode == 0 and "TRITON-OK" in r.stdout, r.stderr[-3000:]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed (GPU hosts check it)")
def test_fused_triton_kernel_equals_eager_under_interpreter():
    run_under_triton_interpreter(_TRITON_SCRIPT)
