"""Real text that ships with this machine, for router training and the quality benchmark.

Five sources, all offline and reproducible from a given Python / Debian install:

- ``stdlib_docstrings()``: module, class and function docstrings of the Python standard library
  (~2,300 docstrings of >200 characters, ~1.2M characters on CPython 3.11). Used for *training*.
- ``package_docstrings()``: the same for the third-party packages installed beside this one
  (``site-packages``: torch, transformers, numpy, dask, zarr, ...), exact duplicates dropped and
  at most ``max_chars_per_package`` characters per top-level package. Used for *training*.
- ``man_pages()``: the English manual pages under ``/usr/share/man`` (sections 1–8), rendered to
  plain text with the system's ``groff``; at most ``max_per_family`` pages of one command family
  (``gcloud-*`` alone is 16k pages on some images). Used for *training*.
- ``pydoc_topics()``: the language-reference topics of ``pydoc_data.topics`` (79 topics, ~465K
  characters). Used for *evaluation* only.
- ``debian_docs()``: README / FAQ / NEWS / *.md files under ``/usr/share/doc`` (changelogs and
  copyright files excluded, ``.gz`` decompressed). Used for *evaluation* haystack filler only.

Training and evaluation never share a source, so held-out figures are not inflated by passages
seen in training. What this module does not do: tokenize (passage sizes are in characters,
~4 characters per token for English) or touch any model.
"""

from __future__ import annotations

import ast
import gzip
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

__all__ = ["TextDoc", "stdlib_docstrings", "package_docstrings", "man_pages", "render_man", "pydoc_topics", "debian_docs", "pack_paragraphs",
           "sentences", "installed_packages"]

TextDoc = tuple[str, str]  # (source name, text)

_SENT = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\"'`])")
_WS = re.compile(r"[ \t]+")


def _clean(text: str) -> str:
    lines = [_WS.sub(" ", ln).strip() for ln in text.replace("\r", "").split("\n")]
    out = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", out).strip()


def stdlib_docstrings(min_chars: int = 200) -> list[TextDoc]:
    """Docstrings (≥ ``min_chars``) of the standard library's modules, classes and functions.

    Test suites, ``idlelib`` and ``site-packages`` are skipped; files are visited in sorted order so
    the list is the same on every run of the same Python.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    out: list[TextDoc] = []
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root).as_posix()
        if "site-packages" in rel or "/test" in "/" + rel or rel.startswith(("idlelib", "lib2to3/tests")):
            continue
        out += [(f"stdlib/{rel}:{name}", doc) for name, doc in _docstrings(f, min_chars)]
    return out


def _docstrings(path: Path, min_chars: int) -> list[tuple[str, str]]:
    """(name, cleaned docstring ≥ ``min_chars``) of a module file's module, classes and functions."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= min_chars:
                out.append((getattr(node, "name", "<module>"), _clean(doc)))
    return out


def package_docstrings(root: str | Path | None = None, *, min_chars: int = 200,
                       max_chars_per_package: int = 2_000_000) -> list[TextDoc]:
    """Docstrings (≥ ``min_chars``) of the third-party packages in ``root`` (default: this Python's
    ``site-packages``), for router training.

    Files are visited in sorted order; test suites and vendored copies (``tests``, ``_vendor``) are
    skipped, an exact duplicate of a docstring already taken is dropped (transformers repeats its
    model docstrings across hundreds of models), and a top-level package stops contributing once
    it has given ``max_chars_per_package`` characters, so a few huge packages do not swamp the
    rest. The list depends on which package versions are installed: ``installed_packages()`` names
    them for a training record.
    """
    import hashlib

    base = Path(root) if root is not None else Path(sysconfig.get_paths()["purelib"])
    out: list[TextDoc] = []
    seen: set[bytes] = set()
    per_pkg: dict[str, int] = {}
    for f in sorted(base.rglob("*.py")):
        rel = f.relative_to(base).as_posix()
        if "/test" in "/" + rel or "/_vendor/" in rel or rel.startswith(("msa_memory/", "_distutils_hack")):
            continue
        pkg = rel.split("/", 1)[0].removesuffix(".py")
        if per_pkg.get(pkg, 0) >= max_chars_per_package:
            continue
        for name, doc in _docstrings(f, min_chars):
            h = hashlib.sha1(doc.encode("utf-8")).digest()
            if h in seen or per_pkg.get(pkg, 0) >= max_chars_per_package:
                continue
            seen.add(h)
            per_pkg[pkg] = per_pkg.get(pkg, 0) + len(doc)
            out.append((f"packages/{rel}:{name}", doc))
    return out


def installed_packages(root: str | Path | None = None) -> list[str]:
    """``name==version`` of every distribution in ``root`` (default: this Python's site-packages), sorted."""
    from importlib.metadata import distributions

    dists = distributions(path=[str(root)]) if root is not None else distributions()
    return sorted({f"{d.metadata['Name']}=={d.version}" for d in dists if d.metadata["Name"]}, key=str.lower)


_MAN_SKIP_SECTIONS = {"NAME", "SYNOPSIS", "SEE ALSO", "AUTHOR", "AUTHORS", "COPYRIGHT", "REPORTING BUGS", "COLOPHON",
                      "LIBRARY", "BUGS", "HISTORY", "STANDARDS", "CONFORMING TO", "VERSIONS", "NOTES", "FILES",
                      "ENVIRONMENT", "EXIT STATUS", "RETURN VALUE", "ERRORS", "ATTRIBUTES"}


def render_man(source: str, groff: str = "groff") -> str:
    """Plain text of one man page's roff ``source``: its prose sections, one paragraph per block.

    ``groff -man -Tutf8`` with an unbounded line length and no hyphenation does the typesetting;
    running headers/footers and the sections in ``_MAN_SKIP_SECTIONS`` (synopsis, see also,
    errors, ...) are dropped, indentation is stripped, and the lines of a paragraph are joined.
    """
    proc = subprocess.run([groff, "-t", "-man", "-Tutf8", "-P-cbou", "-rLL=3000n", "-rHY=0"],
                          input=source.encode("utf-8"), capture_output=True, timeout=60, check=False)
    lines = proc.stdout.decode("utf-8", "replace").split("\n")
    paras: list[str] = []
    cur: list[str] = []
    keep = False
    body = lines[1:-1] if len(lines) > 2 else lines  # first and last lines are the running header/footer
    for ln in body:
        if ln and not ln[0].isspace():           # a section heading at column 0
            if cur:
                paras.append(" ".join(cur))
                cur = []
            keep = ln.strip().upper() not in _MAN_SKIP_SECTIONS
            continue
        text = ln.strip()
        if not text:
            if cur:
                paras.append(" ".join(cur))
                cur = []
            continue
        if keep:
            cur.append(text)
    if cur:
        paras.append(" ".join(cur))
    return _clean("\n\n".join(p for p in paras if len(p.split()) >= 4))


def man_pages(root: str | Path = "/usr/share/man", *, sections: str = "12345678", min_chars: int = 400,
              max_chars: int = 60_000, max_per_family: int = 40) -> list[TextDoc]:
    """English manual pages of the installed packages as plain text (sorted by path).

    Only ``man1``..``man8`` directly under ``root`` (translations live in locale folders);
    ``.so`` redirects and symlinks are skipped. ``max_per_family`` caps the pages of one command
    family (the name up to its first ``-``, ``_`` or ``.``), so huge generated families do not
    swamp the rest. Raises ``ConfigError`` when ``groff`` is missing.
    """
    from msa_memory.errors import ConfigError

    groff = shutil.which("groff")
    if groff is None:
        raise ConfigError("Rendering man pages needs groff.", hint="apt-get install groff-base, or train on "
                          "--builtin stdlib only.")
    base = Path(root)
    out: list[TextDoc] = []
    per_family: dict[str, int] = {}
    for sec in sections:
        folder = base / f"man{sec}"
        if not folder.is_dir():
            continue
        for f in sorted(folder.iterdir()):
            if f.is_symlink() or not f.is_file():
                continue
            family = re.split(r"[-_.]", f.name, maxsplit=1)[0]
            if per_family.get(family, 0) >= max_per_family:
                continue
            try:
                raw = gzip.decompress(f.read_bytes()) if f.name.endswith(".gz") else f.read_bytes()
                src = raw.decode("utf-8")
            except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile):
                continue
            if src.lstrip().startswith(".so "):
                continue
            text = render_man(src, groff)
            if len(text) < min_chars:
                continue
            per_family[family] = per_family.get(family, 0) + 1
            out.append((f"man/{folder.name}/{f.name}", text[:max_chars]))
    return out


def pydoc_topics() -> list[TextDoc]:
    """The language-reference topics shipped in ``pydoc_data.topics``, sorted by topic name."""
    from pydoc_data.topics import topics

    return [(f"pydoc/{name}", _clean(text)) for name, text in sorted(topics.items())]


_DEB_KEEP = re.compile(r"(readme|faq|news|todo|bugs|thanks|\.md|\.txt)(\.gz)?$", re.I)
_DEB_SKIP = re.compile(r"(changelog|copyright|\.conf|\.html?|\.json|\.xml|\.py|\.sh|\.c|\.h)(\.gz)?$", re.I)


def debian_docs(root: str | Path = "/usr/share/doc", min_chars: int = 400, max_chars: int = 200_000) -> list[TextDoc]:
    """README / FAQ / NEWS / markdown files of the installed Debian packages (text only, sorted)."""
    out: list[TextDoc] = []
    base = Path(root)
    if not base.is_dir():
        return out
    for f in sorted(base.rglob("*")):
        if not f.is_file() or f.is_symlink() or not _DEB_KEEP.search(f.name) or _DEB_SKIP.search(f.name):
            continue
        try:
            raw = gzip.decompress(f.read_bytes()) if f.name.endswith(".gz") else f.read_bytes()
            text = raw.decode("utf-8")
        except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile):
            continue
        if "\x00" in text or len(text) < min_chars:
            continue
        out.append((f"debian/{f.relative_to(base).as_posix()}", _clean(text[:max_chars])))
    return out


def pack_paragraphs(text: str, max_chars: int = 1200, min_chars: int = 200) -> list[str]:
    """Split ``text`` at blank lines and pack consecutive paragraphs into passages of ≤ ``max_chars``.

    A paragraph longer than ``max_chars`` is cut at sentence boundaries (hard cut as a last resort).
    Passages shorter than ``min_chars`` are dropped.
    """
    pieces: list[str] = []
    for para in re.split(r"\n\s*\n", text):
        para = para.strip()
        while len(para) > max_chars:
            cut = para.rfind(". ", 0, max_chars)
            cut = cut + 1 if cut > max_chars // 3 else max_chars
            pieces.append(para[:cut].strip())
            para = para[cut:].strip()
        if para:
            pieces.append(para)
    out: list[str] = []
    cur = ""
    for p in pieces:
        if cur and len(cur) + 2 + len(p) > max_chars:
            out.append(cur)
            cur = p
        else:
            cur = f"{cur}\n\n{p}" if cur else p
    if cur:
        out.append(cur)
    return [p for p in out if len(p) >= min_chars]


def sentences(text: str) -> list[tuple[int, int]]:
    """(start, end) character spans of the sentences of ``text`` (a simple punctuation splitter)."""
    spans: list[tuple[int, int]] = []
    start = 0
    for para in re.finditer(r"[^\n]+(?:\n(?!\s*\n)[^\n]+)*", text):
        s0, chunk = para.start(), para.group(0)
        pos = 0
        for m in _SENT.finditer(chunk):
            spans.append((s0 + pos, s0 + m.start()))
            pos = m.end()
        spans.append((s0 + pos, s0 + len(chunk)))
    del start
    return [(a, b) for a, b in spans if b > a]
