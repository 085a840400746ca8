"""The slow reference scorer of routing (msa-reference §3.3), differentiable: what router training
back-propagates through, what tests and benchmarks score with, and what every fast path of
:class:`~msa_memory.routing.index.RouterIndex` ranks like.

Score of query ``b`` against document ``d`` at one router layer (paper Eq. 2, training path):

    S[b, t, c] = head_reduce_h  sim(q[b, t, h], k[c, g(h)])      g(h) = h // (Hq / Hk)   (GQA)
    S[b, c]    = query_reduce_t S[b, t, c]                        (masked tokens excluded)
    s[b, d]    = chunk_reduce_{c in d} S[b, c]

with ``sim`` the cosine (``score="cosine"``: q and k L2-normalised per head, the pooled key
normalised *after* pooling) or the raw dot product over sqrt(D) (``score="dot"``, what the
reference inference engine ships). Several router layers are combined by summing their document
scores (rank-equivalent to the mean): :func:`adapter_doc_scores` does it for an adapter, with its
shifted grid and suffix queries as ``runtime.Memory`` routes them.

Invariant: every reduction keeps gradients to every projection weight that influenced the winning
entries (max) or all entries (mean).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from msa_memory.errors import ConfigError
from msa_memory.routing.config import CHOICES, ChunkReduce, HeadReduce, QueryReduce, ScoreChoices, ScoreMode

if TYPE_CHECKING:
    import torch

__all__ = ["chunk_scores", "doc_scores", "adapter_doc_scores", "MISSING"]

_DEFAULT = ScoreChoices()   # the one set of defaults (MSA's)
MISSING = -1.0e9  #: score of a masked / missing entry; far below any cosine or scaled dot product
_NEG = MISSING


def _check(name: str, value: str, allowed: tuple[str, ...] | None = None) -> None:
    allowed = CHOICES[name] if allowed is None else allowed
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {allowed}, got {value!r}.")


def chunk_scores(
    q: torch.Tensor,
    q_mask: torch.Tensor,
    k: torch.Tensor,
    *,
    score: ScoreMode = _DEFAULT.score,
    head_reduce: HeadReduce = _DEFAULT.head_reduce,
    query_reduce: QueryReduce = _DEFAULT.query_reduce,
) -> torch.Tensor:
    """Query-reduced scores of every query against every chunk at one layer.

    Parameters
    ----------
    q : (B, T, Hq, D) router queries (``router_q_proj`` output reshaped to heads).
    q_mask : (B, T) bool, True for the query tokens that take part in routing.
    k : (C, Hk, D) pooled router keys (``router_k_proj`` of the pooled input), Hq % Hk == 0.
    score, head_reduce, query_reduce : see the module docstring; defaults are MSA's (``ScoreChoices``).

    Returns
    -------
    (B, C) float tensor S[b, c].
    """
    import torch

    _check("score", score)
    _check("head_reduce", head_reduce)
    _check("query_reduce", query_reduce)
    B, T, Hq, D = q.shape
    C, Hk, Dk = k.shape
    if Dk != D or Hq % Hk:
        raise ConfigError(f"router query heads {tuple(q.shape)} and key heads {tuple(k.shape)} do not match "
                          "(need equal head_dim and Hq divisible by Hk).")
    G = Hq // Hk
    if score == "cosine":
        q = torch.nn.functional.normalize(q.float(), dim=-1)
        k = torch.nn.functional.normalize(k.float(), dim=-1)
    else:
        q = q.float() / math.sqrt(D)
        k = k.float()
    mask = q_mask.to(torch.bool)
    if head_reduce == "mean":
        # mean_h <q_h, k_g(h)> = (1/Hq) sum_g <sum_{h in g} q_h, k_g>: one (B*T, Hk*D) @ (Hk*D, C) matmul
        qg = q.reshape(B, T, Hk, G, D).sum(dim=3).reshape(B, T, Hk * D) / Hq
        if query_reduce == "mean":   # linear in the query rows: the mean over tokens folds into one row per query
            w = mask.to(qg.dtype)
            qbar = (qg * w[:, :, None]).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)[:, None]
            return qbar @ k.reshape(C, Hk * D).T  # (B, C)
        s = (qg.reshape(B * T, Hk * D) @ k.reshape(C, Hk * D).T).reshape(B, T, C)  # (B, T, C)
    else:
        qh = q.reshape(B, T, Hk, G, D)
        s = torch.einsum("btkgd,ckd->btkgc", qh, k).reshape(B, T, Hq, C).amax(dim=2)  # (B, T, C)
    if query_reduce == "max":
        s = s.masked_fill(~mask[:, :, None], _NEG).amax(dim=1)
    elif query_reduce == "mean":
        w = mask.to(s.dtype)
        s = (s * w[:, :, None]).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)[:, None]
    else:  # last valid token of each query
        last = (mask.cumsum(dim=1) == mask.sum(dim=1, keepdim=True)) & mask
        idx = last.to(torch.int64).argmax(dim=1)  # (B,)
        s = s[torch.arange(B, device=s.device), idx]
    return s  # (B, C)


def doc_scores(
    s_chunk: torch.Tensor,
    chunk_doc: torch.Tensor,
    n_docs: int,
    *,
    chunk_reduce: ChunkReduce = _DEFAULT.chunk_reduce,
) -> torch.Tensor:
    """Reduce (B, C) chunk scores to (B, N) document scores; ``chunk_doc`` (C,) maps chunks to 0..N-1.

    Documents without chunks score ``-1e9``.
    """
    import torch

    _check("chunk_reduce", chunk_reduce)
    B = s_chunk.shape[0]
    idx = chunk_doc.to(torch.int64).unsqueeze(0).expand(B, -1)
    out = torch.full((B, n_docs), _NEG, dtype=s_chunk.dtype, device=s_chunk.device)
    if chunk_reduce == "max":
        return out.scatter_reduce(1, idx, s_chunk, reduce="amax", include_self=False)
    total = torch.zeros((B, n_docs), dtype=s_chunk.dtype, device=s_chunk.device).scatter_add(1, idx, s_chunk)
    count = torch.zeros((n_docs,), dtype=s_chunk.dtype, device=s_chunk.device).scatter_add(
        0, chunk_doc.to(torch.int64), torch.ones_like(chunk_doc, dtype=s_chunk.dtype))
    return torch.where(count > 0, total / count.clamp_min(1.0), out)


def adapter_doc_scores(adapter: Any, keys: Mapping[int, torch.Tensor], chunk_doc: Mapping[int, torch.Tensor],
                       n_docs: int, x_query: Mapping[int, torch.Tensor], mask: torch.Tensor,
                       x_suffix: Mapping[int, torch.Tensor] | None = None) -> torch.Tensor:
    """(B, N) document scores of B queries under ``adapter``, summed over its router layers.

    ``keys[l]`` (C_l, Hk, D) are layer ``l``'s router keys and ``chunk_doc[l]`` (C_l,) their documents
    0..N-1 (at a shifted layer both grids' keys: a document scores its best chunk over both);
    ``x_query[l]`` (B, T, E) the queries' router-layer inputs, ``mask`` (B, T) the rows that route.
    ``x_suffix[l]`` (B, 1, E): the input at the query suffix's last token, read by the suffix query of
    each of the adapter's ``suffix_layers`` and added to that layer's score (as ``runtime.Memory``
    routes; None: no suffix queries).
    """
    import torch

    cfg = adapter.config
    kw = dict(score=cfg.score, head_reduce=cfg.head_reduce, query_reduce=cfg.query_reduce)
    total: torch.Tensor | None = None
    for l in cfg.router_layers:
        s = doc_scores(chunk_scores(adapter.router_q(l, x_query[l]), mask, keys[l], **kw), chunk_doc[l], n_docs,
                       chunk_reduce=cfg.chunk_reduce)
        total = s if total is None else total + s
        if x_suffix is not None and l in cfg.suffix_layers:
            rows = torch.ones(x_suffix[l].shape[0], 1, dtype=torch.bool, device=x_suffix[l].device)
            total = total + doc_scores(chunk_scores(adapter.router_sq(l, x_suffix[l]), rows, keys[l], **kw),
                                       chunk_doc[l], n_docs, chunk_reduce=cfg.chunk_reduce)
    if total is None:
        raise ConfigError("The adapter has no router layers.")
    return total
