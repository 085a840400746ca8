"""How router keys are made and scored (msa-reference §1.2, §3.3): the choices, defined once, and the
two configurations that use them.

- :class:`ScoreChoices`: the score, the three reduces and top-k, with the one set of defaults (MSA's:
  cosine, head mean, query max, chunk max, 16 documents). Both configurations below derive from it and
  add no field of it again.
- :class:`RouterConfig` (``ScoreChoices`` + the adapter's layout): an adapter's own configuration, saved
  with its weights as one flat JSON object (layers, head layout, pooling, the score and reduces it was
  trained for, grids, query suffix); it names the router id.
- :class:`RoutingConfig` (``ScoreChoices`` + the runtime's switches): how a runtime scores resident keys
  (the adapter's choices, taken by :meth:`RoutingConfig.for_router`, plus tile size and the fast-path
  switches); never saved.

The score and reduce literals below are the only definitions of them: both configurations and the
reference scorer (:mod:`msa_memory.routing.reference`) use them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from msa_memory.errors import ConfigError
from msa_memory.schemas.records import check_shifted_window

__all__ = ["ScoreMode", "HeadReduce", "QueryReduce", "ChunkReduce", "CHOICES", "SCORE_FIELDS", "check_choice",
           "ScoreChoices", "RoutingConfig", "RouterConfig", "check_query_suffix"]

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


@dataclass(frozen=True, kw_only=True)
class ScoreChoices:
    """How router scores are computed, reduced and cut (msa-reference §3.3); validated on construction."""

    score: ScoreMode = "cosine"
    """``"cosine"``: q and K̄ᵣ L2-normalized per head, scale 1 (the paper, training, every adapter here);
    ``"dot"``: raw <q, K̄ᵣ>/√D (MSA's reference inference engine)."""
    head_reduce: HeadReduce = "mean"
    """Reduce over query heads: ``"mean"`` (MSA) or ``"max"``."""
    query_reduce: QueryReduce = "max"
    """Reduce over query tokens: ``"max"`` (MSA), ``"mean"`` or ``"last"``."""
    chunk_reduce: ChunkReduce = "max"
    """Reduce a document's chunk scores: ``"max"`` (MSA) or ``"mean"``."""
    top_k: int = 16
    """Documents chosen per router layer, fewer if the store holds fewer (MSA: doc_top_k, else top_k_docs)."""

    def __post_init__(self) -> None:
        what = "Routing" if isinstance(self, RoutingConfig) else type(self).__name__
        for name in CHOICES:
            check_choice(name, getattr(self, name), what)
        if int(self.top_k) < 1:
            raise ConfigError(f"{what} top_k must be >= 1, got {self.top_k!r}.")

    def score_choices(self) -> dict[str, Any]:
        """The fields of :class:`ScoreChoices` (score, reduces, top-k) as a dict."""
        return {name: getattr(self, name) for name in SCORE_FIELDS}


SCORE_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(ScoreChoices))
"""The names of :class:`ScoreChoices`' fields."""


@dataclass(frozen=True, kw_only=True)
class RoutingConfig(ScoreChoices):
    """How a runtime scores resident router keys: :class:`ScoreChoices` plus tile size and fast-path switches."""

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
        super().__post_init__()
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

    @classmethod
    def for_router(cls, router_config: Any, overrides: RoutingConfig | dict[str, Any] | None = None) -> RoutingConfig:
        """How a runtime scores the keys of an adapter: ``router_config``'s score, reduces and top-k (a
        :class:`RouterConfig`; None: the defaults), with ``overrides`` (a dict of fields, or a whole config,
        which then wins as it is)."""
        if isinstance(overrides, RoutingConfig):
            return overrides
        base: dict[str, Any] = {}
        if router_config is not None:
            base = {k: getattr(router_config, k) for k in SCORE_FIELDS if hasattr(router_config, k)}
        base.update(overrides or {})
        return cls.from_dict(base)


def check_query_suffix(suffix: Any, query_reduce: str, name: str, suffix_layers: tuple[int, ...] = ()) -> None:
    """Raise ConfigError (naming ``name``) unless ``suffix`` is a string that, when non-empty, is read by a
    ``query_reduce`` of "last" or by suffix queries (``suffix_layers``); suffix queries need a suffix."""
    if not isinstance(suffix, str):
        raise ConfigError(f"{name} must be a string, got {suffix!r}.")
    if suffix_layers and not suffix:
        raise ConfigError(f"Suffix queries at layers {list(suffix_layers)} need a query suffix to read; {name} is "
                          "empty.")
    if suffix and query_reduce != "last" and not suffix_layers:
        raise ConfigError(f"{name} {suffix!r} needs query_reduce 'last' (the router query is read where the suffix "
                          f"ends), got query_reduce {query_reduce!r}.",
                          hint="Train with --query-reduce last, or leave the suffix out.")


@dataclass(frozen=True)
class RouterConfig(ScoreChoices):
    """How router keys are made (msa-reference.md §1.2): an adapter's layout, plus the :class:`ScoreChoices`
    it was trained for (keyword-only). Saved flat, one JSON object (:meth:`to_dict` / :meth:`from_dict`)."""

    router_layers: tuple[int, ...]
    """Decoder layer indices with router projections, ascending."""
    n_q_heads: int
    """Router query heads Hq (query head h uses key head h // (Hq // Hkv))."""
    n_kv_heads: int
    """Router key heads Hkv."""
    head_dim: int
    """Per-head dimension D."""
    hidden_size: int
    """Input size E (the model's hidden size)."""
    chunk_tokens: int = 64
    """Pooling size P (MSA's pooling_kernel_size)."""
    source: str = "adapter"
    """Where the weights came from: "msa-checkpoint", "adapter" or "init-from-qk"."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form provenance (training run, aux_loss_method...)."""
    shifted_layers: tuple[int, ...] = ()
    """Router layers whose keys are also pooled over chunks shifted by ``chunk_tokens // 2`` tokens
    (``schemas.records.shifted_chunk_counts``); routing scores a document there by the max over both
    grids. Not in MSA (empty: the reference's aligned grid alone); left out of :meth:`to_dict`, and so
    of the router id, when empty."""
    shifted_window: int | None = None
    """Tokens per window of that grid when finer than ``chunk_tokens``: windows of W tokens at a stride
    of W/2 (an even W, 2 <= W < P); None: P-token windows from token P/2. Left out of :meth:`to_dict`
    when None."""
    query_suffix: str = ""
    """Text put after the question before it is routed (not in MSA; empty: the question alone), read where
    it ends: by the router query itself with ``query_reduce = "last"``, or by the suffix queries of
    ``suffix_layers``; e.g. ``"\nThis passage is about"`` turns the last position into a summary of the
    question. The suffix is tokenized on its own (no special tokens) and appended to the question's tokens,
    so the question's own tokens are the same with or without it. Left out of :meth:`to_dict` when empty."""
    suffix_layers: tuple[int, ...] = ()
    """Router layers that add a *suffix query* to their score (not in MSA; needs ``query_suffix``): a query
    projection of their own (``router_suffix_q_proj``) read at the suffix's last token, scored as one row
    against the layer's own router keys (both grids at a shifted layer) with the layer's score mode and head
    and chunk reduces, and summed into the layer's document score. The layer's own queries then read the
    question's tokens only (not the suffix's), reduced by ``query_reduce``; the keys are unchanged, so a
    store's keys serve the adapter with or without them. Left out of :meth:`to_dict` when empty."""

    def __post_init__(self) -> None:
        super().__post_init__()
        layers = tuple(int(x) for x in self.router_layers)
        object.__setattr__(self, "router_layers", layers)
        if not layers or list(layers) != sorted(set(layers)) or layers[0] < 0:
            raise ConfigError(f"router_layers must be ascending distinct layer indices >= 0, got {layers!r}.")
        shifted = tuple(int(x) for x in self.shifted_layers)
        object.__setattr__(self, "shifted_layers", shifted)
        if list(shifted) != sorted(set(shifted)) or not set(shifted) <= set(layers):
            raise ConfigError(f"shifted_layers must be ascending distinct router layers (router layers {list(layers)}), "
                              f"got {list(shifted)!r}.")
        window = check_shifted_window(self.shifted_window, self.chunk_tokens, "RouterConfig.shifted_window")
        object.__setattr__(self, "shifted_window", window)
        if window is not None and not shifted:
            raise ConfigError(f"RouterConfig.shifted_window {window} needs shifted_layers (the layers that key the "
                              "shifted grid).")
        sfx_layers = tuple(int(x) for x in self.suffix_layers)
        object.__setattr__(self, "suffix_layers", sfx_layers)
        if list(sfx_layers) != sorted(set(sfx_layers)) or not set(sfx_layers) <= set(layers):
            raise ConfigError(f"suffix_layers must be ascending distinct router layers (router layers {list(layers)}), "
                              f"got {list(sfx_layers)!r}.")
        check_query_suffix(self.query_suffix, self.query_reduce, "RouterConfig.query_suffix", sfx_layers)
        for name in ("n_q_heads", "n_kv_heads", "head_dim", "hidden_size", "chunk_tokens"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"RouterConfig.{name} must be positive, got {getattr(self, name)!r}.")
        if self.n_q_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_q_heads ({self.n_q_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads}).")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["router_layers"] = list(self.router_layers)
        if self.shifted_layers:
            d["shifted_layers"] = list(self.shifted_layers)
        else:
            del d["shifted_layers"]
        if self.shifted_window is None:
            del d["shifted_window"]
        if not self.query_suffix:
            del d["query_suffix"]
        if self.suffix_layers:
            d["suffix_layers"] = list(self.suffix_layers)
        else:
            del d["suffix_layers"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RouterConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"Unknown router config keys {unknown!r}; allowed: {sorted(known)}.")
        return cls(**d)
