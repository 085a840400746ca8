"""Chunk-mean pooling over packed documents (msa-reference.md §2.5).

Packed documents of lengths n_1..n_N lie back to back on the token axis; document i has
ceil(n_i / P) chunks of P consecutive tokens counted from its first token, the last one partial.
Because chunks never span documents and documents are contiguous, the whole token axis is
partitioned into consecutive chunks in (document, chunk) order, so pooling is a segment mean:
accumulate in fp32 with ``index_add_`` and divide each chunk by its real length (no zero padding).

:func:`pool_naive` is the slow, obviously-correct Python loop the fast path is tested against.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from msa_memory.errors import ConfigError

__all__ = ["ChunkLayout", "chunk_layout", "chunk_mean_pool", "pool_naive", "n_chunks_of"]


def n_chunks_of(n_tokens: int, chunk_tokens: int) -> int:
    """ceil(n_tokens / chunk_tokens)."""
    return -(-int(n_tokens) // int(chunk_tokens))


@dataclass(frozen=True)
class ChunkLayout:
    """Where every packed token's chunk is."""

    chunk_of_token: torch.Tensor
    """(T,) int64 chunk index of each token."""
    counts: torch.Tensor
    """(C,) float32 tokens per chunk (P, or fewer for a document's last chunk)."""
    n_chunks: list[int]
    """Chunks per document."""

    @property
    def n_total(self) -> int:
        return int(self.counts.shape[0])


def chunk_layout(seq_lens: Sequence[int], chunk_tokens: int, device: torch.device | str = "cpu") -> ChunkLayout:
    """The :class:`ChunkLayout` of documents of ``seq_lens`` tokens packed back to back.

    Raises
    ------
    ConfigError
        A non-positive ``chunk_tokens`` or a negative length.
    """
    p = int(chunk_tokens)
    if p <= 0:
        raise ConfigError(f"chunk_tokens must be positive, got {chunk_tokens!r}.")
    lens = [int(n) for n in seq_lens]
    if any(n < 0 for n in lens):
        raise ConfigError(f"sequence lengths must be >= 0, got {lens!r}.")
    idx, counts, n_chunks = [], [], []
    c0 = 0
    for n in lens:
        nc = n_chunks_of(n, p)
        n_chunks.append(nc)
        if n:
            idx.append(torch.arange(n) // p + c0)
            full = [p] * (nc - 1) + [n - p * (nc - 1)]
            counts.extend(full)
        c0 += nc
    chunk_of = torch.cat(idx) if idx else torch.zeros(0, dtype=torch.long)
    return ChunkLayout(chunk_of.to(device), torch.tensor(counts, dtype=torch.float32, device=device), n_chunks)


def chunk_mean_pool(x: torch.Tensor, layout: ChunkLayout) -> torch.Tensor:
    """Mean of ``x`` (T, ...) over each chunk of ``layout``: (C, ...) float32.

    Sums are accumulated in fp32 whatever x's dtype; each chunk is divided by its real length.
    """
    t = x.shape[0]
    if t != layout.chunk_of_token.shape[0]:
        raise ConfigError(f"x has {t} tokens but the chunk layout covers {layout.chunk_of_token.shape[0]}.")
    flat = x.reshape(t, -1).float()
    out = torch.zeros(layout.n_total, flat.shape[1], dtype=torch.float32, device=x.device)
    out.index_add_(0, layout.chunk_of_token, flat)
    out /= layout.counts[:, None]
    return out.reshape(layout.n_total, *x.shape[1:])


def pool_naive(x: np.ndarray, seq_lens: Sequence[int], chunk_tokens: int) -> np.ndarray:
    """Reference pooling in a plain Python loop (float64): (T, ...) -> (C, ...)."""
    out = []
    start = 0
    for n in seq_lens:
        for c in range(n_chunks_of(n, chunk_tokens)):
            a = start + c * chunk_tokens
            b = min(start + n, a + chunk_tokens)
            acc = np.zeros(x.shape[1:], dtype=np.float64)
            for t in range(a, b):
                acc += x[t]
            out.append(acc / (b - a))
        start += n
    return np.stack(out) if out else np.zeros((0, *x.shape[1:]), dtype=np.float64)
