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
``4 * max_tokens`` characters. So a passage never holds more than that many characters. The text is
a ``str`` or a :class:`~msa_memory.encode._textfile.TextFile` (a file read a block at a time); the
splitter asks for ranges of it front to back, reading ahead by a few batches at most, so a file
costs a few blocks, not its size. Both give the same passages (tested).

Invariants (tested with hypothesis): ``source_bytes[p.byte_start:p.byte_end].decode() == p.text``;
passages are in order, never overlap, have no leading/trailing whitespace, and everything outside
them is whitespace; each passage has at most ``max_tokens`` tokens unless a single
tokenizer-indivisible piece is longer.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

from msa_memory.encode._textfile import TextFile
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


class _Text(Protocol):
    """What the splitter reads of a text: its length, ranges, and separator matches (``TextFile``, ``_Str``)."""

    def __len__(self) -> int: ...
    def get(self, start: int, end: int) -> str: ...
    def finditer(self, pattern: re.Pattern[str], start: int, end: int) -> Iterator[tuple[int, int]]: ...


class _Str:
    """A ``str`` as a :class:`_Text`."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __len__(self) -> int:
        return len(self.text)

    def get(self, start: int, end: int) -> str:
        return self.text[start:end]

    def finditer(self, pattern: re.Pattern[str], start: int, end: int) -> Iterator[tuple[int, int]]:
        return (m.span() for m in pattern.finditer(self.text, start, end))


def _pieces(text: _Text, start: int, end: int, level: int) -> Iterator[Span]:
    """Cut text[start:end] after each separator match of ``level``: contiguous spans, lazily."""
    s = start
    for _, m_end in text.finditer(_LEVELS[level], start, end):
        if m_end > s and m_end < end:
            yield (s, m_end, None)
            s = m_end
    yield (s, end, None)


class _Counter:
    """Token counts of spans of one text, in bounded tokenizer calls (``add_special_tokens=False``)."""

    def __init__(self, text: _Text, tokenizer: Any, max_tokens: int) -> None:
        self.text, self.tokenizer = text, tokenizer
        self.too_long = _CHARS_PER_TOKEN_LIMIT * max_tokens

    def _run(self, spans: list[tuple[int, int]]) -> list[int]:
        enc = self.tokenizer([self.text.get(s, e) for s, e in spans], add_special_tokens=False,
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
            chars += sp[1] - sp[0]  # what is read ahead of the consumer (a flush changes no result)
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


def split_passages(text: str | TextFile, source_path: str, tokenizer: Any, max_tokens: int = DEFAULT_MAX_TOKENS, *,
                   file_sha256: str | None = None) -> list[Passage]:
    """Split ``text`` into :class:`Passage` records of at most ``max_tokens`` tokens.

    Parameters
    ----------
    text : str or TextFile
        The whole source document (a ``TextFile`` reads it from its file a block at a time).
    source_path : str
        Recorded in every passage.
    tokenizer : transformers tokenizer
        Counts tokens (``add_special_tokens=False``).
    max_tokens : int, default 512
        Text tokens per passage (wrapping adds a few).
    file_sha256 : str, optional
        Recorded in every passage; default the sha256 of ``text`` in UTF-8 (of a ``TextFile``: its file's).

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


def iter_passages(text: str | TextFile, source_path: str, tokenizer: Any, max_tokens: int = DEFAULT_MAX_TOKENS, *,
                  file_sha256: str | None = None) -> Iterator[Passage]:
    """:func:`split_passages`, one passage at a time (memory: one tokenizer batch, and the text if a ``str``)."""
    if int(max_tokens) < 1:
        raise ConfigError(f"max_tokens must be >= 1, got {max_tokens!r}.")
    max_tokens = int(max_tokens)
    if isinstance(text, TextFile):
        src: _Text = text
        sha = file_sha256 or text.index.sha256
    else:
        src = _Str(text)
        sha = file_sha256 or hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    counter = _Counter(src, tokenizer, max_tokens)
    spans = _merge(src, _fit(src, [(0, len(src), None)], 0, max_tokens, counter), max_tokens, counter)
    pos_c, pos_b, index = 0, 0, 0  # character and UTF-8 byte offset of the end of the last span seen
    for s, e, _ in spans:
        if s > pos_c:  # spans are contiguous from 0; a gap would be counted all the same
            pos_b += _utf8_len(src.get(pos_c, s))
        seg = src.get(s, e)  # strip whitespace, drop empty, convert char offsets to UTF-8 byte offsets
        ls = len(seg) - len(seg.lstrip())
        rs = len(seg.rstrip())
        pos_c = e
        if rs <= ls:
            pos_b += _utf8_len(seg)
            continue
        bs = pos_b + _utf8_len(seg[:ls])
        be = bs + _utf8_len(seg[ls:rs])
        pos_b = be + _utf8_len(seg[rs:])
        yield Passage(text=seg[ls:rs], source_path=source_path, passage_index=index, byte_start=bs, byte_end=be,
                      file_sha256=sha)
        index += 1


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def _fit(text: _Text, spans: Iterable[Span], level: int, max_tokens: int, counter: _Counter) -> Iterator[Span]:
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


def _merge(text: _Text, spans: Iterable[Span], max_tokens: int, counter: _Counter) -> Iterator[Span]:
    """Merge consecutive contiguous spans greedily while the merged text stays within max_tokens.

    Token counts are not exactly additive across a boundary: each merged run is counted again, and a
    run over the limit is split in halves that are merged again.
    """
    batch: list[list[Span]] = []
    chars = 0
    for group in _groups(counter.with_counts(spans), max_tokens):
        batch.append(group)
        chars += group[-1][1] - group[0][0]  # read ahead of the consumer (a flush changes no result)
        if chars >= _BATCH_CHARS or len(batch) >= 4096:
            yield from _verify(text, batch, max_tokens, counter)
            batch, chars = [], 0
    yield from _verify(text, batch, max_tokens, counter)


def _verify(text: _Text, batch: list[list[Span]], max_tokens: int, counter: _Counter) -> Iterator[Span]:
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


def _hard_split(text: _Text, s: int, e: int, max_tokens: int, counter: _Counter) -> Iterator[Span]:
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
