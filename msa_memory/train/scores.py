"""Router-training losses (msa-reference §6.2): the decoupled InfoNCE, listwise distillation, recall@k.

The scores they take come from :mod:`msa_memory.routing.reference`: the differentiable form of
routing's formula, which training back-propagates through.

What this module does not do: project hidden states (``trainer.RouterProjections`` does) or
choose negatives (``trainer`` does).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["decoupled_infonce", "listwise_kl", "recall_at_k"]


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
