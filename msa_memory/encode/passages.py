"""Split a document's text into passages of at most N tokens, keeping source byte offsets.

A passage is the unit MSA routes to. We cut at the most natural boundary that keeps passages
under ``max_tokens`` text tokens (before model wrapping, which adds a few): paragraphs (blank
lines), then lines, then sentence ends, then whitespace between words, and only as a last resort
inside a run of non-space text (at token boundaries when the tokenizer reports offsets). Adjacent
pieces are merged greedily while the merged passage still fits.

Memory and time are bounded by a batch, not by the document: pieces are produced lazily and counted
in tokenizer calls of at most ``_BATCH_CHARS`` characters; a span longer than
``_CHARS_PER_TOKEN_LIMIT * max_tokens`` characters is never tokenized whole (it is cut further, as
a span over the limit is); a run without separators is cut by searching a window that doubles from
``4 * max_tokens`` characters. So a passage never holds more than that many characters, and a
document costs its text, its passages and one batch.

Invariants (tested with hypothesis): ``source_bytes[p.byte_start:p.byte_end].decode() == p.text``;
passages are in order, never overlap, have no leading/trailing whitespace, and everything outside
them is whitespace; each passage has at most ``max_tokens`` tokens unless a single
tokenizer-indivisible piece is longer.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator
from typing import Any

from msa_memory.errors import ConfigError
from msa_memory.schemas.records import Passage

__all__ = ["split_passages", "iter_passages", "DEFAULT_MAX_TOKENS"]

DEFAULT_MAX_TOKENS = 512
_LEVELS = [re.compile(r"\n[ \t\r\f\v]*\n\s*"), re.compile(r"\n"), re.compile(r"(?<=[.!?;:])\s+"), re.compile(r"\s+")]
#: characters per tokenizer call (one batch of spans)
_BATCH_CHARS = 1 << 17
#: a span of more than this many characters per allowed token is over the limit without counting
_CHARS_PER_TOKEN_LIMIT = 64

Span = tuple[int, int, "int | None"]
"""(start, end, token count or None when not counted yet / too long to count), character offsets."""


def _pieces(text: str, start: int, end: int, level: int) -> Iterator[Span]:
    """Cut text[start:end] after each separator match of ``level``: contiguous spans, lazily."""
    s = start
    for m in _LEVELS[level].finditer(text, start, end):
        if m.end() > s and m.end() < end:
            yield (s, m.end(), None)
            s = m.end()
    yield (s, end, None)


class _Counter:
    """Token counts of spans of one text, in bounded tokenizer calls (``add_special_tokens=False``)."""

    def __init__(self, text: str, tokenizer: Any, max_tokens: int) -> None:
        self.text, self.tokenizer = text, tokenizer
        self.too_long = _CHARS_PER_TOKEN_LIMIT * max_tokens

    def _run(self, spans: list[tuple[int, int]]) -> list[int]:
        enc = self.tokenizer([self.text[s:e] for s, e in spans], add_special_tokens=False,
                             return_attention_mask=False, return_token_type_ids=False)["input_ids"]
        return [len(ids) for ids in enc]

    def count(self, spans: list[tuple[int, int]]) -> list[int | None]:
        """Counts of ``spans``; None for a span too long to count (it is over the limit)."""
        out: list[int | None] = [None] * len(spans)
        batch: list[int] = []
        chars = 0
        for i, (s, e) in enumerate(spans):
            if e - s > self.too_long:
                continue
            batch.append(i)
            chars += e - s
            if chars >= _BATCH_CHARS:
                for j, n in zip(batch, self._run([spans[j] for j in batch])):
                    out[j] = n
                batch, chars = [], 0
        if batch:
            for j, n in zip(batch, self._run([spans[j] for j in batch])):
                out[j] = n
        return out

    def with_counts(self, spans: Iterable[Span]) -> Iterator[Span]:
        """``spans`` in order with their counts filled in, reading ahead by at most one batch."""
        pending: list[Span] = []
        chars = 0
        for sp in spans:
            pending.append(sp)
            if sp[2] is None:
                chars += sp[1] - sp[0]
            if chars >= _BATCH_CHARS or len(pending) >= 4096:
                yield from self._fill(pending)
                pending, chars = [], 0
        yield from self._fill(pending)

    def _fill(self, pending: list[Span]) -> list[Span]:
        todo = [i for i, sp in enumerate(pending) if sp[2] is None]
        counts = self.count([(pending[i][0], pending[i][1]) for i in todo])
        for i, n in zip(todo, counts):
            pending[i] = (pending[i][0], pending[i][1], n)
        return pending


def _over(n: int | None, max_tokens: int) -> bool:
    return n is None or n > max_tokens


def split_passages(text: str, source_path: str, tokenizer: Any, max_tokens: int = DEFAULT_MAX_TOKENS, *,
                   file_sha256: str | None = None) -> list[Passage]:
    """Split ``text`` into :class:`Passage` records of at most ``max_tokens`` tokens.

    Parameters
    ----------
    text : str
        The whole source document.
    source_path : str
        Recorded in every passage.
    tokenizer : transformers tokenizer
        Counts tokens (``add_special_tokens=False``).
    max_tokens : int, default 512
        Text tokens per passage (wrapping adds a few).
    file_sha256 : str, optional
        Recorded in every passage; default the sha256 of ``text`` in UTF-8.

    Returns
    -------
    list[Passage]
        In order; empty for an all-whitespace text. :func:`iter_passages` yields the same lazily.

    Raises
    ------
    ConfigError
        ``max_tokens`` < 1.

    Examples
    --------
    >>> from msa_memory.encode.tiny import tiny_tokenizer
    >>> ps = split_passages("One.\\n\\nTwo two.", "a.txt", tiny_tokenizer(), max_tokens=8)
    >>> [(p.text, p.byte_start, p.byte_end) for p in ps]
    [('One.', 0, 4), ('Two two.', 6, 14)]
    """
    return list(iter_passages(text, source_path, tokenizer, max_tokens, file_sha256=file_sha256))


def iter_passages(text: str, source_path: str, tokenizer: Any, max_tokens: int = DEFAULT_MAX_TOKENS, *,
                  file_sha256: str | None = None) -> Iterator[Passage]:
    """:func:`split_passages`, one passage at a time (memory: the text and one tokenizer batch)."""
    if int(max_tokens) < 1:
        raise ConfigError(f"max_tokens must be >= 1, got {max_tokens!r}.")
    max_tokens = int(max_tokens)
    sha = file_sha256 or hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    counter = _Counter(text, tokenizer, max_tokens)
    spans = _merge(text, _fit(text, [(0, len(text), None)], 0, max_tokens, counter), max_tokens, counter)
    pos_c, pos_b, index = 0, 0, 0
    for s, e, _ in spans:
        seg = text[s:e]  # strip whitespace, drop empty, convert char offsets to UTF-8 byte offsets incrementally
        ls = len(seg) - len(seg.lstrip())
        rs = len(seg.rstrip())
        if rs <= ls:
            continue
        bs = pos_b + len(text[pos_c:s + ls].encode("utf-8", "surrogatepass"))
        be = bs + len(seg[ls:rs].encode("utf-8", "surrogatepass"))
        pos_c, pos_b = s + rs, be
        yield Passage(text=seg[ls:rs], source_path=source_path, passage_index=index, byte_start=bs, byte_end=be,
                      file_sha256=sha)
        index += 1


def _fit(text: str, spans: Iterable[Span], level: int, max_tokens: int, counter: _Counter) -> Iterator[Span]:
    """Recursively cut spans that are over ``max_tokens`` at finer boundaries."""
    for s, e, n in counter.with_counts(spans):
        if not _over(n, max_tokens) or e - s <= 1:
            yield (s, e, n)
        elif level < len(_LEVELS):
            sub = _pieces(text, s, e, level)
            first = next(sub)
            second = next(sub, None)
            if second is None:
                yield from _fit(text, [(s, e, n)], level + 1, max_tokens, counter)
            else:
                merged = _merge(text, _chain(first, second, sub), max_tokens, counter)
                yield from _fit(text, merged, level + 1, max_tokens, counter)
        else:
            yield from _hard_split(text, s, e, max_tokens, counter)


def _chain(first: Span, second: Span, rest: Iterator[Span]) -> Iterator[Span]:
    yield first
    yield second
    yield from rest


def _groups(spans: Iterator[Span], max_tokens: int) -> Iterator[list[Span]]:
    """Greedy runs of consecutive spans whose counts add up to at most ``max_tokens``."""
    group: list[Span] = []
    total = 0
    for sp in spans:
        n = sp[2]
        if group and not _over(n, max_tokens) and total + n <= max_tokens:
            group.append(sp)
            total += n
        else:
            if group:
                yield group
            group, total = [sp], (n if n is not None else max_tokens + 1)
    if group:
        yield group


def _merge(text: str, spans: Iterable[Span], max_tokens: int, counter: _Counter) -> Iterator[Span]:
    """Merge consecutive contiguous spans greedily while the merged text stays within max_tokens.

    Token counts are not exactly additive across a boundary: each merged run is counted again, and a
    run over the limit is split in halves that are merged again.
    """
    batch: list[list[Span]] = []
    chars = 0
    for group in _groups(counter.with_counts(spans), max_tokens):
        batch.append(group)
        chars += group[-1][1] - group[0][0] if len(group) > 1 else 0
        if chars >= _BATCH_CHARS or len(batch) >= 4096:
            yield from _verify(text, batch, max_tokens, counter)
            batch, chars = [], 0
    yield from _verify(text, batch, max_tokens, counter)


def _verify(text: str, batch: list[list[Span]], max_tokens: int, counter: _Counter) -> Iterator[Span]:
    multi = [g for g in batch if len(g) > 1]
    counts = iter(counter.count([(g[0][0], g[-1][1]) for g in multi]))
    for g in batch:
        if len(g) == 1:
            yield g[0]
            continue
        n = next(counts)
        if not _over(n, max_tokens):
            yield (g[0][0], g[-1][1], n)
        else:
            half = len(g) // 2
            yield from _merge(text, g[:half], max_tokens, counter)
            yield from _merge(text, g[half:], max_tokens, counter)


def _hard_split(text: str, s: int, e: int, max_tokens: int, counter: _Counter) -> Iterator[Span]:
    """Split a run without separators into pieces of <= max_tokens tokens.

    Each cut is the largest end whose prefix fits, found by bisection inside a window that doubles
    from ``4 * max_tokens`` characters until it is over the limit (or reaches the end of the run).
    """
    while s < e:
        w = min(e - s, max(16, 4 * max_tokens))
        while True:
            (n,) = counter.count([(s, s + w)])
            if _over(n, max_tokens):
                break
            if s + w >= e:
                yield (s, e, n)
                return
            w = min(2 * w, e - s)
        lo, hi = s + 1, s + w  # largest cut c with count(s, c) <= max_tokens
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if not _over(counter.count([(s, mid)])[0], max_tokens):
                lo = mid
            else:
                hi = mid - 1
        yield (s, lo, None)
        s = lo
