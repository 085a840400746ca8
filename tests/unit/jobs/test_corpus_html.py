"""The HTML reader (issue 41, item 10): bounded time and depth; well-formed HTML reads as before.

The repro: 1.1 MB of nested ``<div>`` took minutes to read (BeautifulSoup's tree on html.parser is
quadratic in depth). Such a file is now skipped, with the reason in the scan and in the job's
summary, in about the time it takes to read it. The reference for "reads the same" is the previous
reader (BeautifulSoup with html.parser, kept here as the oracle): on well-formed pages, hand-made
and generated, the text is equal line for line.

Run: .venv/bin/python -m pytest tests/unit/jobs/test_corpus_html.py -q
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from msa_memory.cli import encode_app
from msa_memory.encode.scan import scan_corpus
from msa_memory.encode.sources import ReaderOptions, read_file

BLOCKS = ["p", "div", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "blockquote", "section", "article",
          "header", "footer", "table", "ul", "ol", "dt", "dd", "title"]


def bs4_text(html: str) -> str:
    """The previous reader, verbatim: the oracle for well-formed HTML."""
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(html, "html.parser")
    for tag in soup(["script", "style", "noscript", "template", "head"]):
        tag.decompose()
    for tag in soup.find_all(BLOCKS):
        tag.append("\n")
    for br in soup.find_all("br"):
        br.replace_with("\n")
    lines = (" ".join(line.split()) for line in soup.get_text().splitlines())
    return "\n".join(line for line in lines if line)


def read_html(tmp_path: Path, html: str, name: str = "page.html") -> tuple[str | None, str | None]:
    p = tmp_path / name
    p.write_text(html, encoding="utf-8")
    sources, reason = read_file(p, name, ReaderOptions())
    return (sources[0].text if sources else None), reason


PAGES = [
    "<html><head><title>T</title><script>var x=1;</script></head>"
    "<body><h1>Site</h1><p>Dial <b>5555</b> for help.</p></body></html>",
    "<!DOCTYPE html>\n<html lang='en'>\n<head>\n<meta charset=\"utf-8\">\n<title>Handbook</title>\n"
    "<style>p { color: red; }</style>\n<link rel=stylesheet href=a.css>\n</head>\n<body>\n"
    "<!-- a comment -->\n<header><nav><ul><li><a href=\"/\">Home</a></li><li><a href='/faq'>FAQ</a></li></ul></nav>"
    "</header>\n<main>\n<article>\n<h2 class=\"x\" data-v='a > b'>Shuttle &amp; parking</h2>\n"
    "<p>The shuttle leaves at <time datetime=\"13:00\">13:00</time>&nbsp;and 15:30.<br>Seats are reserved.</p>\n"
    "<p>Fees: &euro;12 &mdash; &#8364;12 &#x20AC;12 &lt;tag&gt; &quot;q&quot; &#39;s&#39; &copy; 2026</p>\n"
    "<pre>  keep   this\n   layout  </pre>\n<table><thead><tr><th>Day</th><th>Time</th></tr></thead>"
    "<tbody><tr><td>Mon</td><td>08:30</td></tr><tr><td>Tue</td><td>10:00</td></tr></tbody></table>\n"
    "<dl><dt>Term</dt><dd>Definition <em>here</em>.</dd></dl>\n<blockquote>Quoted <q>words</q>.</blockquote>\n"
    "<img src=x.png alt=\"picture\"><hr/><input type=text value=\"v\"/>\n<noscript>Enable JS</noscript>\n"
    "<template><p>hidden template</p></template>\n<ruby>漢<rp>(</rp><rt>kan</rt><rp>)</rp></ruby>字\n"
    "<section><h3>Nested</h3><div><div><span>deep <i>inline</i> text</span></div></div></section>\n"
    "<p>CDATA: <![CDATA[raw <stuff>]]> after</p>\n<textarea>  a\n  b </textarea>\n"
    "</article>\n</main>\n<footer><p>Contact: <a href=\"mailto:x@y\">x@y</a></p></footer>\n"
    "<script type=\"text/javascript\">if (a < b && c > d) { document.write('</p>'); }</script>\n"
    "</body>\n</html>\n",
    "<p>one</p>\n\n<p>two <br/> three</p><div>a<div>b</div>c</div>",
    "<ul>\n  <li>first</li>\n  <li>second <ul><li>inner</li></ul></li>\n</ul>\t\f\r\n<p>x</p>",
    "plain text with no tags at all &amp; an entity",
    "<html><body><p>caf\u00e9 \u2014 na\u00efve \U0001F600</p><p>\u00a0</p></body></html>",
]


@pytest.mark.parametrize("i", range(len(PAGES)))
def test_well_formed_pages_read_as_beautifulsoup_did(tmp_path: Path, i: int) -> None:
    text, reason = read_html(tmp_path, PAGES[i])
    assert reason is None
    assert text.splitlines() == bs4_text(PAGES[i]).splitlines()


def _random_page(rng: random.Random, depth: int = 0, inline: bool = False) -> str:
    """A well-formed fragment of valid nesting: blocks, inline elements, lists, tables, text,
    references, comments, CDATA, void elements and the elements whose content is dropped."""
    blocks = ["div", "section", "blockquote", "article", "noscript", "head", "header"]
    inlines = ["span", "b", "i", "a", "em", "rt", "q", "time"]
    words = ["alpha", "beta", "  ", "\n", " gamma ", "&amp;", "&lt;", "&#233;", "&nbsp;", "&#x2014;", "x\ty", "\r\n",
             "&copy;", "&#150;"]
    out = []
    for _ in range(rng.randint(1, 4)):
        r = rng.random()
        attrs = rng.choice(["", ' class="c"', " id='i' data-x=\"a>b\"", " hidden", " href=/a/b/", ' title="x/"'])
        if r < 0.12 and depth < 6 and not inline:
            tag = rng.choice(blocks)
            out.append(f"<{tag}{attrs}>{_random_page(rng, depth + 1)}</{tag}>")
        elif r < 0.2 and depth < 6 and not inline:
            tag = rng.choice(["p", "h2", "pre", "title", "textarea"])
            out.append(f"<{tag}{attrs}>{_random_page(rng, depth + 1, inline=True)}</{tag}>")
        elif r < 0.25 and depth < 5 and not inline:
            items = "".join(f"<li>{_random_page(rng, depth + 2)}</li>{rng.choice(['', chr(10)])}" for _ in range(2))
            out.append(f"<ul{attrs}>{items}</ul>")
        elif r < 0.28 and depth < 5 and not inline:
            cells = "".join(f"<td>{_random_page(rng, depth + 3, inline=True)}</td>" for _ in range(2))
            out.append(f"<table><tr>{cells}</tr><tr><th>h</th></tr></table>")
        elif r < 0.4 and depth < 6:
            tag = rng.choice(inlines)
            out.append(f"<{tag}{attrs}>{_random_page(rng, depth + 1, inline=True)}</{tag}>")
        elif r < 0.45:
            tag = rng.choice(["script", "style"])
            out.append(f"<{tag}>var a = 1 < 2 && '</p>';</{tag}>")
        elif r < 0.55:
            out.append(rng.choice(["<br>", "<br/>", "<hr>", "<img src='a.png'>", "<!-- c -->", "<wbr>",
                                   "<![CDATA[ c d ]]>", "<input value=\"v\"/>", "</br>"]))
        else:
            out.append(rng.choice(words))
    return "".join(out)


def test_generated_well_formed_pages_read_as_beautifulsoup_did(tmp_path: Path) -> None:
    rng = random.Random(41)
    for k in range(300):
        page = "<html><body>" + _random_page(rng) + "</body></html>"
        text, reason = read_html(tmp_path, page)
        expected = bs4_text(page)
        if not expected:
            assert reason is not None and reason.startswith("no text"), page
            continue
        assert reason is None and text.splitlines() == expected.splitlines(), page


def test_deeply_nested_html_is_skipped_quickly_with_a_reason(tmp_path: Path) -> None:
    # the repro: 1.1 MB of nested <div>s
    n = 137_000  # 8 bytes a level: 1.1 MB, 137,000 deep
    html = "<html><body>" + "<div>" * n + "deep text" + "</div>" * (n // 2)
    assert 1.0e6 < len(html) < 1.2e6
    t0 = time.perf_counter()
    text, reason = read_html(tmp_path, html, "nested.html")
    elapsed = time.perf_counter() - t0
    assert text is None and reason.startswith("HTML nested deeper than") and "line 1" in reason
    assert elapsed < 30, f"{elapsed:.1f} s"  # was minutes; this reads 1.1 MB once (about a second)


@pytest.mark.parametrize("unit", ["<a ", "<a x='", "</", "<!", "<!--", "<?", "&#", "&", "<![CDATA[", "<p>", "<li>"])
def test_malformed_html_reads_in_linear_time(tmp_path: Path, unit: str) -> None:
    """Markup that never closes: the stdlib parser under BeautifulSoup took 144 s on 60 KB of '<a '."""
    html = unit * (1_000_000 // len(unit))
    t0 = time.perf_counter()
    text, reason = read_html(tmp_path, html, "bad.html")
    elapsed = time.perf_counter() - t0
    assert text is not None or reason is not None
    assert elapsed < 30, f"{unit!r}: {elapsed:.1f} s for 1 MB"


def test_tag_soup_of_unclosed_paragraphs_and_items_reads(tmp_path: Path) -> None:
    """Unclosed <p>, <li>, <td> close at their next sibling, so a long page of them is not 'too deep'."""
    html = "<body><ul>" + "".join(f"<li>item {i}" for i in range(10_000)) + "</ul>" + \
           "".join(f"<p>para {i}" for i in range(10_000)) + \
           "</p><table>" + "".join(f"<tr><td>a{i}<td>b{i}" for i in range(5_000)) + "</table>"
    text, reason = read_html(tmp_path, html, "soup.html")
    assert reason is None
    lines = text.splitlines()
    assert lines[:2] == ["item 0", "item 1"] and "para 9999" in lines and "a4999b4999" in lines
    assert len(lines) == 10_000 + 10_000 + 5_000


def test_skipped_html_is_in_the_job_summary(tmp_path: Path, tiny_model_dir: Path) -> None:
    corpus = tmp_path / "site"
    corpus.mkdir()
    (corpus / "ok.html").write_text(PAGES[0])
    (corpus / "nested.html").write_text("<div>" * 10_000 + "x")
    r = CliRunner().invoke(encode_app, [str(corpus), "--store", str(tmp_path / "m.msa"), "--model",
                                        str(tiny_model_dir), "--dry-run", "--torch-threads", "1"])
    assert r.exit_code == 0, r.output
    assert "1 skipped" in r.output
    assert f"skipped {corpus / 'nested.html'}: HTML nested deeper than" in r.output
    scan = scan_corpus([corpus])
    assert [s.key for s in scan.sources] == ["site/ok.html"]
