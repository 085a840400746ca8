"""The training arrays of router training: :class:`Features`, the frozen-backbone inputs of the router for
one set of passages and queries (made by :mod:`msa_memory.train.features`, consumed by
:mod:`msa_memory.train.trainer`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from msa_memory.errors import ConfigError

__all__ = ["Features"]


@dataclass
class Features:
    """Frozen-backbone inputs of the router for one set of passages and queries.

    ``layers`` are decoder-layer indices of the L axis. Query tokens are stored flat:
    query i owns rows ``q_offsets[i]:q_offsets[i+1]`` of ``q_x``.
    """

    layers: tuple[int, ...]
    x_chunks: torch.Tensor      # (L, C, E) pooled router-layer inputs, bf16/fp32
    chunk_doc: torch.Tensor     # (C,) int64 passage index of every chunk
    n_docs: int
    q_x: torch.Tensor           # (Tq, L, E) router-layer inputs of all query tokens, flat
    q_offsets: torch.Tensor     # (Q+1,) int64
    positives: list[tuple[int, ...]]
    kinds: list[str] = field(default_factory=list)
    hard_negatives: list[tuple[int, ...]] = field(default_factory=list)
    query_suffix: str = ""
    """The text appended to every query before its inputs were taken (``RouterConfig.query_suffix``)."""
    teacher_cands: torch.Tensor | None = None
    """(Q, M) int64 candidate passages of every query for listwise distillation (``distill.teacher_lists``;
    -1 pads), or None."""
    teacher_scores: torch.Tensor | None = None
    """(Q, M) float32 the teacher's scores of ``teacher_cands`` (NaN pads)."""

    def __post_init__(self) -> None:
        L, C, _ = self.x_chunks.shape
        if L != len(self.layers) or self.q_x.shape[1] != L:
            raise ConfigError(f"Features have {len(self.layers)} layers but arrays carry "
                              f"{L} (chunks) and {self.q_x.shape[1]} (queries).")
        if self.chunk_doc.shape[0] != C or len(self.positives) != self.n_queries:
            raise ConfigError("Features: chunk_doc must have one entry per chunk and positives one per query.")
        if (self.teacher_cands is None) != (self.teacher_scores is None) or (
                self.teacher_cands is not None and (self.teacher_cands.shape != self.teacher_scores.shape
                                                    or self.teacher_cands.shape[0] != self.n_queries)):
            raise ConfigError("Features: teacher_cands and teacher_scores go together, (Q, M) each.")
        starts = torch.full((self.n_docs + 1,), C, dtype=torch.int64)
        # chunk ranges per document (chunks of a document are contiguous, documents in order)
        counts = torch.bincount(self.chunk_doc, minlength=self.n_docs)
        starts = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
        self.doc_chunk_offsets = starts  # (N+1,)

    @property
    def n_queries(self) -> int:
        return int(self.q_offsets.shape[0]) - 1

    def counts(self) -> dict[str, int]:
        """Passages, queries and queries per kind (the shape of ``PairSet.counts``)."""
        out = {"passages": self.n_docs, "queries": self.n_queries}
        for k in self.kinds:
            out[k] = out.get(k, 0) + 1
        return out

    def layer_subset(self, layers: tuple[int, ...]) -> Features:
        """The same features restricted to ``layers`` (a subset of ``self.layers``)."""
        missing = [x for x in layers if x not in self.layers]
        if missing:
            raise ConfigError(f"Layers {missing} were not extracted; available: {list(self.layers)}.")
        pos = [self.layers.index(x) for x in layers]
        return Features(tuple(layers), self.x_chunks[pos], self.chunk_doc, self.n_docs, self.q_x[:, pos],
                        self.q_offsets, self.positives, self.kinds, self.hard_negatives, self.query_suffix,
                        self.teacher_cands, self.teacher_scores)

    def with_distractors(self, other: Features) -> Features:
        """These queries against these passages *and* ``other``'s passages (appended after them).

        Used to measure held-out recall in a memory as large as the training corpus: ``other``'s
        passages hold none of these queries' positives, so they can only push positives down.
        """
        if tuple(other.layers) != tuple(self.layers):
            other = other.layer_subset(self.layers)
        return Features(self.layers, torch.cat([self.x_chunks, other.x_chunks.to(self.x_chunks.dtype)], dim=1),
                        torch.cat([self.chunk_doc, other.chunk_doc + self.n_docs]), self.n_docs + other.n_docs,
                        self.q_x, self.q_offsets, self.positives, self.kinds, self.hard_negatives, self.query_suffix,
                        self.teacher_cands, self.teacher_scores)

    def with_teacher(self, cands: Any, scores: Any) -> Features:
        """The same features with listwise-distillation candidates and teacher scores ((Q, M) each)."""
        return Features(self.layers, self.x_chunks, self.chunk_doc, self.n_docs, self.q_x, self.q_offsets,
                        self.positives, self.kinds, self.hard_negatives, self.query_suffix,
                        torch.as_tensor(cands, dtype=torch.int64), torch.as_tensor(scores, dtype=torch.float32))

    def to(self, device: torch.device | str) -> Features:
        """The same features with the passage and query arrays on ``device`` (indices stay on the CPU)."""
        return Features(self.layers, self.x_chunks.to(device), self.chunk_doc, self.n_docs, self.q_x.to(device),
                        self.q_offsets, self.positives, self.kinds, self.hard_negatives, self.query_suffix,
                        self.teacher_cands, self.teacher_scores)

    def chunks_of(self, docs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(chunk indices of passages ``docs`` in order, the position in ``docs`` of each of them)."""
        offs = self.doc_chunk_offsets
        counts = offs[docs + 1] - offs[docs]
        owner = torch.repeat_interleave(torch.arange(len(docs)), counts)
        first = torch.cumsum(counts, 0) - counts                   # where each passage's run starts
        return offs[docs][owner] + torch.arange(int(counts.sum())) - first[owner], owner

    def query_batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded (L, B, T, E) query inputs and (B, T) mask for query indices ``idx``."""
        starts, ends = self.q_offsets[idx], self.q_offsets[idx + 1]
        lens = ends - starts
        T = int(lens.max())
        ar = torch.arange(T)
        mask = ar[None, :] < lens[:, None]                        # (B, T)
        rows = (starts[:, None] + ar[None, :]).clamp(max=self.q_x.shape[0] - 1)
        x = self.q_x[rows.to(self.q_x.device)]                    # (B, T, L, E)
        return x.permute(2, 0, 1, 3), mask
