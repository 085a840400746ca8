"""The AVX512-BF16 CPU routing kernel (``routing_cpu``, blocked bf16 keys) and its fallback, each against the
formula on the operands it reads, within a bound derived from its arithmetic.

Bounds (u = unit roundoff: 2^-24 fp32, 2^-8 bf16, 2^-11 fp16; γ_n = n·u / (1 − n·u), Higham, *Accuracy and
Stability of Numerical Algorithms* §3.1): a score s = Σ_d lhs_d·k_d of Dk products summed in fp32, in any
order, is within γ_Dk·A of exact, A = Σ_d |lhs_d||k_d| computed from the same operands (not a scale
constant); a path that writes the GEMM's output in bf16 / fp16 (the torch path) adds u·|fp32 sum|; a max
over rows is off by at most its largest row bound; a mean over T token maxima adds γ_{T+1}·mean|max| (T − 1
additions, 1/T, one product). :func:`score_bound` computes it per chunk, :func:`doc_bound` carries it through
the document max / mean, and routes are held to "every chosen document's exact score ≥ the exact k-th − 2·B"
with B the largest document bound (order statistics move by at most B). The bounds are tight (about one
rounding of the output) and fail on a dropped key dimension or a wrong fold (tried by hand).

- the kernel's chunk scores against a float64 einsum of the formula on the same bf16 operands (keys and
  the folded query rows rounded to bf16, as the kernel reads them), for R = 1, 2, 5, 16, 32 query rows,
  C not a multiple of the 32-chunk block, every score × head-reduce × query-reduce combination, GQA
  ratios and odd head dims (hypothesis), and its top-k documents against the formula's; also against the
  formula on the unrounded query (:func:`operand_bound`: what rounding the folded rows may move);
- bf16 keys (blocked), fp16 and fp32 keys (chunk-minor, torch) in one store of layers, each index against
  the formula on its own operands;
- the fallback: ``MSA_CPU_KERNEL=0``, ``RoutingConfig(cpu_kernel=False)``, a CPU without AVX512-BF16 or a
  failed build give the chunk-minor layout and scores within the torch path's bound, and
  ``routing_cpu.unavailable_reason`` names the cause; a kernel that fails at run time moves the keys to the
  chunk-minor layout with one warning; the C++ source compiles with the kernel's flags on any x86-64 CPU
  with g++ (compiled, not run, where the CPU lacks the instructions); the widening of bf16 keys to fp32
  follows the CPU's bf16 support (``resident_dtype``).
These run everywhere; the kernel tests are skipped on CPUs without AVX512F / AVX512BW / AVX512-BF16 (or where
the extension cannot be built), the reason naming the missing flags. The build happens once (torch's
extension cache) and is reused by later runs. On an AVX512-BF16 / AMX machine no test is skipped:
``.venv/bin/python -m pytest -q tests/equivalence/test_routing_cpu_kernel.py -rs``.
Run: .venv/bin/python -m pytest tests/equivalence/test_routing_cpu_kernel.py -q -rs
"""

from __future__ import annotations

import itertools
import logging
import platform
import shutil
import subprocess
import sysconfig
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from msa_memory.errors import ConfigError
from msa_memory.routing import scoring
from msa_memory.routing.kernels import cpu_avx512 as routing_cpu
from msa_memory.routing import RouterIndex, RoutingConfig, prepare_lhs
from msa_memory.testing.numerics import U32, U64, UBF16, gamma
from test_routing_paths import einsum_chunk_scores  # the float64 formula (same folder: tests/equivalence)

KERNEL = routing_cpu.available()
SKIP_REASON = f"AVX512-BF16 CPU routing kernel not usable here: {routing_cpu.unavailable_reason()}"
needs_kernel = pytest.mark.skipif(not KERNEL, reason=SKIP_REASON)
COMBOS = list(itertools.product(("dot", "cosine"), ("mean", "max"), ("max", "mean", "last")))

TINY = 2.0**-126                    # a rounding that underflows (dpbf16 flushes to zero) is off by < 2^-126


def unit(k):
    """Keys as a cosine index holds them: each head normalized in fp32 at load, rounded back to their dtype."""
    return torch.nn.functional.normalize(k.float(), dim=-1).to(k.dtype)


def operands(q, keys, cfg, dtype):
    """(lhs (G, R, Dk), keys (C, H, D), plan) as an index with keys of ``dtype`` reads them: the folded rows of
    ``prepare_lhs`` rounded to ``dtype``, the keys in ``dtype`` (cosine: normalized in fp32 first, as at load)."""
    H = keys.shape[1]
    k = keys.to(dtype)
    if cfg.score == "cosine":
        k = unit(k)
    lhs, plan = prepare_lhs(q.float(), cfg, H, dtype)
    return lhs, k, plan


def rows(lhs, k):
    """(s, A) float64 (G, R, C): every row's exact scores and Σ_d |lhs_d||k_d| (k (C, H, D) viewed (C, G, Dk))."""
    C = k.shape[0]
    G, R, Dk = lhs.shape
    kd = k.double().reshape(C, G, Dk)
    return (torch.einsum("grd,cgd->grc", lhs.double(), kd),
            torch.einsum("grd,cgd->grc", lhs.double().abs(), kd.abs()))


def reduce_rows(x, plan):
    """(C,) the plan's head / query reduce of per-row values x (G, R, C): the max over all rows, or the max over
    the groups and the rep rows of each of the T tokens, then the mean over the tokens."""
    if plan.query_reduce == "max":
        return x.amax((0, 1))
    G, R, C = x.shape
    return x.view(G, plan.T, plan.rep, C).amax((0, 2)).mean(0)


def score_bound(s, A, Dk, plan, out_dtype=torch.float32):
    """(C,) float64: the largest |computed − exact| reduced chunk score of a path that sums Dk products in fp32
    (γ_Dk·A), writes them in ``out_dtype`` (unit roundoff u: u·(|s| + γ_Dk·A), plus half its subnormal spacing
    where the sum underflows; fp32 output: none), then reduces: a max is off by at most the largest bound among
    its rows; a mean of T maxima adds the fp32 mean's own γ_{T+1}·mean|max|. The float64 reference's error
    (γ_Dk(2^-53)·A) and fp32 underflow (flushed by dpbf16: < 2^-126 a rounding) are included."""
    fi = torch.finfo(out_dtype)
    u = 0.0 if out_dtype == torch.float32 else fi.eps / 2
    e = (gamma(Dk) * A * (1 + u) + u * s.abs() + gamma(Dk, U64) * A + (Dk + 2) * TINY
         + (fi.smallest_normal * fi.eps / 2 if u else 0.0))
    if plan.query_reduce == "max":
        return e.amax((0, 1))
    G, R, C = e.shape
    m_t = (s.abs() + e).view(G, plan.T, plan.rep, C).amax((0, 2))
    return reduce_rows(e, plan) + gamma(plan.T + 1) * m_t.mean(0) + TINY


def formula(q, keys, cfg, dtype=torch.bfloat16, out_dtype=torch.float32):
    """(want, bound) float64 (C,): the formula on the operands an index with keys of ``dtype`` reads, and the
    bound of a path whose GEMM writes ``out_dtype`` (the kernel and fp32 paths: float32; the torch path of
    bf16 / fp16 keys: their dtype)."""
    lhs, k, plan = operands(q, keys, cfg, dtype)
    s, A = rows(lhs, k)
    return reduce_rows(s, plan), score_bound(s, A, lhs.shape[-1], plan, out_dtype)


def operand_bound(q, keys, cfg):
    """(C,) float64: how far the formula on the bf16 operands (:func:`operands`) may lie from the formula on the
    unrounded query and keys (``einsum_chunk_scores``, float64).

    Each folded row element is off by ε_l·lhs'_d, lhs' = the fold of |q| (a fold of signed values may cancel,
    its error does not): ``prepare_lhs`` in fp32 (normalize ≤ γ_{D+2}, the rep-head sum γ_rep, the scale
    2 roundings, the T mean γ_{T+1}: together γ_{D+rep+T+5}), then the bf16 rounding u_bf16·(1 + that).
    Cosine keys are normalized in fp32 (γ_{D+2}) and rounded to bf16: ε_k = γ_{D+2} + u_bf16·(1 + γ_{D+2});
    dot keys are the bf16 values themselves (ε_k = 0). Per row: (ε_l·(1 + ε_k) + ε_k)·A', A' = lhs' @ |k|,
    and both formulas reduce exactly (float64), so the reduce of the row bounds bounds the difference.
    """
    C, H, D = keys.shape
    T, Hq, _ = q.shape
    pre = gamma(D + Hq // H + T + 5)
    eps_l = pre + UBF16 * (1 + pre)
    eps_k = gamma(D + 2) + UBF16 * (1 + gamma(D + 2)) if cfg.score == "cosine" else 0.0
    k = keys.double()
    if cfg.score == "cosine":
        k = torch.nn.functional.normalize(k, dim=-1)
    lhs_abs, plan = prepare_lhs(q.double().abs(), cfg, H, torch.float64)
    _, A = rows(lhs_abs, k)
    return reduce_rows((eps_l * (1 + eps_k) + eps_k + gamma(D * Hq + T, U64)) * A, plan)


def doc_bound(bound, want, counts, chunk_reduce="max"):
    """(N,) float64: a document's max of chunk scores is off by at most its chunks' largest bound; its mean by
    the mean bound plus the fp32 mean's γ_{n+1}·mean(|score| + bound) (n − 1 additions and one division)."""
    lengths = torch.as_tensor(np.asarray(counts))
    if chunk_reduce == "max":
        return torch.segment_reduce(bound, "max", lengths=lengths)
    spread = torch.segment_reduce(want.abs() + bound, "mean", lengths=lengths)
    return (torch.segment_reduce(bound, "mean", lengths=lengths)
            + torch.tensor([gamma(int(n) + 1) for n in counts], dtype=torch.float64) * spread)


def assert_within(got, want, bound, what=""):
    """|got − want| ≤ bound elementwise; the message gives the max and mean error and the largest error / bound."""
    err = (torch.as_tensor(got).double() - torch.as_tensor(want).double()).abs()
    bound = torch.as_tensor(bound, dtype=torch.float64)
    ok = err <= bound
    assert bool(ok.all()), (f"{what}: {int((~ok).sum())} of {err.numel()} above the bound; max error "
                            f"{err.max():.3g}, mean {err.mean():.3g}, max error/bound "
                            f"{(err / bound.clamp_min(1e-300)).max():.3g}")


def assert_route_within(res, ref, dbound, k):
    """A route's documents and scores against exact document scores ``ref`` with bounds ``dbound``: each chosen
    document's exact score ≥ the exact k-th − 2·max bound, and the sorted scores within max bound of the
    exact sorted ones."""
    B = float(dbound.max())
    ref = np.asarray(ref, dtype=np.float64)
    top = np.sort(ref)[::-1][:k]
    assert len(res.doc_ids) == k and np.all(ref[res.doc_index] >= top[-1] - 2 * B)
    assert np.all(np.abs(np.asarray(res.scores, dtype=np.float64) - top) <= B)
    np.testing.assert_array_equal(res.doc_ids, res.doc_index + 100)


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
    counts = np.bincount(chunk_doc)
    cfg = RoutingConfig(top_k=16)
    index = RouterIndex([keys], chunk_doc, np.arange(n_docs) + 100, cfg)
    assert index.layout == "blocked" and index.key_dtype == torch.bfloat16
    lhs = index._query(0, q)[1]
    assert lhs.shape[:2] == (1, R)
    want, bound = formula(q, keys, cfg)
    got = index.chunk_scores(0, q)
    assert_within(got, want, bound, "kernel")
    torch.testing.assert_close(index.chunk_scores(0, q, kernel="cpu"), got, rtol=0, atol=0)
    # the torch path on the same blocked keys writes its GEMM output in bf16
    assert_within(index.chunk_scores(0, q, kernel="torch"), want, formula(q, keys, cfg, out_dtype=torch.bfloat16)[1], "torch path")
    # top-k documents: the formula's, up to the bound
    ref = torch.segment_reduce(want, "max", lengths=torch.from_numpy(counts))
    assert_route_within(index.route(0, q), ref.numpy(), doc_bound(bound, want, counts), min(16, n_docs))


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
    want, bound = formula(q, keys, cfg)
    assert_within(got, want, bound, "kernel")
    # and the formula on the unrounded query (what the fallback's fp32 path is held to), plus what the bf16
    # rounding of the folded rows (and of normalized keys) may move
    assert_within(got, einsum_chunk_scores(q, keys.float(), score, hr, qr), bound + operand_bound(q, keys, cfg),
                  "kernel vs unrounded")


@needs_kernel
def test_layers_of_every_dtype_route_within_their_bounds():
    """A bf16 index (blocked, the kernel) and fp16 / fp32 indexes of the same keys (chunk-minor, torch), each
    against the formula on its own operands (fp16: rows, keys and the GEMM's output in fp16)."""
    g = torch.Generator().manual_seed(7)
    C = 2000 + 13
    keys = [torch.randn(C, 1, 128, generator=g).to(torch.bfloat16) for _ in range(2)]
    chunk_doc = np.arange(C) // 5
    n_docs = chunk_doc[-1] + 1
    counts = np.bincount(chunk_doc)
    q = torch.randn(9, 4, 128, generator=g)
    cfg = RoutingConfig(top_k=8)
    bf = RouterIndex(keys, chunk_doc, np.arange(n_docs) + 100, cfg)
    f16 = RouterIndex([k.half() for k in keys], chunk_doc, np.arange(n_docs) + 100, cfg)
    f32 = RouterIndex(keys, chunk_doc, np.arange(n_docs) + 100, RoutingConfig(top_k=8, compute_dtype="float32"))
    assert (bf.layout, f16.layout, f32.layout) == ("blocked", "chunk_minor", "chunk_minor")
    assert (bf.key_dtype, f16.key_dtype, f32.key_dtype) == (torch.bfloat16, torch.float16, torch.float32)
    assert bf.nbytes() == 2 * (-(-C // 32)) * 32 * 128 * 2 and f32.nbytes() == 2 * C * 128 * 4
    for layer in range(2):
        # cosine (the default): each index holds its keys normalized in fp32 and rounded to its own dtype
        torch.testing.assert_close(bf.keys[layer], unit(keys[layer]), rtol=0, atol=0)
        torch.testing.assert_close(f16.keys[layer], unit(keys[layer].half().to(f16.key_dtype)), rtol=0, atol=0)
        for index, given, out_dtype in ((bf, keys[layer], torch.float32), (f16, keys[layer].half(), torch.float16),
                                        (f32, keys[layer], torch.float32)):
            want, bound = formula(q, given, cfg, index.key_dtype, out_dtype)   # given: the keys before load
            what = f"layer {layer}, {index.key_dtype}"
            assert_within(index.chunk_scores(layer, q), want, bound, what)
            ref = torch.segment_reduce(want, "max", lengths=torch.from_numpy(counts))
            dbound = doc_bound(bound, want, counts)
            assert_within(index.doc_scores(layer, q), ref, dbound, what + " documents")
            assert_route_within(index.route(layer, q), ref.numpy(), dbound, 8)


def _check_torch_path(index, g):
    """The chunk-minor torch path of bf16 keys: its GEMM writes bf16."""
    q = torch.randn(5, 4, 64, generator=g)
    want, bound = formula(q, index.keys[0], index.config, out_dtype=torch.bfloat16)
    assert_within(index.chunk_scores(0, q), want, bound, "torch path")
    with pytest.raises(ConfigError, match="kernel='cpu'"):
        index.chunk_scores(0, q, kernel="cpu")


def test_fallback_when_disabled_by_env(fresh_kernel_state):
    fresh_kernel_state.setenv("MSA_CPU_KERNEL", "0")
    assert routing_cpu.load() is None and not routing_cpu.available()
    assert routing_cpu.unavailable_reason() == "MSA_CPU_KERNEL=0 turns the CPU kernel off"
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(300, 1, 64, generator=g).to(torch.bfloat16)
    index = RouterIndex([keys], np.arange(300) // 3, np.arange(100), RoutingConfig(compute_dtype="bfloat16"))
    assert index.layout == "chunk_minor" and index.key_dtype == torch.bfloat16
    _check_torch_path(index, g)


def test_fallback_when_config_off_or_cpu_lacks_bf16(fresh_kernel_state):
    g = torch.Generator().manual_seed(2)
    keys = torch.randn(100, 1, 64, generator=g).to(torch.bfloat16)
    index = RouterIndex([keys], np.arange(100), np.arange(100), RoutingConfig(compute_dtype="bfloat16",
                                                                              cpu_kernel=False))
    assert index.layout == "chunk_minor"
    _check_torch_path(index, g)
    fresh_kernel_state.delenv("MSA_CPU_KERNEL", raising=False)
    fresh_kernel_state.setattr(routing_cpu, "missing_cpu_flags", lambda: ["avx512_bf16"])
    routing_cpu._reset_for_tests()
    assert routing_cpu.load() is None and not routing_cpu.cpu_supported()
    assert "this CPU lacks avx512_bf16" in routing_cpu.unavailable_reason()
    index = RouterIndex([keys], np.arange(100), np.arange(100), RoutingConfig(compute_dtype="bfloat16"))
    assert index.layout == "chunk_minor"
    _check_torch_path(index, g)


def test_failed_build_logs_one_warning_and_falls_back(fresh_kernel_state, caplog):
    def broken_build():
        raise OSError("no g++ here")

    fresh_kernel_state.delenv("MSA_CPU_KERNEL", raising=False)
    fresh_kernel_state.setattr(routing_cpu, "missing_cpu_flags", lambda: [])
    fresh_kernel_state.setattr(routing_cpu, "_build", broken_build)
    with caplog.at_level(logging.WARNING, logger="msa_memory.routing.kernels.cpu_avx512"):
        assert routing_cpu.load() is None
        assert routing_cpu.load() is None                            # remembered: no second attempt, no warning
    assert [r.getMessage() for r in caplog.records if "routing kernel unavailable" in r.getMessage()] == [
        "AVX512-BF16 routing kernel unavailable (OSError: no g++ here); routing uses the torch path. "
        "Set MSA_CPU_KERNEL=0 to skip the build."]
    assert routing_cpu.unavailable_reason() == ("the AVX512-BF16 extension could not be built here "
                                                "(OSError: no g++ here)")
    g = torch.Generator().manual_seed(3)
    keys = torch.randn(100, 1, 64, generator=g).to(torch.bfloat16)
    index = RouterIndex([keys], np.arange(100), np.arange(100), RoutingConfig(compute_dtype="bfloat16"))
    assert index.layout == "chunk_minor"
    _check_torch_path(index, g)


@pytest.mark.slow
def test_extension_compiles_with_the_kernel_flags_on_any_x86_cpu(tmp_path):
    """The build is covered on every CI machine: where the kernel loaded, its functions are there; elsewhere the
    C++ source is compiled (not run) with the kernel's own flags (``routing_cpu._FLAGS``, -mavx512bf16 ...) and
    torch's headers, as ``cpp_extension.load`` compiles it, so a source that no longer compiles fails here
    even on a CPU without AVX512-BF16 (~30-60 s of g++)."""
    if KERNEL:
        mod = routing_cpu.load()
        assert all(callable(getattr(mod, f)) for f in ("score_blocked", "doc_reduce", "gemv_rows"))
        return
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip(f"the kernel's flags (-mavx512bf16 ...) are x86-64 only; this machine is {platform.machine()}")
    gxx = shutil.which("g++") or shutil.which("c++")
    if gxx is None:
        pytest.skip("no C++ compiler (g++ / c++) on PATH: the extension cannot be built here, and routing uses the "
                    "torch path (test_failed_build_logs_one_warning_and_falls_back)")
    from torch.utils import cpp_extension

    cmd = [gxx, "-c", str(routing_cpu._SOURCE), "-o", str(tmp_path / "routing_cpu.o"), "-fPIC", "-std=c++17",
           *routing_cpu._FLAGS, "-DTORCH_EXTENSION_NAME=msa_routing_cpu", "-DTORCH_API_INCLUDE_EXTENSION_H",
           f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
           *[f"-isystem{p}" for p in cpp_extension.include_paths()], f"-isystem{sysconfig.get_paths()['include']}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stderr[-4000:]}"
    assert (tmp_path / "routing_cpu.o").stat().st_size > 0


def test_resident_dtype_follows_the_cpu(monkeypatch):
    """``compute_dtype="auto"`` on CPU: bf16 / fp16 keys stay as stored where the CPU has native bf16 (AMX,
    AVX512-BF16) and are widened to fp32 elsewhere; both branches, whatever this CPU is."""
    for native, want in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(scoring, "cpu_has_native_bf16", lambda native=native: native)
        assert scoring.resident_dtype(torch.bfloat16, "cpu") == want
        assert scoring.resident_dtype(torch.bfloat16, "cpu", "bfloat16") == torch.bfloat16
        assert scoring.resident_dtype(torch.float32, "cpu") == torch.float32
    g = torch.Generator().manual_seed(5)
    keys = torch.randn(70, 1, 64, generator=g).to(torch.bfloat16)
    index = RouterIndex([keys], np.arange(70), np.arange(70), RoutingConfig())    # (native: False, from above)
    assert index.key_dtype == torch.float32 and index.layout == "chunk_minor"
    q = torch.randn(3, 4, 64, generator=g)
    want, bound = formula(q, index.keys[0], index.config, torch.float32)
    assert_within(index.chunk_scores(0, q), want, bound, "widened fp32 keys")


@needs_kernel
def test_kernel_failing_at_run_time_moves_keys_to_chunk_minor(monkeypatch):
    g = torch.Generator().manual_seed(4)
    keys = [torch.randn(203, 2, 32, generator=g).to(torch.bfloat16) for _ in range(2)]
    cfg = RoutingConfig(head_reduce="max")
    index = RouterIndex(keys, np.arange(203) // 2, np.arange(102), cfg)
    assert index.layout == "blocked"
    q = torch.randn(3, 4, 32, generator=g)
    counts = np.bincount(np.arange(203) // 2)
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
        torch.testing.assert_close(index.keys[layer], unit(keys[layer]), rtol=0, atol=0)   # the same keys, moved
        for got, out_dtype, what in ((b, torch.float32, "kernel"), (a, torch.bfloat16, "torch path after the failure")):
            want, bound = formula(q, keys[layer], cfg, out_dtype=out_dtype)
            ref = torch.segment_reduce(want, "max", lengths=torch.from_numpy(counts))
            assert_within(got, ref, doc_bound(bound, want, counts), f"layer {layer}, {what}")


def _doc_mean_bound(cs, offsets):
    """(N,) float64: an fp32 mean of n values (n − 1 additions, one division) is within γ_{n+1}·mean|c| of exact;
    the float64 reference's own error, γ_{n+1}(2^-53)·mean|c|, is added."""
    a, b = offsets[:-1], offsets[1:]
    n = (b - a).astype(np.float64)
    mean_abs = np.array([np.abs(cs[i:j]).mean() for i, j in zip(a, b)])
    return ((n + 1) * U32 / (1 - (n + 1) * U32) + (n + 1) * U64) * mean_abs + TINY


@needs_kernel
@settings(max_examples=40, deadline=None)
@given(counts=st.lists(st.integers(1, 70), min_size=1, max_size=400), reduce=st.sampled_from(["max", "mean"]),
       seed=st.integers(0, 2**31 - 1))
def test_doc_reduce_kernel_equals_a_loop_over_runs(counts, reduce, seed):
    """routing_cpu.doc_reduce == the per-document max (exactly: a max rounds nothing) / mean (within the fp32
    mean's bound) written as a Python loop in float64."""
    cs = torch.randn(sum(counts), generator=torch.Generator().manual_seed(seed))
    offsets = torch.from_numpy(np.r_[0, np.cumsum(counts)].astype(np.int64))
    out = torch.empty(len(counts))
    routing_cpu.doc_reduce(cs, offsets, reduce, out)
    c64, off = cs.double().numpy(), offsets.numpy()
    want = np.array([getattr(np, reduce)(c64[a:b]) for a, b in zip(off[:-1], off[1:])])
    if reduce == "max":
        np.testing.assert_array_equal(out.numpy(), want)
    else:
        assert_within(out, want, _doc_mean_bound(c64, off), "document mean")


@needs_kernel
@pytest.mark.parametrize("chunk_reduce", ["max", "mean"])
def test_blocked_index_doc_scores_use_the_kernel_and_equal_segment_reduce(chunk_reduce, monkeypatch):
    """The document kernel and ``torch.segment_reduce`` on the same chunk scores: the max equal, the means each
    within the fp32 mean's bound of exact, so within twice it of each other."""
    g = torch.Generator().manual_seed(11)
    counts = torch.randint(1, 9, (3001,), generator=g).numpy()
    chunk_doc = np.repeat(np.arange(len(counts)), counts)
    keys = torch.randn(len(chunk_doc), 1, 64, generator=g).to(torch.bfloat16)
    index = RouterIndex([keys], chunk_doc, np.arange(len(counts)), RoutingConfig(chunk_reduce=chunk_reduce))
    assert index.layout == "blocked"
    q = torch.randn(4, 4, 64, generator=g)
    cs = index.chunk_scores(0, q)
    want = torch.segment_reduce(cs, chunk_reduce, lengths=torch.from_numpy(counts))
    tol = 2 * _doc_mean_bound(cs.double().numpy(), np.r_[0, np.cumsum(counts)]) if chunk_reduce == "mean" else 0
    calls = []
    real = routing_cpu.doc_reduce
    monkeypatch.setattr(routing_cpu, "doc_reduce", lambda *a: (calls.append(1), real(*a))[1])
    assert_within(index.doc_scores(0, q), want, tol, "document kernel vs segment_reduce")
    assert calls == [1]
    # a failing document kernel: one warning, then segment_reduce, the same scores
    monkeypatch.setattr(routing_cpu, "doc_reduce", lambda *a: (_ for _ in ()).throw(RuntimeError("doc boom")))
    with pytest.warns(RuntimeWarning, match="document reduce kernel failed"):
        torch.testing.assert_close(index.doc_scores(0, q), want, rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                   # no second warning
        torch.testing.assert_close(index.doc_scores(0, q), want, rtol=0, atol=0)
