"""Scanning the paths a job is given: folders walked, files read (:mod:`msa_memory.encode.sources`), keys
given, into one :class:`~msa_memory.encode.sources.CorpusScan`.

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

import os
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from msa_memory.encode.sources import ALWAYS_SKIPPED_DIRS, CorpusScan, ReaderOptions, SkippedFile, SourceText, read_into
from msa_memory.errors import ConfigError

__all__ = ["scan_corpus", "source_root_key", "STORE_MARKERS"]


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
            read_into(f.path, f.key, self.options, self.scan)

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
