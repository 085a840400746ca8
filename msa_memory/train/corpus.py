"""Real text that ships with this machine, for router training and the quality benchmark.

Three sources, all offline and reproducible from a given Python / Debian install:

- ``stdlib_docstrings()``: module, class and function docstrings of the Python standard library
  (~2,300 docstrings of >200 characters, ~1.2M characters on CPython 3.11). Used for *training*.
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
import sysconfig
from pathlib import Path

__all__ = ["TextDoc", "stdlib_docstrings", "pydoc_topics", "debian_docs", "pack_paragraphs", "sentences"]

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
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    name = getattr(node, "name", "<module>")
                    out.append((f"stdlib/{rel}:{name}", _clean(doc)))
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
