"""Chunk-mean pooling over packed documents (msa-reference.md §2.5).

Packed documents of lengths n_1..n_N lie back to back on the token axis; document i has
ceil(n_i / P) chunks of P consecutive tokens counted from its first token, the last one partial.
Because chunks never span documents and documents are contiguous, the whole token axis is
partitioned into consecutive chunks in (document, chunk) order, so pooling is a segment mean:
sums accumulated in fp32 and each chunk divided by its real length (no zero padding counted).

How (no atomics: ``index_add_`` on a GPU made 64 tokens contend for one chunk row and cost ~11% of
an encode). :func:`chunk_layout` precomputes, once per packed batch, index tensors shared by every
layer and by K, V and x:

* regular layout (every length a multiple of P, e.g. equal-length passages): the chunks are a
  reshape of the token axis, so pooling is ``x.unflatten(0, (C, P)).sum(1, dtype=float32)`` on a
  view -- no copy even of a strided (transposed) ``x``;
* otherwise full chunks are one ``index_select`` of their tokens then the same reshape-sum, and the
  partial (last) chunks one small gather of their tokens plus a zero row (pad slots point at it),
  summed the same way; both land in their output rows with ``index_copy_`` (distinct rows).

Every chunk is summed over its tokens in token order by one ``sum`` reduction; CUDA fuses the
bf16 -> fp32 cast into it. :func:`pool_naive` is the slow, obviously-correct Python loop the fast
path is tested against (hypothesis: random lengths, P, feature shapes, dtypes, strided inputs).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from msa_memory.errors import ConfigError
from msa_memory.schemas.records import shifted_chunk_counts

__all__ = ["ChunkLayout", "chunk_layout", "chunk_mean_pool", "pool_naive", "n_chunks_of", "shifted_layout",
           "shifted_pool", "pool_shifted_naive"]


def n_chunks_of(n_tokens: int, chunk_tokens: int) -> int:
    """ceil(n_tokens / chunk_tokens)."""
    return -(-int(n_tokens) // int(chunk_tokens))


@dataclass(frozen=True)
class ChunkLayout:
    """Where every chunk's tokens are, for documents packed back to back (see module notes)."""

    chunk_tokens: int
    """P."""
    n_tokens: int
    """T, the packed token count."""
    counts: torch.Tensor
    """(C,) float32 tokens per chunk (P, or fewer for a document's last chunk)."""
    n_chunks: list[int]
    """Chunks per document."""
    regular: bool
    """Every document length is a multiple of P: chunk c is tokens c*P .. c*P+P-1."""
    full_tokens: torch.Tensor | None = None
    """(Cf*P,) int64 tokens of the full chunks, chunk by chunk (None when regular)."""
    full_rows: torch.Tensor | None = None
    """(Cf,) int64 output row of each full chunk (None when regular)."""
    tail_tokens: torch.Tensor | None = None
    """(M,) int64 tokens of the partial chunks (None when there are none)."""
    tail_gather: torch.Tensor | None = None
    """(Nt*P,) int64 rows of ``[x[tail_tokens]; 0]`` per partial chunk, pad slots = M (the zero row)."""
    tail_rows: torch.Tensor | None = None
    """(Nt,) int64 output row of each partial chunk."""

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
    lens = np.asarray([int(n) for n in seq_lens], dtype=np.int64)
    if (lens < 0).any():
        raise ConfigError(f"sequence lengths must be >= 0, got {lens.tolist()!r}.")
    nc = -(-lens // p)
    full, tail = lens // p, lens % p
    starts = np.cumsum(lens) - lens
    c0 = np.cumsum(nc) - nc  # first chunk row of each document
    counts = np.full(int(nc.sum()), p, dtype=np.float32)
    has_tail = tail > 0
    counts[(c0 + full)[has_tail]] = tail[has_tail]
    to = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(device)
    kw: dict = {}
    regular = not has_tail.any()
    if not regular:
        nf = int(full.sum())
        if nf:
            j = np.arange(nf) - np.repeat(np.cumsum(full) - full, full)  # chunk index within its document
            kw["full_rows"] = to(np.repeat(c0, full) + j)
            kw["full_tokens"] = to(((np.repeat(starts, full) + j * p)[:, None] + np.arange(p)[None, :]).reshape(-1))
        tl, ts = tail[has_tail], (starts + full * p)[has_tail]  # tail lengths and first tokens
        m = int(tl.sum())
        off = np.cumsum(tl) - tl
        slot = np.arange(p)[None, :]
        kw["tail_tokens"] = to(np.repeat(ts, tl) + np.arange(m) - np.repeat(off, tl))
        kw["tail_gather"] = to(np.where(slot < tl[:, None], off[:, None] + slot, m).reshape(-1))
        kw["tail_rows"] = to((c0 + full)[has_tail])
    return ChunkLayout(chunk_tokens=p, n_tokens=int(lens.sum()), counts=torch.from_numpy(counts).to(device),
                       n_chunks=nc.tolist(), regular=bool(regular), **kw)


def shifted_layout(seq_lens: Sequence[int], chunk_tokens: int,
                   device: torch.device | str = "cpu") -> tuple[ChunkLayout, torch.Tensor]:
    """The shifted router-key grid of documents of ``seq_lens`` tokens packed back to back.

    Returns ``(layout, keep)``: ``chunk_mean_pool(x, layout)[keep]`` are the means over each document's
    P-token windows starting at token P // 2, document by document (a document of at most P // 2 tokens:
    one window, its whole text; see ``schemas.records.shifted_chunk_counts``). The layout is that of the
    documents cut in two at P // 2, whose head pieces (tokens 0 .. P/2 - 1, inside the first aligned
    chunk) ``keep`` leaves out where a document is longer than P // 2.
    """
    p = int(chunk_tokens)
    h = p // 2
    lens = np.asarray([int(n) for n in seq_lens], dtype=np.int64)
    head = np.minimum(lens, h)
    layout = chunk_layout(np.stack([head, lens - head], 1).reshape(-1).tolist(), p, device=device)
    head_row = np.cumsum(layout.n_chunks)[0::2] - 1                      # the head piece's one chunk
    drop = np.zeros(layout.n_total, dtype=bool)
    drop[head_row[(lens > h) & (head > 0)]] = True                       # (P = 1: no head piece, none to drop)
    return layout, torch.from_numpy(np.flatnonzero(~drop)).to(device)


def shifted_pool(seq_lens: Sequence[int], chunk_tokens: int, window: int | None = None,
                 device: torch.device | str = "cpu") -> Callable[[torch.Tensor], torch.Tensor]:
    """The shifted router-key grid's pooling of documents of ``seq_lens`` tokens packed back to back:
    ``f(x)`` maps (T, ...) to the (Cs, ...) float32 means over each document's windows, document by
    document, in the order of ``schemas.records.shifted_chunk_counts`` (``window`` None: P-token windows
    from P/2, :func:`shifted_layout`; a finer W: the document's W-token chunks from token 0, then its
    W-token windows from W/2). The layouts are built once; ``f`` may be called per layer."""
    if window is None or int(window) == int(chunk_tokens):
        lay, keep = shifted_layout(seq_lens, chunk_tokens, device=device)
        return lambda x: chunk_mean_pool(x, lay).index_select(0, keep)
    w = int(window)
    a_lay = chunk_layout(seq_lens, w, device=device)
    s_lay, s_keep = shifted_layout(seq_lens, w, device=device)
    n_a = np.asarray(a_lay.n_chunks, dtype=np.int64)
    n_shifted = shifted_chunk_counts([int(n) for n in seq_lens], w)        # the W/2-shifted windows of each document
    # row order: document d's aligned windows (rows of the first block), then its shifted ones (second block)
    doc_aligned = np.repeat(np.arange(len(n_a)), n_a)
    doc_shifted = np.repeat(np.arange(len(n_shifted)), n_shifted)
    order = np.argsort(np.concatenate([doc_aligned, doc_shifted]), kind="stable")
    order_t = torch.from_numpy(order).to(device)
    return lambda x: torch.cat([chunk_mean_pool(x, a_lay), chunk_mean_pool(x, s_lay).index_select(0, s_keep)]
                               ).index_select(0, order_t)


def pool_shifted_naive(x: np.ndarray, seq_lens: Sequence[int], chunk_tokens: int,
                       window: int | None = None) -> np.ndarray:
    """Reference shifted-grid pooling in a plain Python loop (float64): (T, ...) -> (Cs, ...)."""
    out = []
    start, p = 0, int(chunk_tokens)
    fine = window is not None and int(window) != p
    w = int(window) if fine else p
    for n in seq_lens:
        windows = [(a, min(a + w, n)) for a in range(0, n, w)] if fine else []
        windows += [(0, n)] if n <= w // 2 else [(a, min(a + w, n)) for a in range(w // 2, n, w)]
        for a, b in windows:
            out.append(x[start + a:start + b].astype(np.float64).mean(0))
        start += n
    return np.stack(out) if out else np.zeros((0, *x.shape[1:]), dtype=np.float64)


def _rows_sum(x: torch.Tensor, n: int, p: int) -> torch.Tensor:
    """(n*P, ...) -> (n, ...) fp32 sums of consecutive groups of P rows."""
    return x.unflatten(0, (n, p)).sum(1, dtype=torch.float32)


def chunk_mean_pool(x: torch.Tensor, layout: ChunkLayout) -> torch.Tensor:
    """Mean of ``x`` (T, ...) over each chunk of ``layout``: (C, ...) float32.

    ``x`` may be any strided view (e.g. ``k[0].transpose(0, 1)`` of a (1, H, T, D) tensor). Sums
    are accumulated in fp32 whatever x's dtype; each chunk is divided by its real length.

    Raises
    ------
    ConfigError
        ``x`` does not have the layout's token count on dim 0.
    """
    t = x.shape[0]
    if t != layout.n_tokens:
        raise ConfigError(f"x has {t} tokens but the chunk layout covers {layout.n_tokens}.")
    c, p, rest = layout.n_total, layout.chunk_tokens, x.shape[1:]
    dev = x.device
    if layout.regular:
        out = _rows_sum(x, c, p)
    else:
        out = torch.empty(c, *rest, dtype=torch.float32, device=dev)
        if layout.full_rows is not None:
            fr = layout.full_rows.to(dev)
            out.index_copy_(0, fr, _rows_sum(x.index_select(0, layout.full_tokens.to(dev)), fr.shape[0], p))
        tr = layout.tail_rows.to(dev)  # not regular: there is at least one partial chunk
        xt = x.index_select(0, layout.tail_tokens.to(dev))
        xt = torch.cat([xt, xt.new_zeros(1, *rest)])
        out.index_copy_(0, tr, _rows_sum(xt.index_select(0, layout.tail_gather.to(dev)), tr.shape[0], p))
    out /= layout.counts.to(dev).view(c, *([1] * len(rest)))
    return out


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
