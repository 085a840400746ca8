"""Source readers: one file → ``SourceText`` records (key, text, sha256), and the records of a scan; no torch.

What it does: chooses a reader by file extension (plain text,
Markdown, reStructuredText and source code as UTF-8 text; HTML to text in one linear pass
(``encode._html``; a page nested deeper than 4096 elements is skipped); PDF with pypdf; JSON
Lines with a text field, one record per line), applies include/exclude globs and, on request,
``.gitignore`` files (pathspec, git's own matching rules), and hashes what it read.

What it deliberately does not do: split, tokenize or encode (``encode/`` does), or decide what
changed since the last version (``jobs/plan.py`` does).

Memory: with ``ReaderOptions(hold_text=False)`` (what ``msa-encode`` uses) a plain-text file is read
once in blocks (``encode._textfile``): the scan keeps its hash and a small block index, not its
text, and :meth:`SourceText.open_text` reads the text back a block at a time, checked against the
block digests. HTML, PDF and JSON Lines files are parsed whole and their text is held; each such
file is capped by ``max_file_bytes``.

Key invariant: a bad file never stops a scan. Binary, undecodable, empty, unreadable and
oversized files, broken symlinks and symlink loops are listed in ``CorpusScan.skipped`` with a
reason, and every other file is still read.

Scanning folders (the walk, source keys) is :mod:`msa_memory.encode.scan`.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from msa_memory.encode._html import HtmlTooDeep, html_to_text
from msa_memory.encode._textfile import TextFile, TextIndex, index_text_file
from msa_memory.errors import ConfigError

__all__ = [
    "SourceText",
    "SkippedFile",
    "CorpusScan",
    "ReaderOptions",
    "read_file",
    "read_into",
    "decode_text",
    "TEXT_EXTENSIONS",
    "HTML_EXTENSIONS",
    "PDF_EXTENSIONS",
    "JSONL_EXTENSIONS",
]

#: Plain text, markup kept as written, and source code (read as UTF-8 text).
TEXT_EXTENSIONS = frozenset(
    """
    .txt .text .md .markdown .mdx .rst .rest .adoc .asciidoc .org .tex .csv .tsv .log
    .py .pyi .ipynb .c .h .cc .cpp .cxx .hpp .hh .cu .cuh .java .kt .kts .scala .go .rs .rb .php
    .js .jsx .mjs .cjs .ts .tsx .swift .m .mm .cs .fs .lua .pl .pm .r .jl .sh .bash .zsh .fish
    .ps1 .sql .css .scss .sass .less .vue .svelte .toml .yaml .yml .json .ini .cfg .conf .xml
    .proto .graphql .dockerfile .mk .cmake .gradle .el .clj .ex .exs .erl .hs .ml .mli .nim .zig
    .dart .v .sv .vhd .f90 .bat
    """.split()
)
HTML_EXTENSIONS = frozenset({".html", ".htm", ".xhtml"})
PDF_EXTENSIONS = frozenset({".pdf"})
JSONL_EXTENSIONS = frozenset({".jsonl", ".ndjson"})
#: Extensions that are binary by nature: skipped without reading them.
BINARY_EXTENSIONS = frozenset(
    """
    .png .jpg .jpeg .gif .bmp .tif .tiff .webp .ico .mp3 .mp4 .wav .flac .ogg .avi .mov .mkv
    .zip .gz .bz2 .xz .zst .tar .7z .rar .whl .egg .jar .so .dylib .dll .exe .o .a .pyc .class
    .bin .safetensors .pt .pth .ckpt .gguf .npy .npz .parquet .zarr .sqlite .db .woff .woff2 .ttf
    .otf .eot .psd .xls .xlsx .doc .docx .ppt .pptx .odt
    """.split()
)
#: Folders that are never part of a corpus (version-control metadata).
ALWAYS_SKIPPED_DIRS = frozenset({".git", ".hg", ".svn"})
_SNIFF_BYTES = 8192


@dataclass(frozen=True, slots=True)
class SourceText:
    """One readable source (a file, or one JSON Lines record) and its text."""

    key: str
    """Stable source key stored as ``source_path`` (see the module note)."""
    text: str | None
    """Extracted text (UTF-8 decoded; HTML/PDF converted to text); None for a plain-text file read
    with ``hold_text=False``: :meth:`open_text` reads it from the file."""
    sha256: str
    """sha256 of the file's bytes (of the record's text for JSON Lines records)."""
    n_bytes: int
    """Size of what was hashed, in bytes."""
    kind: str
    """Reader used: ``text``, ``html``, ``pdf`` or ``jsonl``."""
    path: str
    """Filesystem path the text came from."""
    index: TextIndex | None = None
    """Block index of a plain-text file read with ``hold_text=False`` (``text`` is None then)."""

    def open_text(self) -> str | TextFile:
        """The text: ``text`` when held, else a :class:`TextFile` reading the file a block at a time
        (raises JobError, naming the file, when a block no longer matches what the scan read)."""
        if self.text is not None:
            return self.text
        if self.index is None:
            raise ValueError(f"source {self.key!r} has neither text nor a text index")
        return TextFile(self.index, self.key)


@dataclass(frozen=True, slots=True)
class SkippedFile:
    """A file that was not read, and why (shown in the job report)."""

    path: str
    """Filesystem path."""
    reason: str
    """Why it was not read (``empty file``, ``binary (NUL bytes)``, ``too large (...)``...)."""
    key: str = ""
    """The source key it would have had; its documents from earlier versions are kept."""


@dataclass(frozen=True, slots=True)
class ReaderOptions:
    """What a scan reads; every default is stated."""

    include: tuple[str, ...] = ()
    """Glob patterns (gitignore syntax, matched against the path inside its folder); when given,
    only matching files are read. Default: every file."""
    exclude: tuple[str, ...] = ()
    """Glob patterns of files to leave out. Default: none."""
    respect_gitignore: bool = False
    """Honour ``.gitignore`` files found in the scanned folders. Default: off."""
    max_file_bytes: int = 32 * 1024 * 1024
    """Files larger than this are skipped (reason ``too large``). Default: 32 MiB."""
    jsonl_text_field: str = "text"
    """Field of a JSON Lines record that holds its text. Default: ``text``."""
    follow_links: bool = False
    """Follow symlinks whose target lies outside the scanned folders. Default: off (they are listed in
    ``CorpusScan.links_not_followed``). Links that stay inside are always followed (see the module note)."""
    hold_text: bool = True
    """Keep each file's text in ``SourceText.text``. False: a plain-text file (not HTML, PDF or JSON
    Lines) is hashed and indexed in one streaming read and its text left on disk (``text`` None,
    ``index`` set; same checks, reasons and sha256). Default: held."""

    def __post_init__(self) -> None:
        if int(self.max_file_bytes) <= 0:
            raise ConfigError(f"max_file_bytes must be positive, got {self.max_file_bytes!r}.")
        if not self.jsonl_text_field:
            raise ConfigError("jsonl_text_field must be a non-empty field name.")


@dataclass
class CorpusScan:
    """Result of :func:`scan_corpus`: what was read, what was skipped, which key spaces were scanned."""

    sources: list[SourceText] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)
    roots: list[str] = field(default_factory=list)
    """Key prefixes the scan covered: ``"docs/"`` for a folder, the exact key for a file."""
    n_excluded: int = 0
    """Files left out by include/exclude globs or ``.gitignore`` (not errors; not listed)."""
    stores_excluded: list[str] = field(default_factory=list)
    """Folders not read because they are msa stores: the job's own store, and any folder holding a
    store's marker files (``msa_store.json`` and ``versions/``)."""
    links_not_followed: list[str] = field(default_factory=list)
    """Symlinks not followed because their target lies outside the scanned folders (``follow_links``)."""

    def covers(self, key: str) -> bool:
        """Whether ``key`` lies in a scanned folder or is a scanned file (vanished-file detection)."""
        return any(key == r or key.startswith(r + "#") or (r.endswith("/") and key.startswith(r))
                   for r in self.roots)


def read_into(path: Path, key: str, options: ReaderOptions, scan: CorpusScan) -> None:
    """Read one file into ``scan``: its sources, or a skipped entry with the reason."""
    if path.is_symlink() and not path.exists():
        scan.skipped.append(SkippedFile(str(path), "broken symlink", key))
        return
    sources, reason = read_file(path, key, options)
    if reason is not None:
        scan.skipped.append(SkippedFile(str(path), reason, key))
    else:
        scan.sources.extend(sources)


# ----------------------------------------------------------------------------- readers


def read_file(path: str | os.PathLike[str], key: str, options: ReaderOptions | None = None) -> tuple[list[SourceText], str | None]:
    """Read one file: ``(sources, None)``, or ``([], reason)`` when it is skipped. Never raises ``OSError``."""
    options = options or ReaderOptions()
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        st = path.stat()
    except OSError as e:
        return [], f"unreadable ({e.strerror or e})"
    if not stat.S_ISREG(st.st_mode):
        return [], "not a regular file"
    if st.st_size == 0:
        return [], "empty file"
    if st.st_size > options.max_file_bytes:
        return [], f"too large ({st.st_size:,} bytes > max_file_bytes {options.max_file_bytes:,})"
    if suffix in BINARY_EXTENSIONS:
        return [], f"binary file type ({suffix})"
    if suffix in JSONL_EXTENSIONS:
        return _jsonl_file(path, key, options)
    if not options.hold_text and suffix not in PDF_EXTENSIONS and suffix not in HTML_EXTENSIONS:
        index, reason = index_text_file(path)
        if index is None:
            return [], reason
        return [SourceText(key=key, text=None, sha256=index.sha256, n_bytes=index.n_bytes, kind="text",
                           path=str(path), index=index)], None
    try:
        data = path.read_bytes()
    except OSError as e:
        return [], f"unreadable ({e.strerror or e})"
    sha = hashlib.sha256(data).hexdigest()
    if suffix in PDF_EXTENSIONS:
        text, reason = _pdf_text(data)
        kind = "pdf"
    else:
        text, reason = decode_text(data)
        kind = "text"
        if reason is None and suffix in HTML_EXTENSIONS:
            try:
                text, kind = html_to_text(text), "html"
            except HtmlTooDeep as e:
                return [], f"{e}: not read (close its elements, or convert the page to text)"
    if reason is not None:
        return [], reason
    assert text is not None
    if not text.strip():
        return [], "no text (empty after extraction)"
    return [SourceText(key=key, text=text, sha256=sha, n_bytes=len(data), kind=kind, path=str(path))], None


def decode_text(data: bytes) -> tuple[str | None, str | None]:
    if b"\x00" in data[:_SNIFF_BYTES]:
        return None, "binary (NUL bytes)"
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        return None, f"not UTF-8 text (undecodable byte at offset {e.start})"
    return text, None


def _pdf_text(data: bytes) -> tuple[str | None, str | None]:
    import io
    import logging

    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    logging.getLogger("pypdf").setLevel(logging.ERROR)
    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            return None, "encrypted PDF"
        pages = [page.extract_text() or "" for page in reader.pages]
    except (PyPdfError, ValueError, KeyError, TypeError, OSError, RecursionError) as e:
        return None, f"unparsable PDF ({type(e).__name__}: {e})"
    return "\n\n".join(p.strip() for p in pages if p.strip()), None


def _jsonl_file(path: Path, key: str, options: ReaderOptions) -> tuple[list[SourceText], str | None]:
    """Read a JSON Lines file one line at a time (lines end at ``\\n`` only, as JSON Lines says).

    Keys: ``<key>#id=<id>`` for a record with a string or integer ``id``, ``<key>#line=<n>`` for one
    without (or with ``"id": null``): the two namespaces never meet. Two records with the same id,
    or an id of another type, refuse the file with a reason naming the lines.
    """
    field_name = options.jsonl_text_field
    out: list[SourceText] = []
    first_line_of: dict[str, int] = {}
    offset = 0
    try:
        with open(path, "rb") as f:
            if b"\x00" in f.read(_SNIFF_BYTES):
                return [], "binary (NUL bytes)"
            f.seek(0)
            for lineno, raw in enumerate(f, start=1):
                start, offset = offset, offset + len(raw)
                if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw, start = raw[3:], start + 3
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    return [], f"not UTF-8 text (undecodable byte at offset {start + e.start})"
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    return [], f"invalid JSON Lines (line {lineno}: {e.msg})"
                if not isinstance(record, dict) or not isinstance(record.get(field_name), str):
                    return [], (f"JSON Lines record on line {lineno} has no string field {field_name!r} "
                                "(set jsonl_text_field / --jsonl-field)")
                body = record[field_name]
                if not body.strip():
                    continue
                rid = record.get("id")
                if rid is None:
                    suffix = f"line={lineno}"
                elif isinstance(rid, (str, int)) and not isinstance(rid, bool):
                    sid = str(rid)
                    if sid in first_line_of:
                        return [], (f"duplicate id {sid!r} on lines {first_line_of[sid]} and {lineno} (ids must be "
                                    "unique within a file: change or remove one)")
                    first_line_of[sid] = lineno
                    suffix = f"id={sid}"
                else:
                    return [], (f"JSON Lines record on line {lineno} has an id of type {type(rid).__name__} (use a "
                                "string or an integer, or leave the id out to key the record by its line number)")
                raw_body = body.encode("utf-8", "surrogatepass")
                out.append(SourceText(key=f"{key}#{suffix}", text=body, sha256=hashlib.sha256(raw_body).hexdigest(),
                                      n_bytes=len(raw_body), kind="jsonl", path=str(path)))
    except OSError as e:
        return [], f"unreadable ({e.strerror or e})"
    if not out:
        return [], "no text (no non-empty JSON Lines records)"
    return out, None
