"""The AVX512-BF16 CPU routing kernel (``routing_cpu``, blocked bf16 keys) equals the formula and the torch path.

- the kernel's chunk scores against a float64 einsum of the formula on the same bf16 operands (keys and
  the folded query rows rounded to bf16, as the kernel reads them), for R = 1, 2, 5, 16, 32 query rows,
  C not a multiple of the 32-chunk block, every score × head-reduce × query-reduce combination, GQA
  ratios and odd head dims (hypothesis), and its top-k documents against the formula's;
- bf16 keys (blocked), fp16 and fp32 keys (chunk-minor, torch) in one store of layers route alike;
- the fallback: ``MSA_CPU_KERNEL=0``, ``RoutingConfig(cpu_kernel=False)``, a CPU without AVX512-BF16 or a
  failed build give the chunk-minor layout and correct scores; a kernel that fails at run time moves the
  keys to the chunk-minor layout with one warning. These run everywhere; the kernel tests are skipped on
  CPUs without AVX512-BF16 (or where the extension cannot be built). The build happens once (torch's
  extension cache) and is reused by later runs.
Run: .venv/bin/python -m pytest tests/equivalence/test_routing_cpu_kernel.py -q
"""

from __future__ import annotations

import itertools
import logging
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from msa_memory.errors import ConfigError
from msa_memory.runtime import routing_cpu
from msa_memory.runtime.routing import RouterIndex, RoutingConfig, prepare_lhs
from test_routing_paths import einsum_chunk_scores  # the float64 formula (same folder: tests/equivalence)

KERNEL = routing_cpu.available()
needs_kernel = pytest.mark.skipif(not KERNEL, reason="no AVX512-BF16 CPU routing kernel here (CPU or build)")
COMBOS = list(itertools.product(("dot", "cosine"), ("mean", "max"), ("max", "mean", "last")))


def formula_chunk_scores(q, keys, cfg):
    """Float64 formula on the operands the kernel reads: the folded, bf16-rounded rows of ``prepare_lhs``
    against the (normalized, then bf16-rounded) keys, then the head / query reduce of the plan."""
    C, H, D = keys.shape
    k = keys
    if cfg.score == "cosine":
        k = torch.nn.functional.normalize(k.float(), dim=-1).to(keys.dtype)
    lhs, plan = prepare_lhs(q.float(), cfg, H, torch.bfloat16)
    G, R, Dk = lhs.shape
    s = torch.einsum("grd,cgd->grc", lhs.double(), k.double().reshape(C, G, Dk))
    if plan.query_reduce == "max":
        return s.amax((0, 1))
    return s.view(G, plan.T, plan.rep, C).amax((0, 2)).mean(0)




@pytest.fixture
def fresh_kernel_state(monkeypatch):
    """Let a test change MSA_CPU_KERNEL / the CPU check; the cached load result is restored afterwards."""
    routing_cpu._reset_for_tests()
    yield monkeypatch
    monkeypatch.undo()
    routing_cpu._reset_for_tests()
    routing_cpu.load()


def test_pack_unpack_round_trip_any_cpu():
    g = torch.Generator().manual_seed(0)
    for C, H, D in [(1, 1, 2), (31, 1, 8), (32, 2, 4), (33, 3, 6), (1000, 1, 256)]:
        keys = torch.randn(C, H, D, generator=g).to(torch.bfloat16)
        blk = routing_cpu.pack_blocked(keys)
        nb = -(-C // 32)
        assert blk.shape == (nb, H, D // 2, 32, 2)
        assert torch.equal(routing_cpu.unpack_blocked(blk, 0, C), keys)
        assert torch.equal(routing_cpu.unpack_blocked(blk, min(5, C - 1), C), keys[min(5, C - 1):])
        assert torch.equal(blk[1:, 0, 0, 0, 0] if nb > 1 else blk[:0, 0, 0, 0, 0],
                           keys[32::32, 0, 0][:max(0, nb - 1)])
        if C % 32:                                                    # padding chunks are zeros
            assert not routing_cpu.unpack_blocked(blk)[C:].any()


@needs_kernel
@pytest.mark.parametrize("R", [1, 2, 5, 16, 32])
@pytest.mark.parametrize("C", [1, 45, 1007, 70_001])
def test_kernel_rows_equal_formula(R, C):
    """Head-mean + query-max: R = T folded rows against 1 × 256 Gemma-shaped keys; C off the 32-block grid
    (70,001 also splits over the threads at a block that is not a multiple of any grain)."""
    g = torch.Generator().manual_seed(R * 1000 + C)
    keys = torch.randn(C, 1, 256, generator=g).to(torch.bfloat16)
    q = torch.randn(R, 4, 256, generator=g)
    n_docs = max(1, C // 7)
    chunk_doc = np.sort(np.r_[np.arange(n_docs), np.random.default_rng(C).integers(0, n_docs, C - n_docs)])
    cfg = RoutingConfig(top_k=16)
    index = RouterIndex([keys], chunk_doc, np.arange(n_docs) + 100, cfg)
    assert index.layout == "blocked" and index.key_dtype == torch.bfloat16
    lhs = index._query(0, q)[1]
    assert lhs.shape[:2] == (1, R)
    want = formula_chunk_scores(q, keys, cfg)
    got = index.chunk_scores(0, q)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(index.chunk_scores(0, q, kernel="cpu"), got, rtol=0, atol=0)
    # the torch path on the same blocked keys (bf16 GEMM output: bf16 rounding)
    torch.testing.assert_close(index.chunk_scores(0, q, kernel="torch").double(), want, rtol=1e-2, atol=2e-2)
    # top-k documents: the formula's, up to ties at fp32 rounding
    ref = torch.segment_reduce(want, "max", lengths=torch.from_numpy(np.bincount(chunk_doc))).numpy()
    res = index.route(0, q)
    k = min(16, n_docs)
    kth = np.sort(ref)[::-1][k - 1]
    assert len(res.doc_ids) == k and np.all(ref[res.doc_index] >= kth - 1e-5)
    np.testing.assert_allclose(res.scores, np.sort(ref)[::-1][:k], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(res.doc_ids, res.doc_index + 100)


@needs_kernel
@pytest.mark.parametrize("combo", COMBOS, ids=["-".join(c) for c in COMBOS])
@settings(max_examples=12, deadline=None)
@given(H=st.sampled_from([1, 2, 3]), rep=st.sampled_from([1, 2, 4]), T=st.integers(1, 40),
       C=st.integers(1, 300), D=st.sampled_from([2, 8, 34, 64]), seed=st.integers(0, 2**31 - 1))
def test_kernel_equals_formula_every_reduce(combo, H, rep, T, C, D, seed):
    """Every reducer combination (head-max keeps G = H groups of T·rep rows: up to 160 rows, several passes)."""
    score, hr, qr = combo
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(C, H, D, generator=g).to(torch.bfloat16)
    q = torch.randn(T, H * rep, D, generator=g)
    cfg = RoutingConfig(score=score, head_reduce=hr, query_reduce=qr, tile_chunks=37)
    index = RouterIndex([keys], np.arange(C), np.arange(C), cfg)
    assert index.layout == "blocked"
    got = index.chunk_scores(0, q)
    torch.testing.assert_close(got.double(), formula_chunk_scores(q, keys, cfg), rtol=1e-5, atol=1e-5)
    # and within bf16 tolerance of the unrounded formula (what the torch path is held to)
    want = einsum_chunk_scores(q, keys.float(), score, hr, qr)
    torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2 * (1 + want.abs().max().item()))


@needs_kernel
def test_layers_of_every_dtype_route_alike():
    """A bf16 index (blocked, the kernel) and fp16 / fp32 indexes of the same keys (chunk-minor, torch)."""
    g = torch.Generator().manual_seed(7)
    C = 2000 + 13
    keys = [torch.randn(C, 1, 128, generator=g).to(torch.bfloat16) for _ in range(2)]
    chunk_doc = np.arange(C) // 5
    n_docs = chunk_doc[-1] + 1
    q = torch.randn(9, 4, 128, generator=g)
    bf = RouterIndex(keys, chunk_doc, np.arange(n_docs), RoutingConfig(top_k=8))
    f16 = RouterIndex([k.half() for k in keys], chunk_doc, np.arange(n_docs), RoutingConfig(top_k=8))
    f32 = RouterIndex(keys, chunk_doc, np.arange(n_docs), RoutingConfig(top_k=8, compute_dtype="float32"))
    assert (bf.layout, f16.layout, f32.layout) == ("blocked", "chunk_minor", "chunk_minor")
    assert (bf.key_dtype, f16.key_dtype, f32.key_dtype) == (torch.bfloat16, torch.float16, torch.float32)
    assert bf.nbytes() == 2 * (-(-C // 32)) * 32 * 128 * 2 and f32.nbytes() == 2 * C * 128 * 4
    for layer in range(2):
        torch.testing.assert_close(bf.keys[layer], keys[layer], rtol=0, atol=0)
        exact = f32.chunk_scores(layer, q)
        torch.testing.assert_close(bf.chunk_scores(layer, q), exact, rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(f16.chunk_scores(layer, q).float(), exact, rtol=1e-2, atol=1e-2)
        d_bf, d_32 = bf.doc_scores(layer, q), f32.doc_scores(layer, q)
        kth = torch.topk(d_32, 8).values[-1]
        assert bool((d_32[bf.route(layer, q).doc_index] >= kth - 2e-2).all())
        torch.testing.assert_close(d_bf, d_32, rtol=1e-2, atol=1e-2)


def _check_torch_path(index, C, g):
    q = torch.randn(5, 4, 64, generator=g)
    want = einsum_chunk_scores(q, index.keys[0].float(), "dot", "mean", "max")
    torch.testing.assert_close(index.chunk_scores(0, q).double(), want, rtol=2e-2, atol=2e-2)
    with pytest.raises(ConfigError, match="kernel='cpu'"):
        index.chunk_scores(0, q, kernel="cpu")


def test_fallback_when_disabled_by_env(fresh_kernel_state):
    fresh_kernel_state.setenv("MSA_CPU_KERNEL", "0")
    assert routing_cpu.load() is None and not routing_cpu.available()
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(300, 1, 64, generator=g).to(torch.bfloat16)
    index = RouterIndex([keys], np.arange(300) // 3, np.arange(100), RoutingConfig(compute_dtype="bfloat16"))
    assert index.layout == "chunk_minor" and index.key_dtype == torch.bfloat16
    _check_torch_path(index, 300, g)


def test_fallback_when_config_off_or_cpu_lacks_bf16(fresh_kernel_state):
    g = torch.Generator().manual_seed(2)
    keys = torch.randn(100, 1, 64, generator=g).to(torch.bfloat16)
    index = RouterIndex([keys], np.arange(100), np.arange(100), RoutingConfig(compute_dtype="bfloat16",
                                                                              cpu_kernel=False))
    assert index.layout == "chunk_minor"
    _check_torch_path(index, 100, g)
    fresh_kernel_state.setattr(routing_cpu, "cpu_supported", lambda: False)
    routing_cpu._reset_for_tests()
    assert routing_cpu.load() is None
    index = RouterIndex([keys], np.arange(100), np.arange(100), RoutingConfig(compute_dtype="bfloat16"))
    assert index.layout == "chunk_minor"
    _check_torch_path(index, 100, g)


def test_failed_build_logs_one_warning_and_falls_back(fresh_kernel_state, caplog):
    def broken_build():
        raise OSError("no g++ here")

    fresh_kernel_state.delenv("MSA_CPU_KERNEL", raising=False)
    fresh_kernel_state.setattr(routing_cpu, "cpu_supported", lambda: True)
    fresh_kernel_state.setattr(routing_cpu, "_build", broken_build)
    with caplog.at_level(logging.WARNING, logger="msa_memory.runtime.routing_cpu"):
        assert routing_cpu.load() is None
        assert routing_cpu.load() is None                            # remembered: no second attempt, no warning
    assert [r.getMessage() for r in caplog.records if "routing kernel unavailable" in r.getMessage()] == [
        "AVX512-BF16 routing kernel unavailable (OSError: no g++ here); routing uses the torch path. "
        "Set MSA_CPU_KERNEL=0 to skip the build."]
    g = torch.Generator().manual_seed(3)
    keys = torch.randn(100, 1, 64, generator=g).to(torch.bfloat16)
    index = RouterIndex([keys], np.arange(100), np.arange(100), RoutingConfig(compute_dtype="bfloat16"))
    assert index.layout == "chunk_minor"
    _check_torch_path(index, 100, g)


@needs_kernel
def test_kernel_failing_at_run_time_moves_keys_to_chunk_minor(monkeypatch):
    g = torch.Generator().manual_seed(4)
    keys = [torch.randn(203, 2, 32, generator=g).to(torch.bfloat16) for _ in range(2)]
    index = RouterIndex(keys, np.arange(203) // 2, np.arange(102), RoutingConfig(head_reduce="max"))
    assert index.layout == "blocked"
    q = torch.randn(3, 4, 32, generator=g)
    before = [index.doc_scores(layer, q) for layer in range(2)]

    def boom(*a, **k):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(routing_cpu, "score_blocked", boom)
    with pytest.raises(RuntimeError, match="exploded"):
        index.chunk_scores(0, q, kernel="cpu")                       # forced: the error itself
    with pytest.warns(RuntimeWarning, match="chunk-minor layout"):
        after0 = index.doc_scores(0, q)
    assert index.layout == "chunk_minor"
    for layer, (b, a) in enumerate(zip(before, [after0, index.doc_scores(1, q)])):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(index.keys[layer], keys[layer], rtol=0, atol=0)


@needs_kernel
@settings(max_examples=40, deadline=None)
@given(counts=st.lists(st.integers(1, 70), min_size=1, max_size=400), reduce=st.sampled_from(["max", "mean"]),
       seed=st.integers(0, 2**31 - 1))
def test_doc_reduce_kernel_equals_a_loop_over_runs(counts, reduce, seed):
    """routing_cpu.doc_reduce == the per-document max / mean written as a Python loop (float64)."""
    cs = torch.randn(sum(counts), generator=torch.Generator().manual_seed(seed))
    offsets = torch.from_numpy(np.r_[0, np.cumsum(counts)].astype(np.int64))
    out = torch.empty(len(counts))
    routing_cpu.doc_reduce(cs, offsets, reduce, out)
    c64 = cs.double().numpy()
    want = [getattr(np, reduce)(c64[a:b]) for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-6, atol=1e-6)


@needs_kernel
@pytest.mark.parametrize("chunk_reduce", ["max", "mean"])
def test_blocked_index_doc_scores_use_the_kernel_and_equal_segment_reduce(chunk_reduce, monkeypatch):
    g = torch.Generator().manual_seed(11)
    counts = torch.randint(1, 9, (3001,), generator=g).numpy()
    chunk_doc = np.repeat(np.arange(len(counts)), counts)
    keys = torch.randn(len(chunk_doc), 1, 64, generator=g).to(torch.bfloat16)
    index = RouterIndex([keys], chunk_doc, np.arange(len(counts)), RoutingConfig(chunk_reduce=chunk_reduce))
    assert index.layout == "blocked"
    q = torch.randn(4, 4, 64, generator=g)
    cs = index.chunk_scores(0, q)
    want = torch.segment_reduce(cs, chunk_reduce, lengths=torch.from_numpy(counts))
    calls = []
    real = routing_cpu.doc_reduce
    monkeypatch.setattr(routing_cpu, "doc_reduce", lambda *a: (calls.append(1), real(*a))[1])
    torch.testing.assert_close(index.doc_scores(0, q), want, rtol=1e-6, atol=1e-6)
    assert calls == [1]
    # a failing document kernel: one warning, then segment_reduce, same scores
    monkeypatch.setattr(routing_cpu, "doc_reduce", lambda *a: (_ for _ in ()).throw(RuntimeError("doc boom")))
    with pytest.warns(RuntimeWarning, match="document reduce kernel failed"):
        torch.testing.assert_close(index.doc_scores(0, q), want, rtol=1e-6, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                   # no second warning
        torch.testing.assert_close(index.doc_scores(0, q), want, rtol=1e-6, atol=1e-6)
