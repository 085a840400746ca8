"""Train router projections on precomputed features (msa-reference §6.4, router-only recipe).

The backbone is frozen, so everything the router sees is computed once (``features.py``, held in a
:class:`~msa_memory.train.feature_set.Features`):
per chunk the pooled router-layer input x̄ (L, C, E) and per query its router-layer inputs
(L, T, E). Router keys are ``router_k_proj(x̄)`` exactly (a bias-free linear map commutes with the
chunk mean), so a training step is a handful of matmuls and runs on CPU.

Loss: the decoupled InfoNCE (τ = 0.1) of every router layer, averaged over layers (MSA's aux
loss; ``TrainConfig.layer_loss="each"``). Each layer's projections only receive gradient from its own
loss, so one joint run also tells how well every single layer routes; ``"sum"`` trains the
layer-averaged score instead (what routing ranks by), ``"both"`` the mean of the two.
``select_layers`` then picks the set whose summed scores rank best on held-out queries (layer
choice by measurement, as targets.md asks).

Candidates per step: the batch's positives, hard negatives of each query and random passages;
every query is scored against all candidates (in-batch negatives come for free). Hard negatives
come from BM25 (mined once, stored in ``Features.hard_negatives``), from the router itself
(``mine_routing_negatives``: the top-scoring non-positive passages under the current projections,
i.e. mined from the store's own routing; refreshed every ``mine_every`` epochs, or once), or both
(``TrainConfig.hard_source``).
What this module does not do: read models or stores, or write files (``adapter_io`` does).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from msa_memory.errors import ConfigError
from msa_memory.routing.reference import chunk_scores, doc_scores
from msa_memory.train.feature_set import Features  # also this module's API
from msa_memory.train.scores import decoupled_infonce, listwise_kl, recall_at_k

__all__ = ["Features", "RouterProjections", "TrainConfig", "train_router", "evaluate", "select_layers",
           "mine_routing_negatives"]


class RouterProjections(torch.nn.Module):
    """``router_q_proj`` (Hq·D × E) and ``router_k_proj`` (Hk·D × E) of every router layer, fp32."""

    def __init__(self, layers: tuple[int, ...], q_weights: list[torch.Tensor], k_weights: list[torch.Tensor],
                 n_q_heads: int, n_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        if not (len(layers) == len(q_weights) == len(k_weights)):
            raise ConfigError("One router_q_proj and one router_k_proj weight per router layer are needed.")
        for w, h in ((q_weights, n_q_heads), (k_weights, n_kv_heads)):
            for t in w:
                if t.dim() != 2 or t.shape[0] != h * head_dim:
                    raise ConfigError(f"Router weight of shape {tuple(t.shape)} is not ({h}*{head_dim}, hidden).")
        self.layers = tuple(int(x) for x in layers)
        self.n_q_heads, self.n_kv_heads, self.head_dim = n_q_heads, n_kv_heads, head_dim
        self.q = torch.nn.ParameterList([torch.nn.Parameter(w.detach().float().clone()) for w in q_weights])
        self.k = torch.nn.ParameterList([torch.nn.Parameter(w.detach().float().clone()) for w in k_weights])

    def project_q(self, li: int, x: torch.Tensor) -> torch.Tensor:
        """(..., E) → (..., Hq, D) router queries of layer position ``li``."""
        y = x.to(self.q[li].dtype) @ self.q[li].T
        return y.unflatten(-1, (self.n_q_heads, self.head_dim))

    def project_k(self, li: int, x: torch.Tensor) -> torch.Tensor:
        """(..., E) → (..., Hk, D) router keys of layer position ``li``."""
        y = x.to(self.k[li].dtype) @ self.k[li].T
        return y.unflatten(-1, (self.n_kv_heads, self.head_dim))

    @classmethod
    def from_adapter(cls, adapter: Any) -> RouterProjections:
        """fp32 copies of a ``RouterAdapter``'s projections at its router layers."""
        c = adapter.config
        return cls(c.router_layers, [adapter.q_proj[str(l)].weight for l in c.router_layers],
                   [adapter.k_proj[str(l)].weight for l in c.router_layers], c.n_q_heads, c.n_kv_heads, c.head_dim)

    def subset(self, layers: tuple[int, ...]) -> RouterProjections:
        pos = [self.layers.index(x) for x in layers]
        return RouterProjections(layers, [self.q[i].data for i in pos], [self.k[i].data for i in pos],
                                 self.n_q_heads, self.n_kv_heads, self.head_dim)


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of :func:`train_router`; defaults are the ones the default adapter used."""

    epochs: int = 4
    batch_size: int = 64
    lr: float = 2e-4
    weight_decay: float = 0.0
    tau: float = 0.1
    n_hard: int = 4
    """Hard negatives per query (per source) added to the step's candidates."""
    hard_source: str = "bm25"
    """"bm25" (``Features.hard_negatives``), "routing" (mined with the router being trained) or "both"."""
    mine_every: int = 1
    """Routing negatives: re-mine every this many epochs (0: once, with the initial router)."""
    n_random: int = 32
    """Random passages added to every step's candidates."""
    score: str = "cosine"
    head_reduce: str = "mean"
    query_reduce: str = "max"
    chunk_reduce: str = "max"
    query_suffix: str = ""
    """Text appended to every question before its router inputs are taken (``RouterConfig.query_suffix``;
    needs ``query_reduce="last"``). The features must have been extracted with it."""
    ks: tuple[int, ...] = (1, 5, 16)
    seed: int = 0
    device: str = "cpu"
    bf16: bool = False
    """Training steps under bf16 autocast (matmuls in bf16, loss and weights fp32): ~2x faster on
    CPUs with bf16 units and on GPUs. Evaluation stays fp32."""
    layer_loss: str = "each"
    """"each": the mean of every layer's own InfoNCE (MSA's aux loss; each layer learns to route
    alone); "sum": one InfoNCE of the layer-averaged score, the sum ``Memory.route`` ranks by (the
    layers learn to complement each other); "both": the mean of the two."""

    frozen_layers: tuple[int, ...] = ()
    """Router layers kept as they start (e.g. from ``--init-adapter``): scored, never updated. With
    ``layer_loss="sum"`` the other layers learn to complement them (their errors are what the sum's
    loss sees)."""

    freeze_keys: bool = False
    """Keep every layer's ``router_k_proj`` as it starts (only the query projections learn): the router keys
    of stores made with the starting adapter stay valid for the trained one."""

    objective: str = "infonce"
    """"infonce": the decoupled InfoNCE of each query's positives (MSA's loss); "distill": listwise
    distillation, ``KL(softmax(teacher / distill_tau) || softmax(router / tau))`` over each query's teacher
    candidate list (``Features.teacher_cands``; ``distill.teacher_lists``), plus ``distill_alpha`` times the
    InfoNCE. Which scores the KL reads follows ``layer_loss`` as the InfoNCE does."""
    distill_tau: float = 0.1
    """Temperature of the teacher's softmax over its [0, 1]-scaled scores (best and worst 1/tau apart)."""
    distill_alpha: float = 0.25
    """Weight of the positives' InfoNCE added to the distillation loss (0: the teacher alone)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "frozen_layers", tuple(int(x) for x in self.frozen_layers))
        if self.epochs < 0 or self.batch_size < 1 or not self.lr > 0 or not 0.001 <= self.tau <= 0.5:
            raise ConfigError(f"Invalid training config: epochs={self.epochs!r} (>=0), batch_size={self.batch_size!r} "
                              f"(>=1), lr={self.lr!r} (>0), tau={self.tau!r} (0.001..0.5).")
        from msa_memory.routing.config import check_query_suffix

        check_query_suffix(self.query_suffix, self.query_reduce, "TrainConfig.query_suffix")
        if self.objective not in ("infonce", "distill") or not self.distill_tau > 0 or self.distill_alpha < 0:
            raise ConfigError(f"Invalid objective={self.objective!r} ('infonce' or 'distill'), distill_tau="
                              f"{self.distill_tau!r} (>0), distill_alpha={self.distill_alpha!r} (>=0).")
        if self.layer_loss not in ("each", "sum", "both"):
            raise ConfigError(f"Invalid layer_loss={self.layer_loss!r}: 'each', 'sum' or 'both'.")
        if self.hard_source not in ("bm25", "routing", "both") or self.mine_every < 0 or self.n_hard < 0:
            raise ConfigError(f"Invalid hard negatives: hard_source={self.hard_source!r} (bm25, routing or both), "
                              f"mine_every={self.mine_every!r} (>=0), n_hard={self.n_hard!r} (>=0).")


def _keyed_doc_scores(proj: RouterProjections, li: int, qx: torch.Tensor, qmask: torch.Tensor,
                      k: torch.Tensor, chunk_doc: torch.Tensor, n_docs: int, cfg: TrainConfig) -> torch.Tensor:
    """(B, N) document scores of layer ``li`` for query inputs ``qx`` against projected keys ``k`` (C, Hk, D)."""
    q = proj.project_q(li, qx)                                   # (B, T, Hq, D)
    s = chunk_scores(q, qmask, k, score=cfg.score, head_reduce=cfg.head_reduce,  # type: ignore[arg-type]
                     query_reduce=cfg.query_reduce)              # type: ignore[arg-type]
    return doc_scores(s, chunk_doc, n_docs, chunk_reduce=cfg.chunk_reduce)  # type: ignore[arg-type]  (B, N)


def _layer_doc_scores(proj: RouterProjections, li: int, qx: torch.Tensor, qmask: torch.Tensor,
                      xc: torch.Tensor, chunk_doc: torch.Tensor, n_docs: int, cfg: TrainConfig) -> torch.Tensor:
    """:func:`_keyed_doc_scores` with the keys projected from pooled inputs ``xc`` (C, E) here."""
    return _keyed_doc_scores(proj, li, qx, qmask, proj.project_k(li, xc), chunk_doc, n_docs, cfg)


@torch.no_grad()
def evaluate(proj: RouterProjections, feats: Features, cfg: TrainConfig | None = None, *,
             batch_size: int = 32, per_layer: bool = True, max_queries: int | None = None) -> dict[str, Any]:
    """Recall@k of every query against *all* passages of ``feats``: per layer and layers summed.

    Returns ``{"recall": {k: r}, "per_layer": {layer: {k: r}}, "layer_scores": (L, Q, N) tensor}``.
    """
    cfg = cfg or TrainConfig()
    dev = torch.device(cfg.device)
    L = len(proj.layers)
    if tuple(feats.layers) != proj.layers:
        feats = feats.layer_subset(proj.layers)
    Q = feats.n_queries if max_queries is None else min(feats.n_queries, max_queries)
    keys = [proj.project_k(li, feats.x_chunks[li].to(dev)) for li in range(L)]  # L × (C, Hk, D)
    chunk_doc = feats.chunk_doc.to(dev)
    all_scores = torch.empty(L, Q, feats.n_docs)
    for start in range(0, Q, batch_size):
        idx = torch.arange(start, min(Q, start + batch_size))
        qx, mask = feats.query_batch(idx)
        for li in range(L):
            all_scores[li, idx] = _keyed_doc_scores(proj, li, qx[li].to(dev), mask.to(dev), keys[li], chunk_doc,
                                                    feats.n_docs, cfg).cpu()
    pos = torch.zeros(Q, feats.n_docs, dtype=torch.bool)
    for i in range(Q):
        pos[i, list(feats.positives[i])] = True
    out: dict[str, Any] = {"recall": recall_at_k(all_scores.sum(0), pos, cfg.ks), "layer_scores": all_scores,
                           "positive": pos}
    if per_layer:
        out["per_layer"] = {proj.layers[li]: recall_at_k(all_scores[li], pos, cfg.ks) for li in range(L)}
    kinds = feats.kinds[:Q]
    for kind in sorted(set(kinds)):
        m = torch.tensor([k == kind for k in kinds])
        out[f"recall_{kind}"] = recall_at_k(all_scores.sum(0)[m], pos[m], cfg.ks)
    return out


@torch.no_grad()
def mine_routing_negatives(proj: RouterProjections, feats: Features, n: int, cfg: TrainConfig | None = None, *,
                           block: int = 256, max_scores: int = 1 << 28) -> list[tuple[int, ...]]:
    """Per query, the ``n`` highest-scoring passages that are not its positives, under ``proj``.

    Scores are what routing uses (``evaluate``: every passage of ``feats``, summed over the router
    layers), so with a store's router inputs as ``feats`` these are the documents the store's own
    routing confuses with the answer. Keys are projected once; each block of queries is scored
    and cut to its best ``n + 8`` passages on ``cfg.device``, so only (block, n + 8) values leave
    it. A block also holds at most ``max_scores`` (query token, chunk) scores (1 GiB of fp32 by
    default; one long query forms a block of its own). Ties keep the lower passage index (among
    those best ``n + 8``). Returns one tuple per query.
    """
    cfg = cfg or TrainConfig()
    dev = torch.device(cfg.device)
    if tuple(feats.layers) != proj.layers:
        feats = feats.layer_subset(proj.layers)
    L, N = len(proj.layers), feats.n_docs
    keys = [proj.project_k(li, feats.x_chunks[li].to(dev)) for li in range(L)]  # L × (C, Hk, D)
    chunk_doc = feats.chunk_doc.to(dev)
    out: list[tuple[int, ...]] = []
    lens = (feats.q_offsets[1:] - feats.q_offsets[:-1]).tolist()
    budget = max(1, max_scores // max(1, int(feats.x_chunks.shape[1])))   # query rows per block
    start = 0
    while start < feats.n_queries:  # bounded memory: ≤ block queries and ≤ max_scores scores at a time
        end, t_max = start, 0
        while end < feats.n_queries and end - start < block and (end - start + 1) * max(t_max, lens[end]) <= budget:
            t_max = max(t_max, lens[end])
            end += 1
        end = max(end, start + 1)
        idx = torch.arange(start, end)
        start = end
        qx, mask = feats.query_batch(idx)
        s = torch.zeros(len(idx), N, device=dev)
        for li in range(L):
            s += _keyed_doc_scores(proj, li, qx[li].to(dev), mask.to(dev), keys[li], chunk_doc, N, cfg)
        rows = [list(feats.positives[i]) for i in idx.tolist()]
        r = torch.repeat_interleave(torch.arange(len(idx)), torch.tensor([len(p) for p in rows]))
        s[r.to(dev), torch.tensor([d for p in rows for d in p], dtype=torch.int64, device=dev)] = -math.inf
        v, ix = s.topk(min(N, n + 8), dim=1)
        v, ix = v.cpu().tolist(), ix.cpu().tolist()
        for b, pos in enumerate(rows):
            k = min(n, N - len(set(pos)))
            best = sorted((-x, d) for x, d in zip(v[b], ix[b]) if x != -math.inf)   # score desc, then index
            out.append(tuple(d for _, d in best[:k]))
    return out


def select_layers(layer_scores: torch.Tensor, positive: torch.Tensor, layers: tuple[int, ...], *,
                  max_layers: int = 9, k: int = 16,
                  start: Sequence[int] = ()) -> tuple[tuple[int, ...], list[dict[str, Any]]]:
    """Greedy forward selection of router layers whose summed scores maximise held-out recall@k.

    Ties (and the stopping rule) use MRR of the first positive. ``start``: positions (into ``layers``)
    already chosen, which the selection grows (a layer is added only if it raises the start's
    recall@k, then MRR). Returns (layers, trace of the additions).
    """
    L = layer_scores.shape[0]
    chosen: list[int] = list(start)
    trace: list[dict[str, Any]] = []

    def quality(ids: list[int]) -> tuple[float, float]:
        s = layer_scores[ids].sum(0)
        r = recall_at_k(s, positive, (k,))[k]
        rank = (s > s.masked_fill(~positive, -1e9).amax(1, keepdim=True)).sum(1).float() + 1
        return r, float((1.0 / rank).mean())

    best = quality(chosen) if chosen else None
    while len(chosen) < min(max_layers, L):
        cands = [(quality(chosen + [j]), j) for j in range(L) if j not in chosen]
        (r, mrr), j = max(cands)
        if best is not None and (r, mrr) <= best:
            break
        chosen.append(j)
        best = (r, mrr)
        trace.append({"layers": sorted(layers[i] for i in chosen), f"recall@{k}": r, "mrr": mrr})
    return tuple(sorted(layers[i] for i in chosen)), trace


def _placed(proj: RouterProjections, train: Features, held_out: Features | None, cfg: TrainConfig,
            dev: torch.device) -> tuple[Features, Features | None]:
    """The features checked against ``cfg`` and cut to ``proj``'s layers; on CUDA the training arrays on the
    GPU when they fit (each step's chunks and query rows are then gathered there)."""
    for name, f in (("training", train), ("held-out", held_out)):
        if f is not None and f.query_suffix != cfg.query_suffix:
            raise ConfigError(f"The {name} features' queries were read with the suffix {f.query_suffix!r}, but the "
                              f"router is trained for {cfg.query_suffix!r}.",
                              hint="Extract the features with the training suffix (build_features(..., "
                                   "query_suffix=...)), or train for theirs.")
    if tuple(train.layers) != proj.layers:
        train = train.layer_subset(proj.layers)
    if held_out is not None and tuple(held_out.layers) != proj.layers:
        held_out = held_out.layer_subset(proj.layers)
    if dev.type == "cuda":  # gather the step's chunks / query rows on the GPU if the arrays fit it
        need = (train.x_chunks.numel() * train.x_chunks.element_size() + train.q_x.numel() * train.q_x.element_size())
        if need < 0.6 * torch.cuda.mem_get_info(dev)[0]:
            train = train.to(dev)
    return train, held_out


def _optimizer(proj: RouterProjections, cfg: TrainConfig, n_queries: int) -> tuple[Any, Any]:
    """(AdamW over the trainable projections, warm-up + cosine schedule); frozen layers (and, with
    ``freeze_keys``, every key projection) get no gradient."""
    frozen = set(cfg.frozen_layers)
    if not frozen <= set(proj.layers) or frozen >= set(proj.layers):
        raise ConfigError(f"frozen layers {sorted(frozen)} must be some, not all, of the router layers "
                          f"{list(proj.layers)}.")
    for li, layer in enumerate(proj.layers):
        proj.q[li].requires_grad_(layer not in frozen)
        proj.k[li].requires_grad_(layer not in frozen and not cfg.freeze_keys)
    opt = torch.optim.AdamW([w for w in proj.parameters() if w.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(n_queries / cfg.batch_size)
    total = max(1, steps_per_epoch * cfg.epochs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, total // 20))
                                              * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    return opt, sched


def _candidates(train: Features, bidx: torch.Tensor, cfg: TrainConfig, mined: list[tuple[int, ...]] | None,
                use_bm25: bool, distill: bool, gen: torch.Generator) -> tuple[torch.Tensor, dict[int, int]]:
    """A step's candidate passages (positives ∪ hard negatives ∪ teacher lists ∪ ``n_random`` random ones),
    sorted, and each one's column."""
    cand: set[int] = set()
    for i in bidx.tolist():
        cand.update(train.positives[i])
        if use_bm25:
            cand.update(train.hard_negatives[i][: cfg.n_hard])
        if mined is not None:
            cand.update(mined[i])
        if distill:
            cand.update(d for d in train.teacher_cands[i].tolist() if d >= 0)
    cand.update(torch.randint(0, train.n_docs, (cfg.n_random,), generator=gen).tolist())
    cdocs = torch.tensor(sorted(cand), dtype=torch.int64)
    return cdocs, {d: j for j, d in enumerate(cdocs.tolist())}


def _step_loss(proj: RouterProjections, train: Features, bidx: torch.Tensor, cdocs: torch.Tensor,
               local: dict[int, int], cfg: TrainConfig, dev: torch.device, distill: bool) -> torch.Tensor:
    """One step's loss: decoupled InfoNCE (or listwise distillation) per layer (mean over layers) and/or of
    the layer-averaged score, over the candidates' chunks."""
    L = len(proj.layers)
    cidx, cdoc = train.chunks_of(cdocs)                                   # (L, Cc, E) and chunk -> candidate
    xc = train.x_chunks[:, cidx.to(train.x_chunks.device)].to(dev)
    qx, qmask = train.query_batch(bidx)
    pos = torch.zeros(len(bidx), len(cdocs), dtype=torch.bool)
    for b, i in enumerate(bidx.tolist()):
        pos[b, [local[d] for d in train.positives[i]]] = True
    loss = torch.zeros((), device=dev)
    pos_d = pos.to(dev)
    with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=cfg.bf16):
        layer_scores = [_layer_doc_scores(proj, li, qx[li].to(dev), qmask.to(dev), xc[li], cdoc.to(dev), len(cdocs),
                                          cfg).float() for li in range(L)]
    w = 0.5 if cfg.layer_loss == "both" else 1.0
    if distill:   # each query's teacher list, as columns of the step's candidates
        tc = train.teacher_cands[bidx]                                   # (B, M)
        tvalid = tc >= 0
        cols = torch.tensor([[local[d] if d >= 0 else 0 for d in row] for row in tc.tolist()],
                            dtype=torch.int64, device=dev)
        tsc, tvalid = train.teacher_scores[bidx].to(dev), tvalid.to(dev)

    def objective(s: torch.Tensor) -> torch.Tensor:
        if not distill:
            return decoupled_infonce(s, pos_d, tau=cfg.tau)
        kl = listwise_kl(s.gather(1, cols), tsc, tvalid, tau_student=cfg.tau, tau_teacher=cfg.distill_tau)
        return kl + cfg.distill_alpha * decoupled_infonce(s, pos_d, tau=cfg.tau) if cfg.distill_alpha else kl

    if cfg.layer_loss in ("each", "both"):
        for s in layer_scores:
            loss = loss + w * objective(s) / L
    if cfg.layer_loss in ("sum", "both"):
        loss = loss + w * objective(torch.stack(layer_scores).mean(0))
    return loss


def train_router(proj: RouterProjections, train: Features, held_out: Features | None = None,
                 cfg: TrainConfig | None = None, *, log: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Train ``proj`` in place; returns one record per epoch (loss, seconds, held-out recall@k).

    An epoch-0 record holds the held-out recall before any update.
    """
    cfg = cfg or TrainConfig()
    dev = torch.device(cfg.device)
    proj.to(dev)
    train, held_out = _placed(proj, train, held_out, cfg, dev)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt, sched = _optimizer(proj, cfg, train.n_queries)
    history: list[dict[str, Any]] = []

    def record(epoch: int, loss: float, secs: float) -> None:
        rec: dict[str, Any] = {"epoch": epoch, "loss": loss, "seconds": round(secs, 2)}
        if held_out is not None and held_out.n_queries:
            ev = evaluate(proj, held_out, cfg)
            rec["recall"] = ev["recall"]
            rec["per_layer"] = ev["per_layer"]
            for key in ev:
                if key.startswith("recall_"):
                    rec[key] = ev[key]
        history.append(rec)
        if log is not None:
            log(rec)

    with torch.no_grad():
        record(0, float("nan"), 0.0)
    use_bm25 = cfg.hard_source in ("bm25", "both") and bool(train.hard_negatives)
    distill = cfg.objective == "distill"
    if distill and train.teacher_cands is None:
        raise ConfigError("objective='distill' needs the teacher's candidate lists in the training features "
                          "(Features.with_teacher, distill.teacher_lists).")
    mined: list[tuple[int, ...]] | None = None
    for epoch in range(1, cfg.epochs + 1):
        t0, losses = time.perf_counter(), []
        if cfg.hard_source in ("routing", "both") and cfg.n_hard and (
                mined is None or (cfg.mine_every and (epoch - 1) % cfg.mine_every == 0)):
            mined = mine_routing_negatives(proj, train, cfg.n_hard, cfg)  # the current router's confusions
        order = torch.randperm(train.n_queries, generator=gen)
        for s0 in range(0, train.n_queries, cfg.batch_size):
            bidx = order[s0:s0 + cfg.batch_size]
            cdocs, local = _candidates(train, bidx, cfg, mined, use_bm25, distill, gen)
            loss = _step_loss(proj, train, bidx, cdocs, local, cfg, dev, distill)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.detach())                   # no host sync per step
        with torch.no_grad():
            mean = float(torch.stack(losses).double().mean()) if losses else float("nan")
            record(epoch, mean, time.perf_counter() - t0)
    return history
