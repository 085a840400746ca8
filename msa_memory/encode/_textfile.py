"""Plain-text files read in blocks: one streaming pass to hash, check and index, then reads by range.

What it does: :func:`index_text_file` reads a UTF-8 file once, in blocks of ``block_bytes`` (cut
at character boundaries), and keeps only a :class:`TextIndex`: the file's sha256, its size, and per
block the byte and character offsets and a blake2b digest of the block's bytes. :class:`TextFile`
then gives the text by character range (a few decoded blocks cached), and :meth:`TextIndex.read`
gives bytes by range (what a worker needs to rebuild its passages). Every block read again is
checked against its digest, so text read after the scan is the text the scan hashed, or the read
fails with a :class:`~msa_memory.errors.JobError` naming the file.

Memory: the index (about 150 bytes per 256 KiB block: 800 blocks, 120 KB, for a 200 MB file) plus the
cached blocks (``TextFile.cache_blocks`` of them), whatever the file size; the one exception is a run
of whitespace, which a separator search reads whole (the run is one separator).

Checks and offsets are those of reading the whole file with ``data.decode("utf-8-sig")``: NUL bytes
in the first 8192 bytes mean binary, a leading BOM is not part of the text, the offset of an
undecodable byte is counted from the end of the BOM, and a text of whitespace only has "no text".
"""

from __future__ import annotations

import bisect
import hashlib
import os
import re
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

from msa_memory.errors import JobError

__all__ = ["TextIndex", "TextFile", "index_text_file", "BLOCK_BYTES"]

#: bytes per block (the unit of reads, digests and the cache)
BLOCK_BYTES = 1 << 18
_SNIFF_BYTES = 8192
_BOM = b"\xef\xbb\xbf"
_NONSPACE = re.compile(r"\S")


@dataclass(frozen=True, slots=True)
class TextIndex:
    """What a streaming read of a UTF-8 file keeps: its hash, size and blocks (small, picklable).

    Offsets are in the text's coordinates (the file's bytes after a leading BOM, if any). Block ``k``
    holds text bytes ``byte_bounds[k]:byte_bounds[k + 1]`` and characters
    ``char_bounds[k]:char_bounds[k + 1]``; ``digests[k]`` is the blake2b-128 of those bytes. A
    :meth:`part` keeps a run of blocks only (what a shard task carries).
    """

    path: str
    sha256: str
    """sha256 of the whole file's bytes (BOM included), as ``SourceText.sha256``."""
    n_bytes: int
    """Size of the file in bytes (BOM included)."""
    bom: int
    """3 when the file starts with a UTF-8 byte order mark (not part of the text), else 0."""
    byte_bounds: tuple[int, ...]
    char_bounds: tuple[int, ...]
    digests: tuple[bytes, ...]

    @property
    def n_chars(self) -> int:
        """Characters of the text (of the blocks kept, for a part)."""
        return self.char_bounds[-1] - self.char_bounds[0]

    def part(self, byte_start: int, byte_end: int) -> TextIndex:
        """The index of the blocks holding text bytes ``byte_start:byte_end`` only."""
        k0, k1 = self._blocks(byte_start, byte_end)
        return TextIndex(self.path, self.sha256, self.n_bytes, self.bom, self.byte_bounds[k0:k1 + 1],
                         self.char_bounds[k0:k1 + 1], self.digests[k0:k1])

    def read(self, byte_start: int, byte_end: int, *, key: str = "") -> bytes:
        """Text bytes ``byte_start:byte_end``, read from the file and checked against the block digests.

        Raises JobError when the file is gone, has another size, or a block's bytes differ.
        """
        if byte_end <= byte_start:
            return b""
        k0, k1 = self._blocks(byte_start, byte_end)
        with self._open(key) as f:
            data = b"".join(self._read_block(f, k, key) for k in range(k0, k1))
        off = byte_start - self.byte_bounds[k0]
        return data[off:off + byte_end - byte_start]

    # -- helpers

    def _blocks(self, byte_start: int, byte_end: int) -> tuple[int, int]:
        """Block range ``[k0, k1)`` covering text bytes ``byte_start:byte_end``."""
        b = self.byte_bounds
        if byte_start < b[0] or byte_end > b[-1] or byte_start > byte_end:
            raise ValueError(f"text bytes {byte_start}:{byte_end} outside {b[0]}:{b[-1]} of {self.path}")
        k0 = max(0, bisect.bisect_right(b, byte_start) - 1)
        k1 = max(k0 + 1, bisect.bisect_left(b, byte_end))
        return k0, min(k1, len(b) - 1)

    def _open(self, key: str):  # -> BinaryIO
        try:
            f = open(self.path, "rb")
        except OSError as e:
            raise self._changed(key, f"it cannot be read any more ({e.strerror or e})") from None
        size = os.fstat(f.fileno()).st_size
        if size != self.n_bytes:
            f.close()
            raise self._changed(key, f"its size is {size:,} bytes, not {self.n_bytes:,}")
        return f

    def _read_block(self, f, k: int, key: str) -> bytes:  # noqa: ANN001
        start, end = self.byte_bounds[k], self.byte_bounds[k + 1]
        f.seek(self.bom + start)
        data = f.read(end - start)
        if len(data) != end - start or hashlib.blake2b(data, digest_size=16).digest() != self.digests[k]:
            raise self._changed(key, f"its bytes {self.bom + start:,}-{self.bom + end:,} differ")
        return data

    def _changed(self, key: str, what: str) -> JobError:
        name = f"{self.path!r} (source {key!r})" if key and key != self.path else repr(self.path)
        return JobError(f"File {name} changed after this job read it: {what}; its passages no longer match the "
                        f"plan (sha256 {self.sha256[:16]}...), so nothing was committed.",
                        hint="Rerun the same command: it plans the file again from its current content.")


def index_text_file(path: str | os.PathLike[str], block_bytes: int = BLOCK_BYTES) -> tuple[TextIndex | None, str | None]:
    """Read ``path`` once in blocks: ``(index, None)``, or ``(None, reason)`` for a file to skip.

    Reasons are ``read_file``'s for a text file: ``binary (NUL bytes)``, ``not UTF-8 text
    (undecodable byte at offset N)``, ``no text (empty after extraction)``, ``unreadable (...)``.
    """
    if block_bytes < 4:
        raise ValueError(f"block_bytes must be >= 4 (a UTF-8 character), got {block_bytes}")
    sha = hashlib.sha256()
    byte_bounds, char_bounds, digests = [0], [0], []
    nonblank = False
    try:
        with open(path, "rb") as f:
            if b"\x00" in f.read(_SNIFF_BYTES):
                return None, "binary (NUL bytes)"
            f.seek(0)
            buf = f.read(max(block_bytes, 3))
            sha.update(buf)
            bom = 3 if buf.startswith(_BOM) else 0
            buf = buf[bom:]
            while buf:
                nxt = f.read(block_bytes)
                sha.update(nxt)
                k = 0  # a block ends at a character boundary: take the next block's leading continuation bytes
                while k < 3 and k < len(nxt) and 0x80 <= nxt[k] <= 0xBF:
                    k += 1
                piece, buf = buf + nxt[:k], nxt[k:]
                try:
                    text = piece.decode("utf-8")
                except UnicodeDecodeError as e:
                    return None, f"not UTF-8 text (undecodable byte at offset {byte_bounds[-1] + e.start})"
                nonblank = nonblank or _NONSPACE.search(text) is not None
                digests.append(hashlib.blake2b(piece, digest_size=16).digest())
                byte_bounds.append(byte_bounds[-1] + len(piece))
                char_bounds.append(char_bounds[-1] + len(text))
            n_bytes = f.tell()
    except OSError as e:
        return None, f"unreadable ({e.strerror or e})"
    if not nonblank:
        return None, "no text (empty after extraction)"
    return TextIndex(str(path), sha.hexdigest(), n_bytes, bom, tuple(byte_bounds), tuple(char_bounds),
                     tuple(digests)), None


class TextFile:
    """The text of an indexed file by character range, read a block at a time (``iter_passages``'s input).

    ``len(tf)`` is its length in characters; ``tf.get(s, e)`` is ``text[s:e]``; ``tf.finditer(p, s, e)``
    yields the spans of ``p.finditer(text, s, e)`` for a pattern whose matches are runs of whitespace
    (the splitter's separators), reading a window that grows only while it ends inside a possible match.
    """

    #: decoded blocks kept (least recently used dropped first)
    cache_blocks = 16
    #: characters a separator search reads at a time (doubled while a window is all whitespace)
    window_chars = 1 << 16

    def __init__(self, index: TextIndex, key: str = "") -> None:
        self.index, self.key = index, key
        self._cache: OrderedDict[int, str] = OrderedDict()

    def __len__(self) -> int:
        return self.index.char_bounds[-1]

    def _block(self, k: int) -> str:
        hit = self._cache.get(k)
        if hit is not None:
            self._cache.move_to_end(k)
            return hit
        with self.index._open(self.key) as f:
            text = self.index._read_block(f, k, self.key).decode("utf-8")
        self._cache[k] = text
        if len(self._cache) > self.cache_blocks:
            self._cache.popitem(last=False)
        return text

    def get(self, start: int, end: int) -> str:
        """``text[start:end]`` (0 <= start <= end <= len)."""
        bounds = self.index.char_bounds
        if end <= start:
            return ""
        k = bisect.bisect_right(bounds, start) - 1
        parts = []
        while start < end:
            c0, c1 = bounds[k], bounds[k + 1]
            stop = min(end, c1)
            parts.append(self._block(k)[start - c0:stop - c0])
            start, k = stop, k + 1
        return "".join(parts)

    def finditer(self, pattern: re.Pattern[str], start: int, end: int) -> Iterator[tuple[int, int]]:
        """Spans of ``pattern.finditer(text, start, end)``; every match of ``pattern`` must be whitespace only.

        A match that ends inside the window is final (a non-space character follows it); one that
        reaches the window's end may go on, so the next window starts where the window's trailing
        whitespace does (no match can start between the last final match and there). The character
        before a window is read too, for a lookbehind.
        """
        pos, width = start, self.window_chars
        while pos < end:
            hi = min(end, pos + width)
            lead = 1 if pos > 0 else 0
            buf = self.get(pos - lead, hi)
            base, last = pos - lead, lead
            for m in pattern.finditer(buf, lead, len(buf)):
                if m.end() < len(buf) or hi == end:
                    yield base + m.start(), base + m.end()
                    last = m.end()
                else:
                    break
            if hi == end:
                return
            nxt = max(last, len(buf.rstrip()), lead)
            if nxt == lead:   # all whitespace from pos: widen the window
                width *= 2
            else:
                pos, width = base + nxt, self.window_chars
