"""Corpus readers: folders and files → ``SourceText`` records (key, text, sha256), no torch.

What it does: walks the paths a job is given, chooses a reader by file extension (plain text,
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

What is walked: the real folders under each folder argument first, then the folder symlinks met on
the way. A folder holding an msa store's marker files (``msa_store.json`` and ``versions/``), or the
job's own store, is never read (``CorpusScan.stores_excluded``). A symlink whose target lies outside
every scanned root is not followed unless ``ReaderOptions.follow_links`` (``links_not_followed``).
Links that stay inside are aliases: a file reached directly and through links is read once, under
its own path; a file reached only through links, under the first of those paths by key; a link to
a folder read already is not read again, and only a link to its own ancestor is a "symlink loop".
Globs and ``.gitignore`` match the path a file is found under. Paths given as arguments are read
whatever they link to.

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
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from msa_memory.encode._html import HtmlTooDeep, html_to_text
from msa_memory.encode._textfile import TextFile, TextIndex, index_text_file
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


def source_root_key(path: str | os.PathLike[str]) -> str:
    """Key prefix of a path argument: the folder's own name plus ``/``, or a file's name."""
    p = Path(os.path.abspath(path))
    name = p.name or p.anchor.strip("/\\") or "root"
    return f"{name}/" if p.is_dir() else name


def scan_corpus(
    paths: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
    options: ReaderOptions | None = None,
    *,
    store: str | os.PathLike[str] | None = None,
) -> CorpusScan:
    """Read every supported file under ``paths``.

    Parameters
    ----------
    paths : folder or file paths (a single path is accepted too).
    options : :class:`ReaderOptions`; default ``ReaderOptions()``.
    store : the store a job writes to; never read, even where it lies inside a scanned folder and has
        no marker files yet. Default: none (folders with a store's marker files are left out anyway).

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
    walk = _Walk(options, scan, [os.path.realpath(p) for p in paths], store)
    for raw, root in zip(paths, scan.roots):
        p = Path(raw)
        if walk.store_real is not None and _inside(os.path.realpath(p), walk.store_real):
            walk.scan.stores_excluded.append(str(p))  # a path inside the job's own store
        elif p.is_dir():
            walk.folder(p, root)
        else:
            walk.file(p, root)
    walk.follow_links()
    walk.read()
    _drop_duplicate_keys(scan)
    scan.skipped.sort(key=lambda s: s.path)
    scan.stores_excluded.sort()
    scan.links_not_followed.sort()
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

#: A folder holding both is an msa store (its identity record and its version manifests): never read.
STORE_MARKERS = ("msa_store.json", "versions")

_Ident = tuple[int, int]


def _compile(patterns: Iterable[str]):  # -> pathspec.PathSpec | None
    patterns = [p for p in patterns if p and not p.startswith("#")]
    if not patterns:
        return None
    import pathspec

    return pathspec.GitIgnoreSpec.from_lines(patterns)


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _ident(path: str | os.PathLike[str]) -> _Ident | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


@dataclass
class _Root:
    """One folder argument: its key prefix, globs and the ``.gitignore`` specs met so far."""

    top: Path
    key: str
    real: str
    include: Any
    exclude: Any
    ignores: list[tuple[str, Any]] = field(default_factory=list)  # (folder inside top as "a/b/" or "", spec)
    visited: set[_Ident] = field(default_factory=set)

    def ignored(self, rel: str, is_dir: bool) -> bool:
        for base, spec in self.ignores:
            if base and not rel.startswith(base):
                continue
            if spec.match_file(rel[len(base):] + ("/" if is_dir else "")):
                return True
        return False

    def prunes(self, name: str, rel: str, gitignore: bool) -> bool:
        """Whether the folder at ``rel`` is left out (VCS metadata, ``.gitignore``, an exclude glob)."""
        return (name in ALWAYS_SKIPPED_DIRS or (gitignore and self.ignored(rel, True))
                or (self.exclude is not None and self.exclude.match_file(rel + "/")))

    def leaves_out(self, rel: str, gitignore: bool) -> bool:
        """Whether the file at ``rel`` is left out by ``.gitignore`` or the include/exclude globs."""
        if gitignore and (rel.rsplit("/", 1)[-1] == ".gitignore" or self.ignored(rel, False)):
            return True
        return ((self.include is not None and not self.include.match_file(rel))
                or (self.exclude is not None and self.exclude.match_file(rel)))


@dataclass(frozen=True)
class _Found:
    key: str
    path: Path
    ident: _Ident | None
    via_link: bool


class _Walk:
    """One scan's walk. Real folders first, then the folder links met on the way, so that a folder is
    found under its own path before any link to it; links whose target lies outside every scanned
    root wait for ``follow_links``; files are deduplicated by inode before any is read."""

    def __init__(self, options: ReaderOptions, scan: CorpusScan, real_roots: list[str], store: str | None) -> None:
        self.options, self.scan, self.real_roots = options, scan, real_roots
        self.store_real = None if store is None else os.path.realpath(store)
        self.store_ident = None if store is None else _ident(store)
        self.visited: set[_Ident] = set()  # every folder read, through any root or link
        self.links: deque[tuple[_Root, Path, str]] = deque()  # folder links, followed after the real folders
        self.found: list[_Found] = []
        self.store_reals: set[str] = set()

    # -- the parts a scan is made of

    def folder(self, top: Path, key: str) -> None:
        root = _Root(top, key, os.path.realpath(top), _compile(self.options.include), _compile(self.options.exclude))
        self._descend(root, top, "", via_link=False)

    def file(self, path: Path, key: str) -> None:
        self.found.append(_Found(key, path, _ident(path), via_link=False))

    def follow_links(self) -> None:
        while self.links:
            root, path, rel = self.links.popleft()
            ident = _ident(path)
            if ident is None or ident in self.visited:  # read already: an alias, or a link to its own ancestor
                if _inside(os.path.realpath(path.parent), os.path.realpath(path)):
                    self.scan.skipped.append(SkippedFile(str(path), f"symlink loop (links to its own ancestor "
                                                                    f"folder {os.path.realpath(path)})"))
                continue
            self._descend(root, path, rel + "/", via_link=True)

    def read(self) -> None:
        """Read every file found once: a file met directly and through links is read under its own path(s)."""
        by_ident: dict[_Ident, list[_Found]] = {}
        for f in self.found:
            if f.ident is not None:
                by_ident.setdefault(f.ident, []).append(f)
        for f in sorted(self.found, key=lambda f: f.key):
            if f.ident is not None and f.via_link:
                same = by_ident[f.ident]
                if any(not g.via_link for g in same) or min(g.key for g in same) != f.key:
                    continue  # read under its own path, or under the first link (by key) that reaches it
            _read_into(f.path, f.key, self.options, self.scan)

    # -- walking

    def _descend(self, root: _Root, top: Path, rel_top: str, *, via_link: bool) -> None:
        stack = [(top, rel_top)]
        while stack:
            folder, rel_folder = stack.pop()
            for sub in reversed(self._folder(root, folder, rel_folder, via_link)):
                stack.append(sub)

    def _folder(self, root: _Root, folder: Path, rel_folder: str, via_link: bool) -> list[tuple[Path, str]]:
        """Read one folder's entries; returns its subfolders (in name order) to walk next."""
        scan, opts = self.scan, self.options
        try:
            st = os.stat(folder)
        except OSError as e:
            scan.skipped.append(SkippedFile(str(folder), f"unreadable folder ({e.strerror or e})", root.key + rel_folder))
            return []
        ident = (st.st_dev, st.st_ino)
        if ident in root.visited:  # a bind mount of an ancestor (links are never walked here)
            scan.skipped.append(SkippedFile(str(folder), "folder already visited (a mount of its own ancestor)"))
            return []
        root.visited.add(ident)
        self.visited.add(ident)
        if ident == self.store_ident:
            return self._store(folder)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            scan.skipped.append(SkippedFile(str(folder), f"unreadable folder ({e.strerror or e})", root.key + rel_folder))
            return []
        names = {e.name: e for e in entries}
        if all(m in names for m in STORE_MARKERS) and _is_file(names[STORE_MARKERS[0]]) and _is_dir(names[STORE_MARKERS[1]]):
            return self._store(folder)
        if opts.respect_gitignore and ".gitignore" in names and _is_file(names[".gitignore"]):
            try:
                spec = _compile(Path(names[".gitignore"].path).read_text(encoding="utf-8", errors="replace").splitlines())
            except OSError:
                spec = None
            if spec is not None:
                root.ignores.append((rel_folder, spec))
        subfolders = []
        for entry in entries:
            rel, path = rel_folder + entry.name, Path(entry.path)
            if entry.is_symlink():
                self._link(root, path, rel)
            elif _is_dir(entry, follow=False):
                if not root.prunes(entry.name, rel, opts.respect_gitignore):
                    subfolders.append((path, rel + "/"))
            elif root.leaves_out(rel, opts.respect_gitignore):
                scan.n_excluded += 1
            else:
                self.found.append(_Found(root.key + rel, path, _ident(path), via_link))
        return subfolders

    def _store(self, folder: Path) -> list[tuple[Path, str]]:
        self.scan.stores_excluded.append(str(folder))
        self.store_reals.add(os.path.realpath(folder))
        return []

    def _link(self, root: _Root, path: Path, rel: str) -> None:
        """A symlink inside a scanned folder: skipped, left out, deferred (a folder) or found (a file)."""
        scan, opts = self.scan, self.options
        if not path.exists():
            scan.skipped.append(SkippedFile(str(path), "broken symlink", root.key + rel))
            return
        is_dir = path.is_dir()
        if is_dir and root.prunes(path.name, rel, opts.respect_gitignore):
            return
        if not is_dir and root.leaves_out(rel, opts.respect_gitignore):
            scan.n_excluded += 1
            return
        target = os.path.realpath(path)
        home = next((r for r in self.real_roots if _inside(target, r)), None)
        if home is None and not opts.follow_links:
            scan.links_not_followed.append(str(path))
            return
        if self._in_store(target, home) or (home is not None and any(
                part in ALWAYS_SKIPPED_DIRS for part in Path(os.path.relpath(target, home)).parts)):
            return  # an alias of what the scan leaves out on purpose
        if is_dir:
            self.links.append((root, path, rel))
        else:
            self.found.append(_Found(root.key + rel, path, _ident(path), via_link=True))

    def _in_store(self, target: str, home: str | None) -> bool:
        """Whether ``target`` lies in the job's store or in a folder with a store's markers (up to its root)."""
        if (self.store_real is not None and _inside(target, self.store_real)) or any(
                _inside(target, s) for s in self.store_reals):
            return True
        p = Path(target)
        for folder in (p, *p.parents):
            if all(os.path.exists(folder / m) for m in STORE_MARKERS) and (folder / STORE_MARKERS[1]).is_dir():
                return True
            if home is not None and str(folder) == home:
                break
        return False


def _is_dir(entry: os.DirEntry, follow: bool = True) -> bool:
    try:
        return entry.is_dir(follow_symlinks=follow)
    except OSError:
        return False


def _is_file(entry: os.DirEntry) -> bool:
    try:
        return entry.is_file(follow_symlinks=False)
    except OSError:
        return False


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
        text, reason = _decode(data)
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


def _decode(data: bytes) -> tuple[str | None, str | None]:
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
