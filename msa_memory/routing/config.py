"""How router scores are computed and reduced (msa-reference §3.3): the choices, defined once.

The score and reduce literals below are the only definitions of them: the router adapter's config
(:class:`msa_memory.routing.adapter.RouterConfig`), the runtime's :class:`RoutingConfig` and the
reference scorer (:mod:`msa_memory.routing.reference`) all use them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from msa_memory.errors import ConfigError

__all__ = ["ScoreMode", "HeadReduce", "QueryReduce", "ChunkReduce", "CHOICES", "check_choice", "RoutingConfig"]

ScoreMode = Literal["dot", "cosine"]
HeadReduce = Literal["mean", "max"]
QueryReduce = Literal["max", "mean", "last"]
ChunkReduce = Literal["max", "mean"]

CHOICES = {
    "score": ("dot", "cosine"),
    "head_reduce": ("mean", "max"),
    "query_reduce": ("max", "mean", "last"),
    "chunk_reduce": ("max", "mean"),
}


def check_choice(name: str, value: str, what: str = "Routing") -> None:
    """ConfigError unless ``value`` is one of :data:`CHOICES` ``[name]``."""
    allowed = CHOICES[name]
    if value not in allowed:
        raise ConfigError(f"{what} {name}={value!r} is not supported; allowed: {list(allowed)}.")


@dataclass(frozen=True)
class RoutingConfig:
    """How router scores are computed and reduced (msa-reference §3.3); validated on construction."""

    score: ScoreMode = "dot"
    """``"dot"``: raw <q, K̄ᵣ>/√D (reference inference); ``"cosine"``: per-head L2-normalized (paper)."""
    head_reduce: HeadReduce = "mean"
    """Reduce over query heads: ``"mean"`` (MSA) or ``"max"``."""
    query_reduce: QueryReduce = "max"
    """Reduce over query tokens: ``"max"`` (MSA), ``"mean"`` or ``"last"``."""
    chunk_reduce: ChunkReduce = "max"
    """Reduce a document's chunk scores: ``"max"`` (MSA) or ``"mean"``."""
    top_k: int = 16
    """Documents chosen per router layer (fewer if the store holds fewer)."""
    tile_chunks: int = 262_144
    """Chunks scored per matmul tile; bounds the score buffer to rows × tile_chunks floats (on CPU the
    tile also shrinks so that buffer stays ≤ 2 MiB, cache-sized)."""
    cuda_graphs: bool = True
    """On CUDA, replay each layer's route as a cached CUDA graph (one launch, one device→host copy)."""
    fused_scores: bool = True
    """On CUDA with triton, score query-reduce-max queries of ≥ ``fused_min_rows`` rows with the fused kernel."""
    fused_min_rows: int = 1
    """Rows of the left operand (query tokens × heads kept apart) from which the fused kernel is used."""
    fused_topk: bool = True
    """On CUDA with triton, chunk-reduce max over a sorted chunk → document map: the document max and the
    top-k as two Triton launches (``fused_triton.doc_max_topk``) instead of about ten torch kernels."""
    cpu_kernel: bool = True
    """On CPUs with AVX512-BF16, keep bf16 keys in the blocked layout and score them with the AVX512-BF16
    kernel (``cpu_avx512``; built at first use, ``MSA_CPU_KERNEL=0`` turns it off everywhere). False: the
    chunk-minor layout and the torch GEMM path."""
    compute_dtype: str = "auto"
    """Dtype of the resident keys and the score GEMM: ``"auto"`` keeps the stored dtype on GPUs and on
    CPUs with native bf16 (AMX / AVX512-BF16) and widens bf16/fp16 keys to float32 once, at load, on
    other CPUs (where bf16 GEMMs are emulated and ~100× slower); or ``"float32"`` / ``"bfloat16"``."""

    def __post_init__(self) -> None:
        for name in CHOICES:
            check_choice(name, getattr(self, name))
        if int(self.top_k) < 1:
            raise ConfigError(f"Routing top_k must be >= 1, got {self.top_k!r}.")
        if int(self.tile_chunks) < 1:
            raise ConfigError(f"Routing tile_chunks must be >= 1, got {self.tile_chunks!r}.")
        if int(self.fused_min_rows) < 1:
            raise ConfigError(f"Routing fused_min_rows must be >= 1, got {self.fused_min_rows!r}.")
        if self.compute_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"Routing compute_dtype={self.compute_dtype!r} is not one of "
                              "'auto', 'float32', 'bfloat16', 'float16'.")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RoutingConfig:
        """Build from a dict; accepts MSA ``msa_config`` spellings (``*_reduce_method``, ``top_k_docs``)."""
        aliases = {
            "head_reduce_method": "head_reduce", "query_reduce_method": "query_reduce",
            "chunk_reduce_method": "chunk_reduce", "top_k_docs": "top_k", "doc_top_k": "top_k",
            "score_mode": "score",
        }
        known = {f for f in cls.__dataclass_fields__}
        out: dict[str, Any] = {}
        for key, value in d.items():
            key = aliases.get(key, key)
            if key in known:
                out[key] = value
        return cls(**out)
