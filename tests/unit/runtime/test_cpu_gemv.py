"""One-row bf16 linears through the AVX512-BF16 kernel (``runtime.cpu_linear``) equal the slow paths.

The GEMV is checked against an fp32 matmul of the same bf16 values (hypothesis over shapes, row
strides and tails of any length); the
module overrides against ``F.linear`` (one row: within bf16 rounding; any other input: the very same
call); an engine with ``cpu_gemv`` on against the same engine with it off, per family, on a tiny bf16
model fed the same tokens (every step's logits). Needs a CPU with AVX512-BF16 (this project's CI
machine has one); skipped elsewhere.
Run: .venv/bin/python -m pytest tests/unit/runtime/test_cpu_gemv.py -q
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from msa_memory.encode.tiny import FAMILIES, tiny_model
from msa_memory.errors import ConfigError
from msa_memory.runtime import routing_cpu
from msa_memory.runtime.cpu_linear import CpuGemv, gemv
from msa_memory.runtime.engine import MsaEngine

pytestmark = pytest.mark.skipif(not routing_cpu.available(), reason="needs the AVX512-BF16 kernel")


@settings(max_examples=30, deadline=None)
@given(n_out=st.integers(1, 300), n_in=st.integers(1, 330), pad=st.integers(0, 40), seed=st.integers(0, 2**16))
def test_gemv_equals_fp32_matmul_of_the_bf16_values(n_out, n_in, pad, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_out, n_in + pad, generator=g).to(torch.bfloat16)[:, :n_in]   # rows contiguous, strided
    x = torch.randn(n_in, generator=g).to(torch.bfloat16)
    y = gemv(x, w)
    ref = w.double() @ x.double()
    assert y.dtype == torch.float32 and y.shape == (n_out,)
    assert (y.double() - ref).abs().max() <= 1e-5 * (w.double().abs() @ x.double().abs()).max() + 1e-6


def test_overrides_serve_one_row_only_and_go_away():
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
        r1, rn, rz = F.linear(x1, lin0.weight), F.linear(xn, lin0.weight), F.linear(y1, lin1.weight, lin1.bias)
    assert y1.shape == r1.shape and y1.dtype == torch.bfloat16
    assert torch.allclose(y1.float(), r1.float(), rtol=1e-2, atol=1e-2)                # bf16 rounding only
    assert torch.allclose(z.float(), rz.float(), rtol=1e-2, atol=2e-2)                 # bias added
    assert torch.equal(yn, rn)                                                          # other shapes: F.linear
    with gv.active():                                                                   # autograd: F.linear
        xg = x1.clone().requires_grad_(True)
        assert torch.equal(lin0(xg), F.linear(xg, lin0.weight)) and gv.calls == 2
    with torch.no_grad():                                                               # a weight changed in place
        lin0.weight.mul_(2)
        with gv.active():
            y2 = lin0(x1)
        assert torch.allclose(y2.float(), 2 * y1.float(), rtol=1e-2, atol=2e-2)


@pytest.mark.parametrize("family", FAMILIES)
def test_engine_with_gemv_gives_the_logits_of_the_engine_without(family):
    model = tiny_model(family).to(torch.bfloat16)
    fast, slow = MsaEngine(model, [], lambda p, x: x), MsaEngine(model, [], lambda p, x: x, cpu_gemv=False)
    assert fast.gemv is not None and slow.gemv is None
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(6, 262, (30,), generator=g).tolist()
    out = {}
    for name, eng in (("fast", fast), ("slow", slow)):
        st_ = eng.new_state(40, eng.compute_prefix(ids[:3]))
        rows = [eng.forward(st_, ids[3:12], list(range(3, 12)))]
        for i in range(12, len(ids)):                                  # decode steps, teacher-forced
            rows.append(eng.forward(st_, [ids[i]], [i]))
        out[name] = torch.stack(rows)
    scale = out["slow"].abs().max()
    assert fast.gemv.calls > 0
    assert (out["fast"] - out["slow"]).abs().max() <= 0.01 * scale, family        # measured: 0 to 2e-4
    assert (out["fast"].argmax(-1) == out["slow"].argmax(-1)).float().mean() >= 0.9
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_engines_on_one_model_share_the_copies_and_nesting_keeps_the_overrides():
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
