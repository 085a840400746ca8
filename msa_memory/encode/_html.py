"""HTML to text in one linear pass, with a depth bound: the HTML reader of ``encode.scan``.

What it does: tokenizes HTML with a handful of anchored regular expressions (text, character
references, start/end tags with quoted attribute values, comments, declarations, processing
instructions, CDATA, the raw text of ``<script>``/``<style>``) and keeps a stack of open elements.
The text it returns is what BeautifulSoup's ``html.parser`` tree gave for a well-formed page
(tested against it): ``<script>``, ``<style>``, ``<noscript>``, ``<template>`` and ``<head>`` are
dropped with their content, ``<rt>``/``<rp>`` text is dropped, every block element ends a line,
``<br>`` is a line break, whitespace-only strings outside ``<pre>``/``<textarea>`` collapse to one
space or newline, and then every line is whitespace-normalized and empty lines are dropped.

Why not BeautifulSoup: its tree costs O(depth) per appended string (minutes on 1 MB of nested
``<div>``), and the stdlib ``html.parser`` under it is super-linear on unterminated tags (144 s on
60 KB of ``<a ``). Here every character is scanned a bounded number of times: failed searches for a
closing quote or ``>`` are remembered, and a tag that never closes makes the rest of the page text.

Malformed pages read like a browser would close them where that costs nothing: an unclosed ``<p>``,
``<li>``, ``<dt>``/``<dd>``, ``<tr>``, ``<td>``/``<th>`` or ``<option>`` closes at its next sibling
(HTML's implied end tags), so tag soup stays shallow. A page still nested deeper than
``MAX_DEPTH`` elements raises :class:`HtmlTooDeep` (the corpus skips it with the line).
"""

from __future__ import annotations

import re
from html.entities import html5

__all__ = ["html_to_text", "HtmlTooDeep", "MAX_DEPTH", "BLOCKS"]

#: Open elements allowed at once. Browsers stop nesting at 512; real pages stay far below.
MAX_DEPTH = 4096
#: Elements that end a line.
BLOCKS = frozenset({"p", "div", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "blockquote", "section",
                    "article", "header", "footer", "table", "ul", "ol", "dt", "dd", "title"})
_REMOVED = frozenset({"script", "style", "noscript", "template", "head"})  # dropped with all they hold
_HIDDEN = frozenset({"rt", "rp"})  # their text is dropped (ruby annotations); their line breaks are not
_RAW = frozenset({"script", "style"})  # raw text: no markup inside
_PRESERVE = frozenset({"pre", "textarea"})
_VOID = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "keygen", "link", "menuitem", "meta",
                   "param", "source", "track", "wbr", "basefont", "bgsound", "command", "frame", "image", "isindex",
                   "nextid", "spacer"})
_SCOPE = frozenset({"applet", "caption", "html", "table", "td", "th", "marquee", "object", "template", "button"})
#: start tag -> (elements it closes, elements that stop the search): HTML's implied end tags
_IMPLIED: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "p": (frozenset({"p"}), _SCOPE),
    "li": (frozenset({"li"}), _SCOPE | {"ul", "ol", "menu"}),
    "dt": (frozenset({"dt", "dd"}), _SCOPE | {"dl"}),
    "dd": (frozenset({"dt", "dd"}), _SCOPE | {"dl"}),
    "tr": (frozenset({"tr"}), frozenset({"table", "thead", "tbody", "tfoot", "html", "template"})),
    "td": (frozenset({"td", "th"}), frozenset({"tr", "table", "html", "template"})),
    "th": (frozenset({"td", "th"}), frozenset({"tr", "table", "html", "template"})),
    "option": (frozenset({"option"}), frozenset({"select", "datalist", "optgroup", "html"})),
}
_ASCII_SPACE = " \n\t\f\r"

_TEXT = re.compile(r"[^<&]+")
_TAG_NAME = re.compile(r"[a-zA-Z][^\t\n\r\f />\x00]*")
_ATTR_TOKEN = re.compile(r"""\s+|[^\s/>="']+|/|["']""")
_BARE_VALUE = re.compile(r"[^\s>]*")
_CHARREF = re.compile(r"&#(?:[0-9]+|[xX][0-9a-fA-F]+)[^0-9a-fA-F]")
_ENTITYREF = re.compile(r"&([a-zA-Z][-.a-zA-Z0-9]*)[^a-zA-Z0-9]")
_COMMENT_END = re.compile(r"--\s*>")
_CDATA_END = re.compile(r"]\s*]\s*>")
_RAW_END = {name: re.compile(rf"</\s*{name}\s*>", re.IGNORECASE) for name in ("script", "style")}


class HtmlTooDeep(ValueError):
    """More than ``MAX_DEPTH`` elements are open at once."""

    def __init__(self, line: int) -> None:
        super().__init__(f"HTML nested deeper than {MAX_DEPTH} elements (line {line})")
        self.line = line


def html_to_text(html: str) -> str:
    """The text of ``html`` (see the module note); raises :class:`HtmlTooDeep`."""
    return _Reader(html).run()


def _numeric(ref: str) -> str:
    """A numeric character reference's text, as BeautifulSoup resolves it (HTML's rules)."""
    n = int(ref[1:], 16) if ref[:1] in "xX" else int(ref)
    if n == 0 or n > 0x10FFFF or 0xD800 <= n <= 0xDFFF:
        return "\ufffd"
    if 0x80 <= n <= 0x9F:
        try:
            return bytes([n]).decode("cp1252")
        except UnicodeDecodeError:
            pass
    return chr(n)


class _Reader:
    def __init__(self, html: str) -> None:
        self.s, self.n = html, len(html)
        self.out: list[str] = []
        self.buf: list[str] = []  # the string being read (a run of text and references)
        self.stack: list[str] = []
        self.open_at: dict[str, list[int]] = {}  # element name -> its positions in the stack
        self.removed = self.hidden = self.preserve = 0  # open elements of each kind
        self.closed_voids: list[str] = []  # void elements whose redundant end tag is ignored
        self.none_after: dict[str, int] = {}  # character -> a position after which it never occurs

    # -- the string being read, and where it goes

    def flush(self) -> None:
        if not self.buf:
            return
        data = "".join(self.buf)
        self.buf.clear()
        self.emit(data)

    def emit(self, data: str, cdata: bool = False) -> None:
        if not self.preserve and not data.strip(_ASCII_SPACE):
            data = "\n" if "\n" in data else " "
        if not self.removed and (cdata or not self.hidden):  # (BeautifulSoup keeps CDATA inside <rt>)
            self.out.append(data)

    # -- the stack of open elements

    def push(self, name: str, pos: int) -> None:
        if len(self.stack) >= MAX_DEPTH:
            raise HtmlTooDeep(self.s.count("\n", 0, pos) + 1)
        self.open_at.setdefault(name, []).append(len(self.stack))
        self.stack.append(name)
        self.removed += name in _REMOVED
        self.hidden += name in _HIDDEN
        self.preserve += name in _PRESERVE

    def pop_to(self, index: int) -> None:
        """Close the elements at ``index`` and above, innermost first; a block ends its line."""
        while len(self.stack) > index:
            name = self.stack.pop()
            self.open_at[name].pop()
            self.removed -= name in _REMOVED
            self.hidden -= name in _HIDDEN
            self.preserve -= name in _PRESERVE
            if name in BLOCKS and not self.removed:
                self.out.append("\n")

    def last(self, names: frozenset[str]) -> int:
        return max((self.open_at[x][-1] for x in names if self.open_at.get(x)), default=-1)

    # -- events

    def start(self, name: str, self_closing: bool, pos: int) -> None:
        self.flush()
        implied = _IMPLIED.get(name)
        if implied is not None:
            at = self.last(implied[0])
            if at >= 0 and at > self.last(implied[1]):
                self.pop_to(at)
        if name in _VOID and not self_closing:  # html.parser sends no end for <br>: close it now
            if name == "br" and not self.removed:
                self.out.append("\n")
            self.closed_voids.append(name)
            return
        self.push(name, pos)
        if self_closing:
            self.end(name, check_closed=False)

    def end(self, name: str, check_closed: bool = True) -> None:
        if check_closed and name in self.closed_voids:
            self.closed_voids.remove(name)  # </br> after <br>: nothing (BeautifulSoup does the same)
            return
        self.flush()
        where = self.open_at.get(name)
        if where:
            if name == "br" and not self.removed:
                self.out.append("\n")
            self.pop_to(where[-1])

    # -- scanning

    def find(self, ch: str, start: int) -> int:
        """``s.find(ch, start)``, remembering a failure so that no text is searched twice."""
        if start >= self.none_after.get(ch, self.n + 1):
            return -1
        at = self.s.find(ch, start)
        if at < 0:
            self.none_after[ch] = min(start, self.none_after.get(ch, self.n + 1))
        return at

    def tag_end(self, i: int) -> tuple[int, bool] | None:
        """End of the tag whose attributes start at ``i`` (after ``>``) and whether it ends ``/>``."""
        s, n = self.s, self.n
        while i < n:
            c = s[i]
            if c == ">":
                return i + 1, False
            if c == "/" and s.startswith(">", i + 1):
                return i + 2, True
            if c == "=":
                i += 1
                while i < n and s[i] in " \t\n\r\f":
                    i += 1
                if i < n and s[i] in "\"'":
                    close = self.find(s[i], i + 1)
                    i = close + 1 if close >= 0 else i + 1
                else:  # an unquoted value runs to a space or '>' ('/' included, as html.parser reads it)
                    i = _BARE_VALUE.match(s, i).end()
                continue
            m = _ATTR_TOKEN.match(s, i)
            i = m.end() if m else i + 1
        return None

    def run(self) -> str:
        s, n, i = self.s, self.n, 0
        while i < n:
            c = s[i]
            if c == "<":
                i = self.markup(i)
            elif c == "&":
                i = self.reference(i)
            else:
                m = _TEXT.match(s, i)
                self.buf.append(m.group())
                i = m.end()
        self.flush()
        self.pop_to(0)
        lines = (" ".join(line.split()) for line in "".join(self.out).splitlines())
        return "\n".join(line for line in lines if line)

    def reference(self, i: int) -> int:
        s = self.s
        m = _CHARREF.match(s, i) if s.startswith("&#", i) else _ENTITYREF.match(s, i)
        if m is None:
            self.buf.append("&")
            return i + 1
        end = m.end() if s.startswith(";", m.end() - 1) else m.end() - 1
        if s.startswith("&#", i):
            self.buf.append(_numeric(m.group()[2:-1]))
        else:
            name = m.group(1)
            self.buf.append(html5.get(name + ";") or html5.get(name) or "&" + name)
        return end

    def markup(self, i: int) -> int:
        s, n = self.s, self.n
        nxt = s[i + 1] if i + 1 < n else ""
        if nxt.isascii() and nxt.isalpha():
            m = _TAG_NAME.match(s, i + 1)
            end = self.tag_end(m.end())
            if end is None:  # a tag that never closes: the rest of the page is text
                self.buf.append(s[i:])
                return n
            name = m.group().lower()
            self.start(name, end[1], i)
            if name in _RAW and not end[1]:
                return self.raw_text(name, end[0])
            return end[0]
        if nxt == "/":
            if s.startswith(">", i + 2):
                return i + 3
            gt = self.find(">", i + 2)
            if gt < 0:
                self.buf.append(s[i:])
                return n
            m = _TAG_NAME.match(s, i + 2)
            if m is not None:  # an end tag (what follows its name is ignored); else a bogus comment
                self.end(m.group().lower())
            else:
                self.flush()
            return gt + 1
        if nxt == "!":
            self.flush()
            if s.startswith("<!--", i):
                m = _COMMENT_END.search(s, i + 4)
                return n if m is None else m.end()
            if s[i + 2:i + 9].upper() == "[CDATA[":
                m = _CDATA_END.search(s, i + 9)
                self.emit(s[i + 9:n if m is None else m.start()], cdata=True)
                return n if m is None else m.end()
            gt = self.find(">", i + 2)
            return n if gt < 0 else gt + 1
        if nxt == "?":
            self.flush()
            gt = self.find(">", i + 2)
            return n if gt < 0 else gt + 1
        self.buf.append("<")
        return i + 1

    def raw_text(self, name: str, i: int) -> int:
        """Skip the raw text of ``<script>``/``<style>`` up to its end tag (there is no markup inside)."""
        m = _RAW_END[name].search(self.s, i)
        if m is None:
            self.buf.append(self.s[i:])
            return self.n
        self.buf.append(self.s[i:m.start()])
        self.end(name)
        return m.end()
