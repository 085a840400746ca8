"""Differentiable routing scores (msa-reference §3.3) and the decoupled InfoNCE loss (§6.2).

The runtime ranks documents with a no-grad version of the same formula; this module is the
torch-autograd twin that router training back-propagates through. Both must agree exactly on the
ranking (a test checks it against ``msa_memory.runtime`` once that exists).

Score of query ``b`` against document ``d`` at one router layer (paper Eq. 2, training path):

    S[b, t, c] = head_reduce_h  sim(q[b, t, h], k[c, g(h)])      g(h) = h // (Hq / Hk)   (GQA)
    S[b, c]    = query_reduce_t S[b, t, c]                        (masked tokens excluded)
    s[b, d]    = chunk_reduce_{c in d} S[b, c]

with ``sim`` the cosine (``score="cosine"``: q and k L2-normalised per head, the pooled key
normalised *after* pooling) or the raw dot product over sqrt(D) (``score="dot"``, what the
reference inference engine ships). Several router layers are combined by summing their document
scores (rank-equivalent to the mean).

What this module does not do: project hidden states (``trainer.RouterProjections`` does) or
choose negatives (``trainer`` does). Invariant: every reduction keeps gradients to every
projection weight that influenced the winning entries (max) or all entries (mean).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

from msa_memory.errors import ConfigError

ScoreMode = Literal["cosine", "dot"]
HeadReduce = Literal["mean", "max"]
QueryReduce = Literal["max", "mean", "last"]
ChunkReduce = Literal["max", "mean"]

__all__ = ["chunk_scores", "doc_scores", "decoupled_infonce", "listwise_kl", "recall_at_k"]

_NEG = -1.0e9  # score of a masked / missing entry; far below any cosine or scaled dot product


def _check(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {allowed}, got {value!r}.")


def chunk_scores(
    q: torch.Tensor,
    q_mask: torch.Tensor,
    k: torch.Tensor,
    *,
    score: ScoreMode = "cosine",
    head_reduce: HeadReduce = "mean",
    query_reduce: QueryReduce = "max",
) -> torch.Tensor:
    """Query-reduced scores of every query against every chunk at one layer.

    Parameters
    ----------
    q : (B, T, Hq, D) router queries (``router_q_proj`` output reshaped to heads).
    q_mask : (B, T) bool, True for the query tokens that take part in routing.
    k : (C, Hk, D) pooled router keys (``router_k_proj`` of the pooled input), Hq % Hk == 0.
    score, head_reduce, query_reduce : see the module docstring; defaults are MSA's.

    Returns
    -------
    (B, C) float tensor S[b, c].
    """
    import torch

    _check("score", score, ("cosine", "dot"))
    _check("head_reduce", head_reduce, ("mean", "max"))
    _check("query_reduce", query_reduce, ("max", "mean", "last"))
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
    chunk_reduce: ChunkReduce = "max",
) -> torch.Tensor:
    """Reduce (B, C) chunk scores to (B, N) document scores; ``chunk_doc`` (C,) maps chunks to 0..N-1.

    Documents without chunks score ``-1e9``.
    """
    import torch

    _check("chunk_reduce", chunk_reduce, ("max", "mean"))
    B = s_chunk.shape[0]
    idx = chunk_doc.to(torch.int64).unsqueeze(0).expand(B, -1)
    out = torch.full((B, n_docs), _NEG, dtype=s_chunk.dtype, device=s_chunk.device)
    if chunk_reduce == "max":
        return out.scatter_reduce(1, idx, s_chunk, reduce="amax", include_self=False)
    total = torch.zeros((B, n_docs), dtype=s_chunk.dtype, device=s_chunk.device).scatter_add(1, idx, s_chunk)
    count = torch.zeros((n_docs,), dtype=s_chunk.dtype, device=s_chunk.device).scatter_add(
        0, chunk_doc.to(torch.int64), torch.ones_like(chunk_doc, dtype=s_chunk.dtype))
    return torch.where(count > 0, total / count.clamp_min(1.0), out)


def decoupled_infonce(
    scores: torch.Tensor, positive: torch.Tensor, valid: torch.Tensor | None = None, *, tau: float = 0.1
) -> torch.Tensor:
    """MSA's ``INFONCE_DECOUPLE`` loss (§6.2): each positive competes only against the negatives.

    ``L_b = -(1/|P_b|) sum_{i in P_b} [z_i - log(exp z_i + sum_{j in N_b} exp z_j)]``, ``z = s / tau``,
    averaged over the samples that have at least one positive.

    Parameters
    ----------
    scores : (B, N) document scores.
    positive : (B, N) bool, True for the positives of each sample.
    valid : (B, N) bool or None; False entries are neither positives nor negatives (missing docs).
    tau : temperature, MSA uses 0.1 (clamped to [0.001, 0.5] as in the reference).
    """
    import torch

    tau = min(max(float(tau), 0.001), 0.5)
    pos = positive.to(torch.bool)
    if valid is None:
        valid = torch.ones_like(pos)
    valid = valid.to(torch.bool)
    pos = pos & valid
    neg = valid & ~pos
    z = scores.float() / tau
    neg_lse = torch.logsumexp(z.masked_fill(~neg, float("-inf")), dim=1, keepdim=True)  # (B, 1)
    # log(e^{z_i} + sum_N e^{z_j}) = logaddexp(z_i, lse_N); -inf lse (no negatives) gives z_i -> loss 0
    per = torch.logaddexp(z, neg_lse) - z  # (B, N) = -[z_i - log(...)]
    per = per.masked_fill(~pos, 0.0)
    n_pos = pos.sum(dim=1)
    has = n_pos > 0
    if not bool(has.any()):
        return scores.sum() * 0.0
    return (per.sum(dim=1)[has] / n_pos[has]).mean()


def listwise_kl(
    student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor | None = None, *,
    tau_student: float = 0.1, tau_teacher: float = 0.1,
) -> torch.Tensor:
    """Listwise distillation loss: ``KL(p_teacher || p_student)`` over each row's candidate list, averaged.

    ``p_teacher = softmax(teacher / tau_teacher)`` and ``p_student = softmax(student / tau_student)`` over the
    row's valid entries; rows with fewer than two valid entries are skipped (0 if none is left).

    Parameters
    ----------
    student : (B, M) the router's document scores of each row's candidates.
    teacher : (B, M) the teacher's scores of the same candidates (e.g. min-max scaled to [0, 1]).
    valid : (B, M) bool or None; False entries (padding) take no part.
    """
    import torch

    if valid is None:
        valid = torch.ones(student.shape, dtype=torch.bool, device=student.device)
    valid = valid.to(torch.bool) & torch.isfinite(teacher)
    t = torch.where(valid, teacher.float(), torch.zeros((), device=teacher.device)) / float(tau_teacher)
    log_p = torch.log_softmax(t.masked_fill(~valid, float("-inf")), dim=1)
    log_q = torch.log_softmax((student.float() / float(tau_student)).masked_fill(~valid, float("-inf")), dim=1)
    p = log_p.exp()
    per = (p * (log_p - log_q)).masked_fill(~valid, 0.0).sum(dim=1)
    keep = valid.sum(dim=1) >= 2
    if not bool(keep.any()):
        return student.sum() * 0.0
    return per[keep].mean()


def recall_at_k(scores: torch.Tensor, positive: torch.Tensor, ks: tuple[int, ...] = (1, 5, 16)) -> dict[int, float]:
    """Mean over queries of (positives in the top k) / min(|P|, k), MSA's logged router metric.

    Ties are broken by ``torch.topk``'s order. Queries without positives are skipped.
    """
    import torch

    pos = positive.to(torch.bool)
    n_pos = pos.sum(dim=1)
    keep = n_pos > 0
    out: dict[int, float] = {}
    for k in ks:
        kk = min(int(k), scores.shape[1])
        top = scores.topk(kk, dim=1).indices
        hits = pos.gather(1, top).sum(dim=1).float()
        denom = n_pos.clamp(max=kk).float().clamp_min(1.0)
        out[int(k)] = float((hits / denom)[keep].mean()) if bool(keep.any()) else float("nan")
    return out
