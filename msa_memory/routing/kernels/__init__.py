"""The fast paths of routing, behind one interface (:mod:`.base`): each kernel states when it applies
(device, key dtype and layout, CPU flags, score / reduce kinds, its ``RoutingConfig`` switch), falls back
to the torch reference path (:mod:`msa_memory.routing.scoring`) when it fails, and is tested against it
(``tests/unit/routing/test_kernels.py`` for every kernel, plus each kernel's own file under
``tests/equivalence/``):

- ``cpu_avx512``: bf16 keys in a blocked layout scored by an AVX512-BF16 C++ extension (``csrc/``),
  built at first use (``cpu``), and the per-document reduce of that extension (``cpu_doc_reduce``);
  off with ``RoutingConfig.cpu_kernel`` or ``MSA_CPU_KERNEL=0``.
- ``fused_triton``: query-reduce-max scores (``triton``) and the chunk-max document top-k
  (``triton_doc_topk``) as Triton kernels (``_triton_jit``, imported only where they may run); CUDA,
  or CPU under ``TRITON_INTERPRET=1``.
- ``cuda_graph``: one layer's whole route captured and replayed as a CUDA graph (``cuda_graph``).

:func:`select` is how :class:`~msa_memory.routing.index.RouterIndex` picks: the applicable kernel of the
highest priority, or None for the reference path. Kernels are found, not listed: every public module of
this package that defines ``KERNELS`` (a tuple of :class:`~.base.RoutingKernel` objects) contributes, so a
new routing kernel is one module here plus its test.
"""

from __future__ import annotations

import importlib
import pkgutil
import threading
from collections.abc import Iterable

from msa_memory.routing.kernels.base import STAGES, Need, RoutingKernel, Stage

__all__ = ["Need", "RoutingKernel", "Stage", "STAGES", "all_kernels", "named", "select", "why_not"]

_lock = threading.Lock()
_found: tuple[RoutingKernel, ...] | None = None


def all_kernels() -> tuple[RoutingKernel, ...]:
    """Every registered kernel, highest priority first (modules imported once, on the first call)."""
    global _found
    if _found is None:
        with _lock:
            if _found is None:
                found: list[RoutingKernel] = []
                for mod in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
                    if mod.name.startswith("_") or mod.name == "base":
                        continue
                    found.extend(getattr(importlib.import_module(f"{__name__}.{mod.name}"), "KERNELS", ()))
                names = [k.name for k in found]
                dup = sorted({n for n in names if names.count(n) > 1})
                if dup or any(k.stage not in STAGES for k in found):
                    raise RuntimeError(f"Routing kernels with one name twice ({dup}) or an unknown stage.")
                _found = tuple(sorted(found, key=lambda k: -k.priority))
    return _found


def named(name: str) -> RoutingKernel | None:
    """The registered kernel called ``name``, else None."""
    return next((k for k in all_kernels() if k.name == name), None)


def select(need: Need, skip: Iterable[str] = ()) -> RoutingKernel | None:
    """The kernel that serves ``need`` (highest priority first), skipping the names in ``skip`` (kernels
    that failed); None: the reference path."""
    skip = set(skip)
    return next((k for k in all_kernels() if k.name not in skip and k.applies(need)), None)


def why_not(need: Need) -> dict[str, str | None]:
    """Every kernel of ``need``'s stage and why it does not serve it (None: it does); for tests and benchmarks."""
    return {k.name: k.why_not(need) for k in all_kernels() if k.stage == need.stage}
