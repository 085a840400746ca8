"""CPU routing kernel: bf16 router keys in a blocked layout, scored with AVX512-BF16 (``csrc/routing_cpu.cpp``).

On CPUs with AVX512-BF16, :class:`~msa_memory.routing.index.RouterIndex` keeps bf16 keys blocked,
(nb, H, D/2, 32, 2) (:func:`pack_blocked`): 32 chunks per block, the two dims of each pair side by
side, so one 64-byte line is the (chunk lane × dim pair) operand of ``_mm512_dpbf16_ps`` and each
block is one contiguous run. :func:`score_blocked` streams the keys once with fp32 accumulation,
fuses the head / query reduce and runs on all torch threads (``at::parallel_for``). Every other
case (fp32 keys, no AVX512-BF16, kernel off or broken) keeps the torch path of ``routing``. The same
extension holds :func:`doc_reduce` (per-document max / mean of chunk scores) and :func:`gemv_rows`
(one bf16 row times a row-major bf16 weight: the decode-step linears of ``runtime.cpu_linear``).

The extension is compiled at first use with ``torch.utils.cpp_extension.load`` (g++ with
``-mavx512bf16``, ninja) into torch's extension cache (``TORCH_EXTENSIONS_DIR``, default
``~/.cache/torch_extensions``); later processes reuse the build. ``MSA_CPU_KERNEL=0`` turns it
off (the fallback switch: routing then runs the torch path of ``routing``, and one-row linears
``F.linear``, on any CPU). A missing compiler, ninja or CPU feature, or a failed build, leaves
:func:`load` returning None after one logged warning, and routing uses the torch path;
:func:`unavailable_reason` says which of these applies (tests name it in their skip reasons).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from msa_memory.routing.kernels import base

if TYPE_CHECKING:
    import torch

__all__ = ["BLOCK", "CPU_FLAGS", "KERNELS", "BlockedDocReduce", "BlockedScores", "available", "cpu_supported",
           "disabled_by_env", "doc_reduce", "gemv_rows", "load", "missing_cpu_flags", "pack_blocked", "score_blocked",
           "unavailable_reason", "unpack_blocked"]

log = logging.getLogger(__name__)

BLOCK = 32
"""Chunks per block of the blocked key layout."""

_SOURCE = Path(__file__).with_name("csrc") / "routing_cpu.cpp"
_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512bf16", "-fopenmp"]
CPU_FLAGS = ("avx512f", "avx512bw", "avx512_bf16")
"""The /proc/cpuinfo flags the kernel needs (the instructions of ``_FLAGS``)."""
_lock = threading.Lock()
_module: Any = None
_tried = False
_error = ""          # why the last build failed ("" when it did not)


def disabled_by_env() -> bool:
    """True when ``MSA_CPU_KERNEL`` is set to 0 / false / off / no."""
    return os.environ.get("MSA_CPU_KERNEL", "1").strip().lower() in ("0", "false", "off", "no")


def missing_cpu_flags() -> list[str]:
    """The flags of :data:`CPU_FLAGS` this CPU lacks (all of them off x86-64 Linux or without /proc/cpuinfo)."""
    return base.missing_cpu_flags(CPU_FLAGS)


def cpu_supported() -> bool:
    """True on x86-64 Linux CPUs with AVX512F, AVX512BW and AVX512-BF16 (/proc/cpuinfo flags)."""
    return not missing_cpu_flags()


def unavailable_reason() -> str | None:
    """Why the kernel cannot be used here (None when it can): the switch, the missing CPU flags, or the
    failed build. Builds the extension on the first call, as :func:`available` does."""
    if load() is not None:
        return None
    if disabled_by_env():
        return "MSA_CPU_KERNEL=0 turns the CPU kernel off"
    missing = missing_cpu_flags()
    if missing:
        return (f"this CPU lacks {', '.join(missing)} (/proc/cpuinfo flags on x86-64 Linux), which the "
                "AVX512-BF16 kernel needs")
    return f"the AVX512-BF16 extension could not be built here ({_error or 'see the logged warning'})"


def load() -> Any:
    """The compiled extension module, or None where it cannot be used (see the module note).

    Built (or found in the cache) once per process; a failure is logged once and remembered.
    """
    global _module, _tried, _error
    if _tried:
        return _module
    with _lock:
        if _tried:
            return _module
        if disabled_by_env() or not cpu_supported():
            _tried = True
            return None
        try:
            _module = _build()
        except Exception as e:  # noqa: BLE001  (no compiler / ninja / headers, a failed build: torch path)
            _error = f"{type(e).__name__}: {str(e).strip()[:200]}"
            log.warning("AVX512-BF16 routing kernel unavailable (%s: %s); routing uses the torch path. "
                        "Set MSA_CPU_KERNEL=0 to skip the build.", type(e).__name__, str(e).strip()[:500])
            _module = None
        _tried = True
    return _module


def _build() -> Any:
    import shutil

    from torch.utils import cpp_extension

    try:   # the ninja wheel's binary: torch looks for `ninja` on PATH, which a venv not activated lacks
        import ninja

        if shutil.which("ninja") is None:
            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    return cpp_extension.load(name="msa_routing_cpu", sources=[str(_SOURCE)], extra_cflags=_FLAGS,
                              extra_ldflags=["-fopenmp"], verbose=False)


def available() -> bool:
    """True when the kernel can be used here (builds it on the first call)."""
    return load() is not None


def _reset_for_tests() -> None:
    """Forget the cached load result (tests toggle ``MSA_CPU_KERNEL``)."""
    global _module, _tried, _error
    with _lock:
        _module, _tried, _error = None, False, ""


def pack_blocked(keys: torch.Tensor) -> torch.Tensor:
    """(nb, H, D/2, 32, 2) blocked copy of (C, H, D) keys (D even), zero-padded to nb = ⌈C/32⌉ blocks."""
    import torch

    C, H, D = keys.shape
    nb = -(-C // BLOCK)
    out = torch.empty(nb, H, D // 2, BLOCK, 2, dtype=keys.dtype, device=keys.device)
    full = C // BLOCK
    step = 8192                                       # blocks per copy: bounds the temporary views' working set
    for b in range(0, full, step):
        e = min(full, b + step)
        out[b:e].copy_(keys[b * BLOCK:e * BLOCK].reshape(e - b, BLOCK, H, D // 2, 2).permute(0, 2, 3, 1, 4))
    if full < nb:
        tail = torch.zeros(BLOCK, H, D, dtype=keys.dtype, device=keys.device)
        tail[:C - full * BLOCK] = keys[full * BLOCK:]
        out[full].copy_(tail.view(BLOCK, H, D // 2, 2).permute(1, 2, 0, 3))
    return out


def unpack_blocked(blk: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """(stop - start, H, D) row-major copy of chunks ``start:stop`` of blocked keys (``stop`` ≤ C)."""
    nb, H, P = blk.shape[:3]
    stop = nb * BLOCK if stop is None else stop
    b0, b1 = start // BLOCK, -(-stop // BLOCK)
    rows = blk[b0:b1].permute(0, 3, 1, 2, 4).reshape((b1 - b0) * BLOCK, H, 2 * P)
    return rows[start - b0 * BLOCK:stop - b0 * BLOCK]


def score_blocked(lhs: torch.Tensor, blk: torch.Tensor, T: int, rep: int, query_reduce: str,
                  out: torch.Tensor) -> None:
    """``out`` (C,) float32 ← chunk scores of ``lhs`` (G, R, Dk) bf16 against blocked keys ``blk``.

    ``query_reduce`` ``"max"``: the max over all G·R rows; ``"mean"``: the max over the groups and
    the ``rep`` rows of each of the T tokens (row = t·rep + j), then the mean over tokens (the
    reduces of ``routing._reduce_rows``). Raises where the kernel is not available.
    """
    mod = load()
    if mod is None:
        raise RuntimeError("the AVX512-BF16 routing kernel is not available")
    mod.score_blocked(lhs, blk, int(T), int(rep), 0 if query_reduce == "max" else 1, out)


def gemv_rows(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> None:
    """``out`` (O,) float32 ← ``w`` (O, I) bf16 (rows contiguous) times one bf16 row ``x`` (I,), fp32
    accumulation: a one-row linear straight from the row-major weight (``runtime.cpu_linear``). Raises
    where the kernel is not available."""
    mod = load()
    if mod is None:
        raise RuntimeError("the AVX512-BF16 routing kernel is not available")
    mod.gemv_rows(x, w, out)


def doc_reduce(cs: torch.Tensor, offsets: torch.Tensor, chunk_reduce: str, out: torch.Tensor) -> None:
    """``out`` (N,) float32 ← per-document ``"max"`` or ``"mean"`` of chunk scores ``cs`` (C,) float32 over the
    sorted runs ``cs[offsets[d]:offsets[d + 1]]`` (``offsets`` (N + 1,) int64, every run non-empty): what
    ``torch.segment_reduce`` computes, without its fixed cost. Raises where the kernel is not available."""
    mod = load()
    if mod is None:
        raise RuntimeError("the AVX512-BF16 routing kernel is not available")
    mod.doc_reduce(cs, offsets, 0 if chunk_reduce == "max" else 1, out)


class _Extension(base.RoutingKernel):
    """What both kernels of the extension need: a CPU with :data:`CPU_FLAGS`, ``RoutingConfig.cpu_kernel``,
    ``MSA_CPU_KERNEL`` not 0, and the extension built (:func:`load`)."""

    devices = ("cpu",)
    cpu_flags = CPU_FLAGS
    switch = "cpu_kernel"
    priority = 10

    def missing_cpu_flags(self) -> list[str]:
        return missing_cpu_flags()          # the module's function, looked up at each call (tests replace it)

    def unavailable_reason(self) -> str | None:
        return unavailable_reason()


class BlockedScores(_Extension):
    """Chunk scores of bf16 keys held blocked, (⌈C/32⌉, H, D/2, 32, 2): :func:`score_blocked`."""

    name = "cpu"
    stage = "scores"
    key_dtypes = ("bfloat16",)
    layouts = ("blocked",)
    layout = "blocked"
    block = BLOCK
    even_head_dim = True

    def pack(self, keys: torch.Tensor) -> torch.Tensor:
        return pack_blocked(keys)

    def unpack(self, stored: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        return unpack_blocked(stored, start, stop)

    def score(self, lhs: torch.Tensor, keys: torch.Tensor, plan: Any, out: torch.Tensor) -> None:
        score_blocked(lhs, keys, plan.T, plan.rep, plan.query_reduce, out)


class BlockedDocReduce(_Extension):
    """Per-document max / mean over sorted chunk runs (:func:`doc_reduce`), for indexes whose keys
    :class:`BlockedScores` holds (its extension is loaded there; no build for other indexes)."""

    name = "cpu_doc_reduce"
    stage = "doc_reduce"
    layouts = ("blocked",)
    needs_sorted_map = True

    def reduce(self, cs: torch.Tensor, chunk_map: Any, chunk_reduce: str, out: torch.Tensor) -> None:
        doc_reduce(cs.float().contiguous(), chunk_map.offsets, chunk_reduce, out)


KERNELS = (BlockedScores(), BlockedDocReduce())
"""The kernels of this module (found by :func:`msa_memory.routing.kernels.all_kernels`)."""
