"""Single-row bf16 linears on the CPU through an AVX512-BF16 GEMV (decode on a CPU).

Design note. Decoding feeds one token per step, so every ``nn.Linear`` of the model multiplies a
matrix by ONE row: a GEMV bound by reading the weights. torch's bf16 path runs those at ~9-12
GB/s on this 2-core AVX512-BF16 VM (Gemma 3 270M's 262144 × 640 LM head: 31-35 ms per call, against
12 ms to read its 335 MB once). The routing extension's ``gemv_rows`` (``csrc/routing_cpu.cpp``)
reads the weight as it lies, row-major, one row at a time in memory order (32 elements per
``_mm512_dpbf16_ps``, a masked tail), with fp32 accumulation, rows split over torch's intra-op threads.

:class:`CpuGemv` covers the model's ``nn.Linear`` modules with bf16 CPU weights whose rows are
contiguous (the decoder layers' projections and the LM head) and, inside :meth:`CpuGemv.active`,
overrides their ``forward`` on the instance: one-row inputs (any leading shape of numel ==
in_features) without autograd run the GEMV and return the input's dtype as ``nn.Linear`` does; every
other input (prefill, encoding, training) goes to ``F.linear`` unchanged. Leaving the context deletes
the overrides, so the shared HF model is untouched elsewhere; a nested ``active`` of the same
instance leaves them to the outer one, and engines over one model share one instance
(:meth:`CpuGemv.for_model`). No copy of any weight is made: the kernel reads the live tensors.

What it does not do: run on GPUs, fp32 / fp16 weights, or CPUs without AVX512-BF16 (the kernel's
own checks, ``cpu_avx512.available``). The fallback, torch's ``F.linear`` for every call, is what runs
there and what ``MSA_CPU_KERNEL=0`` (process-wide) or ``MsaEngine(cpu_gemv=False)`` /
``Memory(cpu_gemv=False)`` (per engine) force on any CPU. Both paths accumulate in fp32 (the fp32 sum
of n products is within γ_n·Σ|w_i x_i| of exact, γ_n = n·2^-24 / (1 − n·2^-24)) and round the result to
bf16 (relative 2^-8; the bias add, one more rounding): each output is within about half a bf16 ulp of
the exact ``w @ x + b``, which the tests check call by call, while the two paths may differ by one bf16
ulp where their fp32 sums straddle a rounding boundary. :func:`gemv_reference` is the slow reference
(an fp32 matmul of the same bf16 values).
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    import torch

__all__ = ["CpuGemv", "gemv", "gemv_reference"]


def gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(O,) float32 ``w @ x`` for one bf16 row ``x`` (I,) and a bf16 weight ``w`` (O, I) with contiguous rows."""
    import torch

    from msa_memory.routing.kernels import cpu_avx512

    y = torch.empty(w.shape[0], dtype=torch.float32)
    cpu_avx512.gemv_rows(x.reshape(-1).contiguous(), w, y)
    return y


def gemv_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """:func:`gemv` in torch: an fp32 matmul of the same bf16 values (the reference; copies ``w`` to fp32)."""
    return w.float() @ x.reshape(-1).float()


def _eligible(lin: Any) -> bool:
    import torch

    w = lin.weight
    return w.device.type == "cpu" and w.dtype == torch.bfloat16 and w.dim() == 2 and w.stride(1) == 1


class CpuGemv:
    """The one-row forward of a model's bf16 linears, switched on inside :meth:`active`.

    Parameters
    ----------
    model : torch.nn.Module
        The HF causal LM; its ``nn.Linear`` modules with bf16 CPU weights (rows contiguous) are covered.
    """

    def __init__(self, model: Any) -> None:
        import torch

        self.modules = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and _eligible(m)]
        self._forwards = [self._forward(m) for m in self.modules]
        self._depth = 0
        self.calls = 0
        """One-row inputs the kernel served (tests and benchmarks read it)."""

    @classmethod
    def for_model(cls, model: Any) -> CpuGemv:
        """The one instance of ``model`` (engines over the same model share it, so nesting is safe)."""
        inst = _SHARED.get(model)
        if inst is None:
            inst = _SHARED[model] = cls(model)
        return inst

    @staticmethod
    def available(model: Any) -> bool:
        """True when the kernel runs here and ``model`` has bf16 linear weights on the CPU."""
        import torch

        from msa_memory.routing.kernels import cpu_avx512

        return (any(isinstance(m, torch.nn.Linear) and _eligible(m) for m in model.modules())
                and cpu_avx512.available())

    def _forward(self, lin: Any) -> Any:
        import torch
        import torch.nn.functional as F

        n_in, n_out = lin.in_features, lin.out_features

        def forward(x: torch.Tensor) -> torch.Tensor:
            w = lin.weight
            if (x.numel() != n_in or x.dtype != torch.bfloat16 or x.device.type != "cpu" or not _eligible(lin)
                    or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))):
                return F.linear(x, w, lin.bias)
            y = gemv(x, w).to(x.dtype)
            if lin.bias is not None:
                y = y + lin.bias
            self.calls += 1
            return y.view(*x.shape[:-1], n_out)

        return forward

    @contextmanager
    def active(self) -> Iterator[CpuGemv]:
        """Route the covered modules' one-row calls through the kernel until the context exits."""
        if self._depth:            # nested (another session on the same model): the overrides are on
            self._depth += 1
            try:
                yield self
            finally:
                self._depth -= 1
            return
        self._depth = 1
        try:
            for lin, fwd in zip(self.modules, self._forwards):
                lin.forward = fwd
            yield self
        finally:
            self._depth = 0
            for lin in self.modules:
                lin.__dict__.pop("forward", None)


_SHARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
