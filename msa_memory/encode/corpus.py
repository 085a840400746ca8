"""Corpus readers: folders and files → ``SourceText`` records (key, text, sha256), no torch.

What it does: walks the paths a job is given, chooses a reader by file extension (plain text,
Markdown, reStructuredText and source code as UTF-8 text; HTML to text with BeautifulSoup; PDF
with pypdf; JSON Lines with a text field, one record per line), applies include/exclude globs and,
on request, ``.gitignore`` files (pathspec, git's own matching rules), and hashes what it read.

What it deliberately does not do: split, tokenize or encode (``encode/`` does), or decide what
changed since the last version (``jobs/plan.py`` does).

Key invariant: a bad file never stops a scan. Binary, undecodable, empty, unreadable and
oversized files, broken symlinks and symlink loops are listed in ``CorpusScan.skipped`` with a
reason, and every other file is still read.

Source keys: a file found under a folder argument ``a/b/docs`` is keyed ``docs/<path inside>``
(the folder's own name, then the relative path, ``/``-separated); a file argument is keyed by its
name. Keys therefore do not depend on the working directory, and a later run over the same
folders finds the same keys. A JSON Lines record is keyed ``<file key>#id=<id>`` when it has a
string or integer ``id`` and ``<file key>#line=<n>`` (its 1-based line) when it has none, so ids
and line numbers never share a key; duplicate ids in one file refuse the file (skipped, naming both
lines). A record is hashed on its own text, so one changed record replaces one document. Keys are
unique in a scan: a file whose name equals another source's key is skipped with a reason. Two
arguments with the same key space (two folders called ``docs``) are refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from msa_memory.errors import ConfigError

__all__ = [
    "SourceText",
    "SkippedFile",
    "CorpusScan",
    "ReaderOptions",
    "scan_corpus",
    "read_file",
    "source_root_key",
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
    text: str
    """Extracted text (UTF-8 decoded; HTML/PDF converted to text)."""
    sha256: str
    """sha256 of the file's bytes (of the record's text for JSON Lines records)."""
    n_bytes: int
    """Size of what was hashed, in bytes."""
    kind: str
    """Reader used: ``text``, ``html``, ``pdf`` or ``jsonl``."""
    path: str
    """Filesystem path the text came from."""


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

    def covers(self, key: str) -> bool:
        """Whether ``key`` lies in a scanned folder or is a scanned file (vanished-file detection)."""
        return any(key == r or key.startswith(r + "#") or (r.endswith("/") and key.startswith(r))
                   for r in self.roots)


def source_root_key(path: str | os.PathLike[str]) -> str:
    """Key prefix of a path argument: the folder's own name plus ``/``, or a file's name."""
    p = Path(os.path.abspath(path))
    name = p.name or p.anchor.strip("/\\") or "root"
    return f"{name}/" if p.is_dir() else name


def scan_corpus(
    paths: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
    options: ReaderOptions | None = None,
) -> CorpusScan:
    """Read every supported file under ``paths``.

    Parameters
    ----------
    paths : folder or file paths (a single path is accepted too).
    options : :class:`ReaderOptions`; default ``ReaderOptions()``.

    Returns
    -------
    CorpusScan with sources sorted by key.

    Raises
    ------
    ConfigError
        A path does not exist, or two paths share a key prefix.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp()) / "notes"; d.mkdir()
    >>> _ = (d / "a.md").write_text("# Title\\nHello.")
    >>> [s.key for s in scan_corpus([d]).sources]
    ['notes/a.md']
    """
    options = options or ReaderOptions()
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise ConfigError("No corpus path given.", hint="Pass at least one folder or file, e.g. `msa-encode docs/ --store mem.msa`.")
    scan = CorpusScan()
    seen_roots: dict[str, str] = {}
    for raw in paths:
        p = Path(raw)
        if not p.exists() and not p.is_symlink():
            raise ConfigError(f"Corpus path {str(raw)!r} does not exist.", hint="Check the path, or create the folder first.")
        root = source_root_key(p)
        if root in seen_roots:
            raise ConfigError(
                f"Corpus paths {seen_roots[root]!r} and {str(raw)!r} would both be stored under {root!r}.",
                hint="Pass their common parent folder instead, or rename one of them.",
            )
        seen_roots[root] = str(raw)
        scan.roots.append(root)
        if p.is_dir():
            _scan_dir(p, root, options, scan)
        else:
            _read_into(p, root, options, scan)
    _drop_duplicate_keys(scan)
    scan.skipped.sort(key=lambda s: s.path)
    return scan


def _drop_duplicate_keys(scan: CorpusScan) -> None:
    """Sort the sources by key; a key met twice (a file named like a record key) keeps its first source."""
    scan.sources.sort(key=lambda s: (s.key, s.path))
    kept: list[SourceText] = []
    for src in scan.sources:
        if kept and kept[-1].key == src.key:
            if kept[-1].path != src.path:  # one file is read once; another file with the same key is refused
                scan.skipped.append(SkippedFile(src.path, f"same source key {src.key!r} as {kept[-1].path} (rename "
                                                          "one of the two files)", src.key))
            continue
        kept.append(src)
    scan.sources[:] = kept


# ----------------------------------------------------------------------------- walking


def _compile(patterns: Iterable[str]):  # -> pathspec.PathSpec | None
    patterns = [p for p in patterns if p and not p.startswith("#")]
    if not patterns:
        return None
    import pathspec

    return pathspec.GitIgnoreSpec.from_lines(patterns)


def _scan_dir(top: Path, root_key: str, options: ReaderOptions, scan: CorpusScan) -> None:
    include = _compile(options.include)
    exclude = _compile(options.exclude)
    visited: set[tuple[int, int]] = set()
    # gitignore specs: (folder relative to top as "a/b/" or "", spec)
    ignores: list[tuple[str, object]] = []

    def ignored(rel: str, is_dir: bool) -> bool:
        for base, spec in ignores:
            if base and not rel.startswith(base):
                continue
            sub = rel[len(base):] + ("/" if is_dir else "")
            if spec.match_file(sub):  # type: ignore[attr-defined]
                return True
        return False

    def walk(folder: Path, rel_folder: str) -> Iterator[tuple[Path, str]]:
        try:
            st = folder.stat()
        except OSError as e:
            scan.skipped.append(SkippedFile(str(folder), f"unreadable folder ({e.strerror or e})", root_key + rel_folder))
            return
        ident = (st.st_dev, st.st_ino)
        if ident in visited:
            scan.skipped.append(SkippedFile(str(folder), "symlink loop (folder already visited)"))
            return
        visited.add(ident)
        if options.respect_gitignore:
            gi = folder / ".gitignore"
            if gi.is_file():
                try:
                    spec = _compile(gi.read_text(encoding="utf-8", errors="replace").splitlines())
                except OSError:
                    spec = None
                if spec is not None:
                    ignores.append((rel_folder, spec))
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            scan.skipped.append(SkippedFile(str(folder), f"unreadable folder ({e.strerror or e})", root_key + rel_folder))
            return
        for entry in entries:
            rel = rel_folder + entry.name
            path = Path(entry.path)
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
            except OSError:
                is_dir = False
            if entry.is_symlink() and not path.exists():
                scan.skipped.append(SkippedFile(str(path), "broken symlink", root_key + rel))
                continue
            if is_dir:
                if entry.name in ALWAYS_SKIPPED_DIRS or ignored(rel, True):
                    continue
                if exclude is not None and exclude.match_file(rel + "/"):
                    continue
                yield from walk(path, rel + "/")
            else:
                yield path, rel

    for path, rel in walk(top, ""):
        if options.respect_gitignore and (path.name == ".gitignore" or ignored(rel, False)):
            scan.n_excluded += 1
            continue
        if (include is not None and not include.match_file(rel)) or (exclude is not None and exclude.match_file(rel)):
            scan.n_excluded += 1
            continue
        _read_into(path, root_key + rel, options, scan)


def _read_into(path: Path, key: str, options: ReaderOptions, scan: CorpusScan) -> None:
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
    try:
        data = path.read_bytes()
    except OSError as e:
        return [], f"unreadable ({e.strerror or e})"
    sha = hashlib.sha256(data).hexdigest()
    if suffix in PDF_EXTENSIONS:
        text, reason = _pdf_text(data)
        kind = "pdf"
    else:
        text, reason = _decode(data)
        kind = "text"
        if reason is None and suffix in HTML_EXTENSIONS:
            text, kind = _html_text(text), "html"
    if reason is not None:
        return [], reason
    assert text is not None
    if not text.strip():
        return [], "no text (empty after extraction)"
    return [SourceText(key=key, text=text, sha256=sha, n_bytes=len(data), kind=kind, path=str(path))], None


def _decode(data: bytes) -> tuple[str | None, str | None]:
    if b"\x00" in data[:_SNIFF_BYTES]:
        return None, "binary (NUL bytes)"
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        return None, f"not UTF-8 text (undecodable byte at offset {e.start})"
    return text, None


def _html_text(html: str) -> str:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(html, "html.parser")
    for tag in soup(["script", "style", "noscript", "template", "head"]):
        tag.decompose()
    # block elements end a line; inline ones (<b>, <a>) stay inside their sentence
    for tag in soup.find_all(_HTML_BLOCKS):
        tag.append("\n")
    for br in soup.find_all("br"):
        br.replace_with("\n")
    lines = (" ".join(line.split()) for line in soup.get_text().splitlines())
    return "\n".join(line for line in lines if line)


_HTML_BLOCKS = ["p", "div", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "blockquote",
                "section", "article", "header", "footer", "table", "ul", "ol", "dt", "dd", "title"]


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
