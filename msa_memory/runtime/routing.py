"""Routing: score a query's router-Q against every resident pooled router key K̄ᵣ, pick top-k documents.

Design note. This is msa-reference.md §3.3–3.4 as one function per router layer:

    S[t,c,h] = <q[t,h], K̄ᵣ[c, g(h)]> · scale        g(h) = h // (Hq / H)   (GQA mapping)
    S[t,c]   = head_reduce_h S[t,c,h]              mean | max
    S[c]     = query_reduce_t S[t,c]               max | mean | last
    s[d]     = chunk_reduce_{c in d} S[c]          max | mean
    I        = top-k_d s[d]                        whole documents

``score="dot"`` is the reference inference path (raw dot · 1/√D, nothing normalized);
``score="cosine"`` is the paper / training path (q and K̄ᵣ L2-normalized per head, scale 1).
Keys stay resident on the device as ONE tensor per router layer; scoring runs one matmul per
tile of ``tile_chunks`` chunks, so peak memory is bounded by tile × query-rows, never by C.
With head-reduce ``mean`` the head mean is folded into the query first (mean_h <q_h, k_g(h)> =
Σ_g <mean-of-group q, k_g> · H/Hq), so the whole layer is a single GEMM with inner size H·D.

What it does not do: fetch content K̄V̄ (``memory_tier``), or decide which layers route (the
caller walks the model). Invariant: the chunk → document map is shared by all layers and maps
to dense document indices 0..N-1; ``doc_ids[n]`` gives the store id.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Sequence

import numpy as np

from msa_memory.errors import ConfigError, RuntimeMemoryError

if TYPE_CHECKING:
    import torch

__all__ = ["ScoreMode", "RoutingConfig", "RouterIndex", "RouteResult", "torch_dtype_of", "resident_dtype",
           "cpu_has_native_bf16"]

ScoreMode = Literal["dot", "cosine"]
HeadReduce = Literal["mean", "max"]
QueryReduce = Literal["max", "mean", "last"]
ChunkReduce = Literal["max", "mean"]

_CHOICES = {
    "score": ("dot", "cosine"),
    "head_reduce": ("mean", "max"),
    "query_reduce": ("max", "mean", "last"),
    "chunk_reduce": ("max", "mean"),
}


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
    """Chunks scored per matmul tile; bounds the score buffer to rows × tile_chunks floats."""
    compute_dtype: str = "auto"
    """Dtype of the resident keys and the score GEMM: ``"auto"`` keeps the stored dtype on GPUs and on
    CPUs with native bf16 (AMX / AVX512-BF16) and widens bf16/fp16 keys to float32 once, at load, on
    other CPUs (where bf16 GEMMs are emulated and ~100× slower); or ``"float32"`` / ``"bfloat16"``."""

    def __post_init__(self) -> None:
        for name, allowed in _CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigError(f"Routing {name}={value!r} is not supported; allowed: {list(allowed)}.")
        if int(self.top_k) < 1:
            raise ConfigError(f"Routing top_k must be >= 1, got {self.top_k!r}.")
        if int(self.tile_chunks) < 1:
            raise ConfigError(f"Routing tile_chunks must be >= 1, got {self.tile_chunks!r}.")
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


def cpu_has_native_bf16() -> bool:
    """True when the CPU has AMX-BF16 or AVX512-BF16 (bf16 GEMMs run natively)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resident_dtype(stored: torch.dtype, device: Any, compute_dtype: str = "auto") -> torch.dtype:
    """The dtype router keys are kept in on ``device`` (see ``RoutingConfig.compute_dtype``)."""
    import torch

    if compute_dtype != "auto":
        return torch_dtype_of(compute_dtype)
    if torch.device(device).type == "cpu" and stored != torch.float32 and not cpu_has_native_bf16():
        return torch.float32
    return stored


def torch_dtype_of(logical: str) -> torch.dtype:
    """torch dtype of a store's logical dtype name."""
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[logical]


@dataclass
class RouteResult:
    """Top-k documents of one router layer for one query."""

    doc_index: np.ndarray
    """(k,) int64 dense document indices, best first."""
    doc_ids: np.ndarray
    """(k,) int64 store document ids, best first."""
    scores: np.ndarray
    """(k,) float32 document scores, descending."""
    layer: int = -1
    """Router-layer position 0..L-1 (``-1`` when not tied to a layer)."""
    extra: dict[str, Any] = field(default_factory=dict)


class RouterIndex:
    """Resident router keys of every router layer plus the chunk → document map.

    Parameters
    ----------
    keys : sequence of torch.Tensor
        One (C, H, D) tensor per router layer, any float dtype; moved to ``device`` as-is
        (cosine mode normalizes each chunk's heads once, here, in float32).
    chunk_doc : array-like, (C,) int64
        Dense document index 0..N-1 of every chunk, shared by all layers.
    doc_ids : array-like, (N,) int64
        Store id of each dense document index.
    config : RoutingConfig
    device : str or torch.device, default "cpu"
    """

    def __init__(self, keys: Sequence[torch.Tensor], chunk_doc: Any, doc_ids: Any,
                 config: RoutingConfig, device: Any = "cpu") -> None:
        import torch

        self.config = config
        self.device = torch.device(device)
        self.doc_ids = np.asarray(doc_ids, dtype=np.int64)
        chunk_doc_np = np.asarray(chunk_doc, dtype=np.int64)
        self.n_docs = int(self.doc_ids.shape[0])
        self.n_chunks = int(chunk_doc_np.shape[0])
        if self.n_chunks and (chunk_doc_np.min() < 0 or chunk_doc_np.max() >= self.n_docs):
            raise ConfigError(f"chunk_doc must index 0..{self.n_docs - 1}, got range "
                              f"[{chunk_doc_np.min()}, {chunk_doc_np.max()}].")
        self.keys: list[torch.Tensor] = []
        for i, k in enumerate(keys):
            if k.dim() != 3 or k.shape[0] != self.n_chunks:
                raise ConfigError(f"Router keys of layer {i} must be (C={self.n_chunks}, H, D); got {tuple(k.shape)}.")
            k = k.to(self.device, resident_dtype(k.dtype, self.device, config.compute_dtype))
            if config.score == "cosine":  # normalize after pooling, per chunk and head (§3.3 training path)
                k = torch.nn.functional.normalize(k.float(), dim=-1).to(k.dtype)
            self.keys.append(k.contiguous())
        self.chunk_doc = torch.from_numpy(chunk_doc_np).to(self.device)
        counts = np.bincount(chunk_doc_np, minlength=self.n_docs) if self.n_chunks else np.zeros(self.n_docs, np.int64)
        if self.n_docs and counts.min() == 0:
            raise ConfigError("Every document must own at least one chunk; some documents have none.")
        self.doc_chunk_count = torch.from_numpy(counts.astype(np.float32)).to(self.device)

    @property
    def n_layers(self) -> int:
        return len(self.keys)

    def nbytes(self) -> int:
        """Bytes of resident router keys (all layers)."""
        return sum(k.numel() * k.element_size() for k in self.keys)

    # ------------------------------------------------------------------ scoring
    def chunk_scores(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """(C,) float32 chunk scores S[c] of one query at one router layer.

        ``q`` is (T, Hq, D) router queries of the query tokens (already selected: only routing
        tokens). Hq must be a multiple of the keys' H.
        """
        import torch

        cfg = self.config
        keys = self.keys[layer]
        C, H, D = keys.shape
        if q.dim() != 3 or q.shape[-1] != D or q.shape[1] % H:
            raise ConfigError(f"Router query must be (T, Hq, D={D}) with Hq a multiple of H={H}; got {tuple(q.shape)}.")
        T, Hq, _ = q.shape
        if T == 0:
            raise ConfigError("Routing needs at least one query token; got an empty query.")
        rep = Hq // H
        q = q.to(self.device, torch.float32)
        if cfg.score == "cosine":
            q = torch.nn.functional.normalize(q, dim=-1)
            scale = 1.0
        else:
            scale = D ** -0.5
        if cfg.query_reduce == "last":  # only the last token matters; drop the others up front
            q = q[-1:]
            T = 1
        # Build the left operand. head-mean: fold heads of each group, one GEMM of inner size H·D.
        if cfg.head_reduce == "mean":
            qg = q.view(T, H, rep, D).sum(2) * (scale / Hq)            # (T, H, D)
            lhs = qg.reshape(T, H * D).to(keys.dtype)                   # (T, H·D)
        else:
            lhs = (q * scale).view(T, H, rep, D).permute(1, 0, 2, 3).reshape(H, T * rep, D).to(keys.dtype)  # (H, T·rep, D)
        out = torch.empty(C, dtype=torch.float32, device=self.device)
        tile = int(cfg.tile_chunks)
        for start in range(0, C, tile):
            kt = keys[start:start + tile]                               # (t, H, D)
            if cfg.head_reduce == "mean":
                s = lhs @ kt.reshape(kt.shape[0], H * D).T              # (T, t)
            else:
                s = torch.bmm(lhs, kt.permute(1, 2, 0))                 # (H, T·rep, t)
                s = s.view(H, T, rep, -1).amax(dim=(0, 2))              # (T, t)  max over all Hq heads
            if cfg.query_reduce == "mean":
                out[start:start + tile] = s.float().mean(0)
            else:  # "max" (or "last" with T == 1): max is exact in any dtype, widen after reducing
                out[start:start + tile] = s.amax(0).float()
        return out

    def doc_scores(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """(N,) float32 document scores s[d] (chunk reduce of :meth:`chunk_scores`)."""
        import torch

        cs = self.chunk_scores(layer, q)
        if self.config.chunk_reduce == "max":
            ds = torch.full((self.n_docs,), float("-inf"), dtype=torch.float32, device=self.device)
            return ds.scatter_reduce_(0, self.chunk_doc, cs, reduce="amax", include_self=True)
        ds = torch.zeros(self.n_docs, dtype=torch.float32, device=self.device)
        return ds.index_add_(0, self.chunk_doc, cs) / self.doc_chunk_count

    def route(self, layer: int, q: torch.Tensor, k: int | None = None) -> RouteResult:
        """Top-k documents of router layer ``layer`` for router queries ``q`` (T, Hq, D)."""
        import torch

        if self.n_docs == 0:
            raise RuntimeMemoryError("The store has no documents to route to; encode some first (`msa-encode`).")
        if not 0 <= layer < self.n_layers:
            raise ConfigError(f"Router layer position {layer!r} out of range 0..{self.n_layers - 1}.")
        k = min(int(k or self.config.top_k), self.n_docs)
        ds = self.doc_scores(layer, q)
        vals, idx = torch.topk(ds, k)
        idx_np = idx.cpu().numpy().astype(np.int64)
        return RouteResult(doc_index=idx_np, doc_ids=self.doc_ids[idx_np],
                           scores=vals.cpu().numpy().astype(np.float32), layer=layer)
