"""One-row bf16 linears (``runtime.cpu_linear``): the AVX512-BF16 GEMV, its stand-in and the fallback, each
against the exact product of the same bf16 values, within a bound derived from its arithmetic.

Bounds (:func:`linear_bound`; u = unit roundoff: 2^-24 fp32, 2^-8 bf16; γ_n = n·u / (1 - n·u)): any sum of
n products computed with fp32 accumulation, in any order, exact products or not, is within
γ_n(fp32)·Σ|w_i x_i| of the exact sum (Higham, *Accuracy and Stability of Numerical Algorithms*, §3.1);
rounding that fp32 sum to bf16 adds at most u_bf16·|fp32 sum|, and a bf16 bias add one more bf16 rounding.
The sums Σ|w_i x_i| come from the operands of each call, not from a scale constant, so the bound is about
half a bf16 ulp of each output and catches a dropped term or a transposed weight (tried by hand).

- :func:`~msa_memory.runtime.cpu_linear.gemv` (the kernel, fp32 out) and ``gemv_reference`` (torch fp32
  matmul) within γ_n·Σ|w||x| of a float64 product (hypothesis over shapes, row strides, tails);
- the overrides of :class:`CpuGemv` serve one-row inputs only, within the bound, and go away;
- an engine per family, layer by layer: every one-row linear call of a prefill + teacher-forced decode,
  against the exact product of the input that call got, on the fast path (``gemv`` calls counted) and on
  the fallback forced by ``MSA_CPU_KERNEL=0`` or ``cpu_gemv=False`` (torch's ``F.linear``, which also
  accumulates in fp32); the engine's logits are the LM head call's output. A whole-model comparison of
  the two paths has no such bound: one-ulp differences of a layer grow through the next layers.

"kernel" cases need a CPU with AVX512F, AVX512BW and AVX512-BF16 and are skipped elsewhere, the reason
naming the missing flags; the "reference" cases run ``gemv_reference`` in the kernel's place on any CPU,
so the overrides and the engine's use of them are tested on every CI machine. On an AVX512-BF16 / AMX
machine: ``.venv/bin/python -m pytest -q tests/unit/runtime/test_cpu_gemv.py -rs`` (no skip expected).
Run: .venv/bin/python -m pytest tests/unit/runtime/test_cpu_gemv.py -q -rs
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from msa_memory.encode.tiny import FAMILIES, tiny_model
from msa_memory.errors import ConfigError
from msa_memory.routing.kernels import cpu_avx512 as routing_cpu
from msa_memory.runtime import cpu_linear
from msa_memory.runtime.cpu_linear import CpuGemv, gemv, gemv_reference
from msa_memory.runtime.engine import MsaEngine
from msa_memory.testing.numerics import U64, UBF16, gamma

KERNEL = routing_cpu.available()
SKIP_REASON = f"AVX512-BF16 GEMV kernel not usable here: {routing_cpu.unavailable_reason()}"
IMPLS = ["kernel", "reference"]



def linear_bound(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None,
                 u_out: float = UBF16) -> tuple[torch.Tensor, torch.Tensor]:
    """(exact, bound) float64 (O,): the exact ``w @ x + b`` of these bf16 values and the largest error of a
    one-row linear that accumulates the n = I products in fp32 and rounds to a dtype of unit roundoff
    ``u_out`` (0: an fp32 result).

    Derivation: s1 = fp32 sum, |s1 − s| ≤ γ_n·S with S = Σ|w_i x_i| (γ_{n+1}·(S + |b|) where the bias is
    added in the accumulator); y = round(s1): |y − s1| ≤ u·|s1| ≤ u·(|s| + γ·S); a bias added after that
    rounding costs one more rounding, u·|y + b|. Summed: γ·(S + |b|)·(1 + u)² + u·(1 + u)·|s| + u·|s + b|
    (without bias: γ_n·S·(1 + u) + u·|s|). The float64 reference itself is within γ_n(2^-53)·S; results
    below 2^-126 (flushed by the kernel's dpbf16, subnormal elsewhere) add at most 2^-126 per rounding.
    """
    xd, wd = x.detach().double().reshape(-1), w.detach().double()
    n = xd.numel()
    s, S = wd @ xd, wd.abs() @ xd.abs()
    ref_err = gamma(n, U64) * S + (n + 2) * 2.0**-126     # + underflow: ≤ n + 2 roundings flushed below 2^-126
    u = u_out
    if b is None:
        return s, gamma(n) * S * (1 + u) + u * s.abs() + ref_err
    bd = b.detach().double()
    exact = s + bd
    bound = (gamma(n + 1) * (S + bd.abs()) * (1 + u) ** 2 + u * (1 + u) * s.abs() + u * exact.abs()
             + ref_err)
    return exact, bound


def assert_within(y: torch.Tensor, exact: torch.Tensor, bound: torch.Tensor, what: str = "") -> float:
    """Assert |y − exact| ≤ bound elementwise; returns the largest error / bound (reported on failure with the
    max and mean error)."""
    err = (y.double().reshape(-1) - exact).abs()
    ratio = err / bound.clamp_min(1e-300)
    assert bool((err <= bound).all()), (f"{what}: error above its bound at {int((err > bound).sum())} of "
                                        f"{err.numel()} outputs; max error {err.max():.3g}, mean {err.mean():.3g}, "
                                        f"max error/bound {ratio.max():.3g}")
    return float(ratio.max())


@pytest.fixture(params=IMPLS)
def gemv_impl(request, monkeypatch):
    """"kernel": the AVX512-BF16 GEMV (skipped where it cannot run); "reference": ``gemv_reference`` standing
    in for it (and ``CpuGemv.available`` answering yes) on any CPU."""
    if request.param == "kernel":
        if not KERNEL:
            pytest.skip(SKIP_REASON)
    else:
        monkeypatch.setattr(cpu_linear, "gemv", gemv_reference)
        monkeypatch.setattr(routing_cpu, "available", lambda: True)
    return request.param


@pytest.fixture
def kernel_switch(monkeypatch):
    """Set MSA_CPU_KERNEL for one test (``kernel_switch.setenv(...)``); the cached load result is forgotten
    before and after, so later tests see the machine's own state."""
    routing_cpu._reset_for_tests()
    yield monkeypatch
    monkeypatch.undo()
    routing_cpu._reset_for_tests()
    routing_cpu.load()


@pytest.mark.parametrize("impl", IMPLS)
@settings(max_examples=30, deadline=None)
@given(n_out=st.integers(1, 300), n_in=st.integers(1, 330), pad=st.integers(0, 40), seed=st.integers(0, 2**16))
def test_gemv_within_fp32_accumulation_bound_of_the_exact_product(impl, n_out, n_in, pad, seed):
    """Products of two bf16 values are exact in fp32 (8 + 8 significand bits); only the fp32 sum of the n_in
    products rounds: |y − w @ x| ≤ γ_{n_in}·(|w| @ |x|), elementwise. (Denormal inputs, which the kernel's
    dpbf16 flushes, do not occur in randn values.)"""
    if impl == "kernel" and not KERNEL:
        pytest.skip(SKIP_REASON)
    fn = gemv if impl == "kernel" else gemv_reference
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_out, n_in + pad, generator=g).to(torch.bfloat16)[:, :n_in]   # rows contiguous, strided
    x = torch.randn(n_in, generator=g).to(torch.bfloat16)
    y = fn(x, w)
    assert y.dtype == torch.float32 and y.shape == (n_out,)
    assert_within(y, *linear_bound(x, w, u_out=0.0), what=f"{impl} gemv {n_out}x{n_in}")


def test_overrides_serve_one_row_only_and_go_away(gemv_impl):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96, bias=False), torch.nn.Linear(96, 40, bias=True),
                                torch.nn.Linear(7, 5)).to(torch.bfloat16)
    model[2].weight.data = torch.randn(7, 5).to(torch.bfloat16).t()                # rows not contiguous
    gv = CpuGemv(model)
    assert [m.in_features for m in gv.modules] == [64, 96]
    lin0, lin1 = model[0], model[1]
    x1, xn = torch.randn(1, 1, 64).to(torch.bfloat16), torch.randn(3, 64).to(torch.bfloat16)
    with torch.no_grad(), gv.active():
        y1, yn = lin0(x1), lin0(xn)
        z = lin1(y1)
        assert gv.calls == 2
    assert "forward" not in lin0.__dict__ and "forward" not in lin1.__dict__      # the model is itself again
    with torch.no_grad():
        rn = F.linear(xn, lin0.weight)
    assert y1.shape == (1, 1, 96) and y1.dtype == torch.bfloat16 and z.shape == (1, 1, 40)
    assert_within(y1, *linear_bound(x1, lin0.weight), what="one row, no bias")
    assert_within(z, *linear_bound(y1, lin1.weight, lin1.bias), what="one row + bias")
    assert torch.equal(yn, rn)                                                          # other shapes: F.linear
    with gv.active():                                                                   # autograd: F.linear
        xg = x1.clone().requires_grad_(True)
        assert torch.equal(lin0(xg), F.linear(xg, lin0.weight)) and gv.calls == 2
    with torch.no_grad():                                                               # a weight changed in place
        lin0.weight.mul_(2)
        with gv.active():
            y2 = lin0(x1)
        assert_within(y2, *linear_bound(x1, lin0.weight), what="weight changed in place")


def _record_one_row_linears(model):
    """Forward hooks on every ``nn.Linear``: (module, input, output) of each call with one row (the calls the
    GEMV serves inside a session; hooks run after an instance ``forward`` override too)."""
    calls, handles = [], []

    def hook(mod, args, out):
        if args[0].numel() == mod.in_features:
            calls.append((mod, args[0].detach().reshape(-1).clone(), out.detach().reshape(-1).clone()))

    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            handles.append(m.register_forward_hook(hook))
    return calls, handles


def _run_layer_by_layer(model, eng):
    """Prefill 3 + 9 tokens, then 18 teacher-forced decode steps; every one-row linear call is checked against
    the exact product of its own input; the engine's logits must be the LM head call's output. Returns
    (largest error / bound, kernel calls per decode step, one-row linear calls per decode step)."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(6, 262, (30,), generator=g).tolist()
    calls, handles = _record_one_row_linears(model)
    head = model.get_output_embeddings()
    served, made, worst = [], [], 0.0
    try:
        st_ = eng.new_state(40, eng.compute_prefix(ids[:3]))
        steps = [(ids[3:12], list(range(3, 12)))] + [([ids[i]], [i]) for i in range(12, len(ids))]
        for k, (tok, pos) in enumerate(steps):
            before, n_before = (eng.gemv.calls if eng.gemv else 0), len(calls)
            logits = eng.forward(st_, tok, pos)
            mod, _, y = calls[-1]
            assert mod is head and torch.equal(logits, y.float()), "the logits are not the LM head's output"
            if k:                                                   # decode steps: every linear has one row
                served.append((eng.gemv.calls if eng.gemv else 0) - before)
                made.append(len(calls) - n_before)
    finally:
        for h in handles:
            h.remove()
    for mod, x, y in calls:
        exact, bound = linear_bound(x, mod.weight, mod.bias)
        worst = max(worst, assert_within(y, exact, bound, what=f"{type(mod).__name__} {tuple(mod.weight.shape)}"))
    return worst, served, made


@pytest.mark.parametrize("family", FAMILIES)
def test_engine_gemv_linears_within_their_bound_layer_by_layer(family, gemv_impl):
    """The fast path: every decode-step linear runs the GEMV (kernel or stand-in) and each is within its own
    bound of the exact product of the input it got; F.linear on the same input (the path without the GEMV)
    is held to the same bound."""
    model = tiny_model(family).to(torch.bfloat16)
    eng = MsaEngine(model, [], lambda p, x: x)
    assert eng.gemv is not None
    worst, served, made = _run_layer_by_layer(model, eng)
    assert served == made and all(n > 0 for n in served)        # each decode step's linears: all on the GEMV
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert worst <= 1.0


@pytest.mark.parametrize(("switch", "family"), [("MSA_CPU_KERNEL=0", f) for f in FAMILIES] + [("cpu_gemv=False", "llama")])
def test_engine_forced_fallback_linears_within_their_bound_layer_by_layer(family, switch, kernel_switch):
    """The fallback, forced on any CPU: no GEMV, no overrides, torch's F.linear for every call, each one-row call
    within the same bound (torch's bf16 linear accumulates in fp32 too); ``cpu_gemv=True`` is refused under
    MSA_CPU_KERNEL=0."""
    model = tiny_model(family).to(torch.bfloat16)
    if switch == "MSA_CPU_KERNEL=0":
        kernel_switch.setenv("MSA_CPU_KERNEL", "0")
        assert not CpuGemv.available(model)
        with pytest.raises(ConfigError, match="MSA_CPU_KERNEL not 0"):
            MsaEngine(model, [], lambda p, x: x, cpu_gemv=True)
        eng = MsaEngine(model, [], lambda p, x: x)
    else:
        eng = MsaEngine(model, [], lambda p, x: x, cpu_gemv=False)
    assert eng.gemv is None
    worst, served, made = _run_layer_by_layer(model, eng)
    assert all(n == 0 for n in served) and all(n > 0 for n in made)
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert worst <= 1.0


def test_engines_on_one_model_share_the_copies_and_nesting_keeps_the_overrides(gemv_impl):
    model = tiny_model("gemma3").to(torch.bfloat16)
    a, b = MsaEngine(model, [], lambda p, x: x), MsaEngine(model, [], lambda p, x: x)
    assert a.gemv is b.gemv is CpuGemv.for_model(model)
    lin = a.gemv.modules[0]
    with a.gemv.active():
        with b.gemv.active():
            assert "forward" in lin.__dict__
        assert "forward" in lin.__dict__                   # the inner exit leaves the outer's overrides
    assert "forward" not in lin.__dict__


def test_engine_gemv_option_is_checked():
    with pytest.raises(ConfigError, match="cpu_gemv=True needs the model on the CPU in bf16"):
        MsaEngine(tiny_model("gemma3"), [], lambda p, x: x, cpu_gemv=True)                 # fp32 weights
    with pytest.raises(ConfigError, match="cpu_gemv='yes' is not"):
        MsaEngine(tiny_model("gemma3"), [], lambda p, x: x, cpu_gemv="yes")
    assert MsaEngine(tiny_model("gemma3"), [], lambda p, x: x).gemv is None               # auto: fp32 stays off
    bf16 = tiny_model("gemma3").to(torch.bfloat16)                                        # auto, bf16: the CPU decides
    assert (MsaEngine(bf16, [], lambda p, x: x).gemv is not None) == KERNEL
