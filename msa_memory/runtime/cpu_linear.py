"""Single-row bf16 linears on the CPU through the AVX512-BF16 routing kernel (decode on a CPU).

Design note. Decoding feeds one token per step, so every ``nn.Linear`` of the model multiplies a
matrix by ONE row: a GEMV bound by reading the weights. torch's bf16 path runs those at ~9-12
GB/s on this 2-core AVX512-BF16 VM (Gemma 3 270M's 262144 × 640 LM head: 31-35 ms per call, against
12 ms to read its 335 MB once). The routing kernel (``routing_cpu.score_blocked``) already streams
bf16 rows in a blocked layout with fp32 accumulation at close to copy bandwidth; a weight (out, in)
is a router-key matrix of ``out`` chunks, one head of ``in`` dims, and a single-row input is a
one-token query with the dot score, so the same kernel computes ``W @ x`` (16.8 ms for that LM head,
fp32 accumulation: max abs error 2e-5 against fp32, where torch's bf16 result rounds to bf16).

:class:`CpuGemv` packs a blocked copy of each eligible weight once (bf16 weight on the CPU, even
``in_features``: the decoder layers' projections and the LM head) and, inside :meth:`CpuGemv.active`,
overrides those modules' ``forward`` on the instance: one-row inputs (any leading shape of
numel == in_features) without autograd run the kernel and return the input's dtype as
``nn.Linear`` does; every other input (prefill, encoding, training) goes to ``F.linear`` unchanged.
Leaving the context deletes the overrides, so the shared HF model is untouched elsewhere.

What it costs: a second copy of the weights it covers (Gemma 3 270M: ~535 MB), built on first use
(~0.6 s) and again for a weight changed in place since (its storage pointer, version or shape). What it does not do: run on GPUs, fp32 / fp16 weights, or CPUs without AVX512-BF16 (the
kernel's own checks, ``routing_cpu.available``; ``MSA_CPU_KERNEL=0`` turns it off too).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    import torch

__all__ = ["CpuGemv", "gemv"]


def gemv(x: torch.Tensor, blk: torch.Tensor, out_features: int) -> torch.Tensor:
    """(out_features,) float32 ``W @ x`` for one bf16 row ``x`` (in,) and ``blk = pack_blocked(W[:, None, :])``."""
    import torch

    from msa_memory.runtime import routing_cpu

    y = torch.empty(out_features, dtype=torch.float32)
    routing_cpu.score_blocked(x.reshape(1, 1, -1).contiguous(), blk, 1, 1, "max", y)
    return y


def _eligible(lin: Any) -> bool:
    import torch

    w = lin.weight
    return w.device.type == "cpu" and w.dtype == torch.bfloat16 and w.dim() == 2 and w.shape[1] % 2 == 0


class CpuGemv:
    """Blocked copies of a model's bf16 linear weights and the one-row forward that uses them.

    Parameters
    ----------
    model : torch.nn.Module
        The HF causal LM; its ``nn.Linear`` modules with bf16 CPU weights and even ``in_features`` are
        covered (each packed on the first :meth:`active`).
    """

    def __init__(self, model: Any) -> None:
        import torch

        self.modules = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and _eligible(m)]
        self._packed: dict[int, tuple[Any, tuple, Any]] = {}   # id(module) -> (blocked weight, stamp, forward)
        self.calls = 0
        """One-row inputs the kernel served (tests and benchmarks read it)."""

    @staticmethod
    def available(model: Any) -> bool:
        """True when the kernel runs here and ``model`` has bf16 linear weights on the CPU."""
        import torch

        from msa_memory.runtime import routing_cpu

        return (any(isinstance(m, torch.nn.Linear) and _eligible(m) for m in model.modules())
                and routing_cpu.available())

    def nbytes(self) -> int:
        """Bytes of the blocked copies packed so far."""
        return sum(b.numel() * b.element_size() for b, _, _ in self._packed.values())

    def _forward(self, lin: Any, blk: Any) -> Any:
        import torch
        import torch.nn.functional as F

        n_in, n_out = lin.in_features, lin.out_features

        def forward(x: torch.Tensor) -> torch.Tensor:
            if x.numel() != n_in or x.dtype != torch.bfloat16 or x.device.type != "cpu" or (
                    torch.is_grad_enabled() and (x.requires_grad or lin.weight.requires_grad)):
                return F.linear(x, lin.weight, lin.bias)
            y = gemv(x, blk, n_out).to(x.dtype)
            if lin.bias is not None:
                y = y + lin.bias
            self.calls += 1
            return y.view(*x.shape[:-1], n_out)

        return forward

    @contextmanager
    def active(self) -> Iterator[CpuGemv]:
        """Route the covered modules' one-row calls through the kernel until the context exits."""
        import torch

        from msa_memory.runtime import routing_cpu

        done = []
        try:
            for lin in self.modules:
                w = lin.weight
                stamp = (w.data_ptr(), w._version, tuple(w.shape))   # repacked when the weight changed
                blk, old, fwd = self._packed.get(id(lin), (None, None, None))
                if blk is None or old != stamp:
                    with torch.no_grad():
                        blk = routing_cpu.pack_blocked(w.detach().view(w.shape[0], 1, w.shape[1]))
                    fwd = self._forward(lin, blk)
                    self._packed[id(lin)] = (blk, stamp, fwd)
                lin.forward = fwd
                done.append(lin)
            yield self
        finally:
            for lin in done:
                del lin.forward
