"""The one interface of routing's fast paths: a kernel states when it applies, the index asks.

Design note. A routing kernel is an object (:class:`RoutingKernel`) that serves one *stage* of a
route (:data:`Stage`) and declares, as class attributes, what it needs: the device types it runs on,
the key dtypes and key layouts it reads, the CPU flags it needs, the score reduces it computes and
the :class:`~msa_memory.routing.config.RoutingConfig` switch that turns it off. What cannot be
declared (an import, a build, an environment switch) is :meth:`RoutingKernel.unavailable_reason`.
:meth:`RoutingKernel.why_not` checks a :class:`Need` (what one step of one route asks) against all of
it and says, in words, why the kernel does not serve it; ``None`` means it does.

Stages and what a kernel of each provides (the arguments are the index's, see ``routing.index``):

- ``"scores"``: ``score(lhs, keys, plan, out)``: chunk scores of a query operand ``lhs`` (G, R, Dk)
  against one layer's keys in the kernel's layout, into ``out`` (C,) float32. A kernel with a key layout
  of its own (``layout``) also gives ``pack(keys) -> stored`` and ``unpack(stored, start, stop)``; the
  index then keeps the keys in that layout.
- ``"doc_reduce"``: ``reduce(cs, chunk_map, chunk_reduce, out)``: per-document max / mean of chunk scores.
- ``"doc_topk"``: ``topk(cs, chunk_map, k) -> (2, k) float64``: document max and top-k in one go.
- ``"route"``: ``make(index)``: an object whose ``route(layer, q, k)`` returns the (2, k) float64 host
  result of ``index.route_device`` (e.g. a CUDA graph of it).

The slow reference path (torch, :mod:`msa_memory.routing.scoring`, itself tested against
:mod:`msa_memory.routing.reference`) runs wherever no kernel applies, and wherever a kernel fails: the
index then marks the kernel broken and does not ask it again. Every kernel ships with a test that it
equals the reference (``tests/unit/routing/test_kernels.py`` runs every registered kernel's own check
where it applies, and the fallback everywhere).

What it does not do: pick among kernels (``kernels.select`` does, by ``priority``) or hold any tensor.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

if TYPE_CHECKING:
    from msa_memory.routing.config import RoutingConfig

__all__ = ["Need", "RoutingKernel", "Stage", "STAGES", "missing_cpu_flags"]

Stage = Literal["scores", "doc_reduce", "doc_topk", "route"]
STAGES: tuple[str, ...] = ("scores", "doc_reduce", "doc_topk", "route")


@dataclass(frozen=True)
class Need:
    """What one step of a route asks of a kernel (fields a stage does not use keep their defaults)."""

    stage: Stage
    """The step: ``"scores"``, ``"doc_reduce"``, ``"doc_topk"`` or ``"route"``."""
    device: str
    """Device type of the keys: ``"cpu"``, ``"cuda"``, ..."""
    config: RoutingConfig
    """The index's routing configuration (reduces, switches)."""
    key_dtype: str = ""
    """Dtype of the resident keys (``"bfloat16"``, ``"float16"``, ``"float32"``)."""
    layout: str = ""
    """Layout the keys are held in (``"rows"``, ``"chunk_minor"``, ``"blocked"``); ``""`` while the index
    chooses it (a kernel with a layout of its own is asked then)."""
    head_dim: int = 0
    """Per-head dimension D of the keys (0: not known)."""
    rows: int = 0
    """Rows R of the query operand (``"scores"``)."""
    query_reduce: str = ""
    """The operand's query reduce after the folds of ``prepare_lhs`` (``"scores"``; ``""``: the config's)."""
    sorted_map: bool = False
    """Each document's chunks are one contiguous run, in document order (``"doc_reduce"``, ``"doc_topk"``)."""
    n_docs: int = 0
    """Documents of the index (``"doc_topk"``)."""
    k: int = 0
    """Documents asked for (``"doc_topk"``, ``"route"``)."""


def missing_cpu_flags(flags: tuple[str, ...]) -> list[str]:
    """The /proc/cpuinfo ``flags`` this CPU lacks (all of them off x86-64 Linux or without /proc/cpuinfo)."""
    if not flags:
        return []
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return list(flags)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [x for x in flags if x not in have]
    except OSError:
        pass
    return list(flags)


def _one_of(what: str, value: str, allowed: tuple[str, ...]) -> str | None:
    if not allowed or value in allowed:
        return None
    return f"needs {what} {' or '.join(repr(a) for a in allowed)}, not {value!r}"


class RoutingKernel:
    """A fast path of one routing stage; subclasses set the class attributes and the stage's methods."""

    name: ClassVar[str] = ""
    """Unique short name (what ``RouterIndex.chunk_scores(kernel=...)`` forces, e.g. ``"cpu"``)."""
    stage: ClassVar[Stage] = "scores"
    devices: ClassVar[tuple[str, ...]] = ()
    """Device types it runs on."""
    key_dtypes: ClassVar[tuple[str, ...]] = ()
    """Key dtypes it reads; () any."""
    layouts: ClassVar[tuple[str, ...]] = ()
    """Key layouts it serves; () any."""
    layout: ClassVar[str] = ""
    """The key layout it keeps (packs) the keys in; ``""``: none of its own."""
    block: ClassVar[int] = 1
    """Chunks per block of that layout (the torch path's tiles over it are multiples of it)."""
    even_head_dim: ClassVar[bool] = False
    """It reads the head dimension in pairs (D must be even)."""
    cpu_flags: ClassVar[tuple[str, ...]] = ()
    """/proc/cpuinfo flags it needs (checked where ``"cpu"`` is the device)."""
    query_reduces: ClassVar[tuple[str, ...]] = ()
    """Query reduces it computes; () any."""
    chunk_reduces: ClassVar[tuple[str, ...]] = ()
    """Chunk → document reduces it computes; () any."""
    needs_sorted_map: ClassVar[bool] = False
    """It reads documents as contiguous chunk runs."""
    switch: ClassVar[str] = ""
    """The boolean ``RoutingConfig`` field that turns it off (``""``: none)."""
    priority: ClassVar[int] = 0
    """Higher is asked first when several apply to the same stage."""

    def unavailable_reason(self) -> str | None:
        """Why it cannot run in this process at all (an import, a build, a switch), else None. May build."""
        return None

    def missing_cpu_flags(self) -> list[str]:
        """The flags of :attr:`cpu_flags` this CPU lacks."""
        return missing_cpu_flags(self.cpu_flags)

    def device_types(self) -> tuple[str, ...]:
        """The device types it runs on here (default :attr:`devices`)."""
        return self.devices

    def extra_why_not(self, need: Need) -> str | None:
        """A subclass's own condition beyond the declared ones (None: no objection)."""
        return None

    def why_not(self, need: Need) -> str | None:
        """None when this kernel serves ``need``; else why not, in words. The cheap declared checks come
        first; :meth:`unavailable_reason` (which may import or build) last."""
        cfg = need.config
        checks = (   # what it computes, then where it runs, then what it reads
            None if need.stage == self.stage else f"serves stage {self.stage!r}, not {need.stage!r}",
            _one_of("query_reduce", need.query_reduce or cfg.query_reduce, self.query_reduces),
            _one_of("chunk_reduce", cfg.chunk_reduce, self.chunk_reduces),
            _one_of("a device of type", need.device, self.device_types()),
            None if not self.switch or getattr(cfg, self.switch) else f"is off (RoutingConfig.{self.switch}=False)",
            _one_of("keys of dtype", need.key_dtype, self.key_dtypes) if need.key_dtype else None,
            _one_of("keys in layout", need.layout, self.layouts) if need.layout else None,
            ("needs an even head dimension" if self.even_head_dim and need.head_dim % 2 else None),
            ("needs each document's chunks as one run (a sorted chunk → document map)"
             if self.needs_sorted_map and not need.sorted_map else None),
        )
        for why in checks:
            if why is not None:
                return why
        if need.device == "cpu" and self.cpu_flags:
            missing = self.missing_cpu_flags()
            if missing:
                return f"needs a CPU with {', '.join(missing)} (/proc/cpuinfo flags)"
        return self.extra_why_not(need) or self.unavailable_reason()

    def applies(self, need: Need) -> bool:
        """True when :meth:`why_not` has no objection."""
        return self.why_not(need) is None

    def __repr__(self) -> str:
        return f"<routing kernel {self.name!r}: {self.stage} on {', '.join(self.devices) or 'any device'}>"

    # stage methods (one group per stage; see the module note)
    def score(self, lhs: Any, keys: Any, plan: Any, out: Any) -> None:   # pragma: no cover - interface
        raise NotImplementedError

    def pack(self, keys: Any) -> Any:   # pragma: no cover - interface
        raise NotImplementedError

    def unpack(self, stored: Any, start: int = 0, stop: int | None = None) -> Any:   # pragma: no cover
        raise NotImplementedError
