"""Split a document's text into passages of at most N tokens, keeping source byte offsets.

A passage is the unit MSA routes to. We cut at the most natural boundary that keeps passages
under ``max_tokens`` text tokens (before model wrapping, which adds a few): paragraphs (blank
lines), then lines, then sentence ends, then whitespace between words, and only as a last resort
inside a run of non-space text (at token boundaries when the tokenizer reports offsets). Adjacent
pieces are merged greedily while the merged passage still fits.

Invariants (tested with hypothesis): ``source_bytes[p.byte_start:p.byte_end].decode() == p.text``;
passages are in order, never overlap, have no leading/trailing whitespace, and everything outside
them is whitespace; each passage has at most ``max_tokens`` tokens unless a single
tokenizer-indivisible piece is longer.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from typing import Any

from msa_memory.errors import ConfigError
from msa_memory.schemas.records import Passage

__all__ = ["split_passages", "DEFAULT_MAX_TOKENS"]

DEFAULT_MAX_TOKENS = 512
_LEVELS = [re.compile(r"\n[ \t\r\f\v]*\n\s*"), re.compile(r"\n"), re.compile(r"(?<=[.!?;:])\s+"), re.compile(r"\s+")]


def _pieces(text: str, start: int, end: int, level: int) -> list[tuple[int, int]]:
    """Cut text[start:end] after each separator match of ``level``: contiguous (s, e) spans."""
    out, s = [], start
    for m in _LEVELS[level].finditer(text, start, end):
        if m.end() > s and m.end() < end:
            out.append((s, m.end()))
            s = m.end()
    out.append((s, end))
    return out


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
        In order; empty for an all-whitespace text.

    Raises
    ------
    ConfigError
        ``max_tokens`` < 1.

    Examples
    --------
    >>> from msa_memory.encode.tiny import tiny_tokenizer
    >>> ps = split_passages("One.\\n\\nTwo two.", "a.txt", tiny_tokenizer(), max_tokens=6)
    >>> [(p.text, p.byte_start, p.byte_end) for p in ps]
    [('One.', 0, 4), ('Two two.', 6, 14)]
    """
    if int(max_tokens) < 1:
        raise ConfigError(f"max_tokens must be >= 1, got {max_tokens!r}.")
    max_tokens = int(max_tokens)
    sha = file_sha256 or hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()

    def count_many(spans: list[tuple[int, int]]) -> list[int]:
        if not spans:
            return []
        enc = tokenizer([text[s:e] for s, e in spans], add_special_tokens=False)["input_ids"]
        return [len(ids) for ids in enc]

    spans = _fit(text, [(0, len(text))], 0, max_tokens, count_many)
    passages_chars = _merge(text, spans, max_tokens, count_many)
    # strip whitespace, drop empty, convert char offsets to UTF-8 byte offsets incrementally
    stripped = []
    for s, e in passages_chars:
        seg = text[s:e]
        ls = len(seg) - len(seg.lstrip())
        rs = len(seg.rstrip())
        if rs > ls:
            stripped.append((s + ls, s + rs))
    out: list[Passage] = []
    pos_c, pos_b = 0, 0

    def to_byte(c: int) -> int:
        nonlocal pos_c, pos_b
        pos_b += len(text[pos_c:c].encode("utf-8", "surrogatepass"))
        pos_c = c
        return pos_b

    for i, (s, e) in enumerate(stripped):
        bs = to_byte(s)
        be = to_byte(e)
        out.append(Passage(text=text[s:e], source_path=source_path, passage_index=i, byte_start=bs,
                           byte_end=be, file_sha256=sha))
    return out


def _fit(text: str, spans: list[tuple[int, int]], level: int, max_tokens: int,
         count_many: Callable[[list[tuple[int, int]]], list[int]]) -> list[tuple[int, int]]:
    """Recursively cut spans that are over ``max_tokens`` at finer boundaries."""
    out: list[tuple[int, int]] = []
    counts = count_many(spans)
    for (s, e), n in zip(spans, counts):
        if n <= max_tokens or e - s <= 1:
            out.append((s, e))
        elif level < len(_LEVELS):
            sub = _pieces(text, s, e, level)
            if len(sub) == 1:
                out.extend(_fit(text, sub, level + 1, max_tokens, count_many))
            else:
                out.extend(_fit(text, _merge(text, sub, max_tokens, count_many), level + 1, max_tokens, count_many))
        else:
            out.extend(_hard_split(text, s, e, max_tokens, count_many))
    return out


def _merge(text: str, spans: list[tuple[int, int]], max_tokens: int,
           count_many: Callable[[list[tuple[int, int]]], list[int]]) -> list[tuple[int, int]]:
    """Merge consecutive contiguous spans greedily while the merged text stays within max_tokens."""
    if len(spans) <= 1:
        return list(spans)
    counts = count_many(spans)
    out: list[tuple[int, int]] = []
    cur_s, cur_e, cur_n = spans[0][0], spans[0][1], counts[0]
    for (s, e), n in zip(spans[1:], counts[1:]):
        if cur_n + n <= max_tokens:
            cur_e, cur_n = e, cur_n + n
        else:
            out.append((cur_s, cur_e))
            cur_s, cur_e, cur_n = s, e, n
    out.append((cur_s, cur_e))
    # token counts are not exactly additive across a boundary: verify and split back if over
    final: list[tuple[int, int]] = []
    for (s, e), n in zip(out, count_many(out)):
        if n <= max_tokens:
            final.append((s, e))
        else:
            parts = [sp for sp in spans if sp[0] >= s and sp[1] <= e]
            if len(parts) == 1:
                final.append((s, e))
            else:
                half = len(parts) // 2
                final.extend(_merge(text, parts[:half], max_tokens, count_many))
                final.extend(_merge(text, parts[half:], max_tokens, count_many))
    return final


def _hard_split(text: str, s: int, e: int, max_tokens: int,
                count_many: Callable[[list[tuple[int, int]]], list[int]]) -> list[tuple[int, int]]:
    """Split a run without separators into pieces of <= max_tokens tokens (bisection on chars)."""
    out: list[tuple[int, int]] = []
    while s < e:
        if count_many([(s, e)])[0] <= max_tokens:
            out.append((s, e))
            break
        lo, hi = s + 1, e  # largest cut c with count(s, c) <= max_tokens
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if count_many([(s, mid)])[0] <= max_tokens:
                lo = mid
            else:
                hi = mid - 1
        out.append((s, lo))
        s = lo
    return out
