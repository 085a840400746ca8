"""Built-in training text: man pages rendered with groff, source selection, the CLI's --builtin.

Run: ``.venv/bin/python -m pytest tests/unit/train/test_builtin_texts.py -q`` (no model, seconds).
"""

from __future__ import annotations

import gzip
import shutil

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from msa_memory.errors import ConfigError
from msa_memory.train import recipe, texts

needs_groff = pytest.mark.skipif(shutil.which("groff") is None, reason="groff is not installed")

PAGE = r""".\" a comment that must not show
.TH FROB 1 "2026" "frob 1.0" "User Commands"
.SH NAME
frob \- frobnicate files
.SH SYNOPSIS
.B frob
[\fIOPTION\fR]... \fIFILE\fR
.SH DESCRIPTION
.B frob
reads each
.I FILE
and writes its
frobnicated form to standard output, keeping
the original untouched.
.PP
With no FILE, or when FILE is \-, it reads standard input instead of a file.
.SH OPTIONS
.TP
\fB\-q\fR, \fB\-\-quiet\fR
print nothing but the frobnicated output itself
.SH SEE ALSO
.BR cat (1)
"""


@needs_groff
def test_render_man_keeps_prose_joins_lines_drops_name_synopsis_see_also():
    text = texts.render_man(PAGE)
    paras = text.split("\n\n")
    assert paras[0] == ("frob reads each FILE and writes its frobnicated form to standard output, keeping "
                        "the original untouched.")
    assert "With no FILE, or when FILE is -, it reads standard input instead of a file." in paras
    assert any(p.startswith("-q, --quiet") for p in paras)
    for gone in ("frobnicate files", "comment", "cat(1)", "User Commands", "[OPTION]"):
        assert gone not in text


def _write_page(path, src, compress=True):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(src.encode()) if compress else src.encode())


@needs_groff
def test_man_pages_reads_sections_skips_redirects_links_translations_and_caps_families(tmp_path):
    long_page = PAGE + ".SH EXAMPLES\n" + "Frob the file named in the first argument and report its size. " * 12 + "\n"
    root = tmp_path / "man"
    _write_page(root / "man1" / "frob.1.gz", long_page)
    _write_page(root / "man1" / "frob-extra.1", long_page.replace("frob", "frobx"), compress=False)
    _write_page(root / "man1" / "frob-more.1.gz", long_page)
    _write_page(root / "man8" / "zap.8.gz", long_page.replace("frob", "zap"))
    _write_page(root / "man1" / "alias.1.gz", ".so man1/frob.1\n")     # a redirect
    (root / "man1" / "link.1.gz").symlink_to(root / "man1" / "frob.1.gz")
    _write_page(root / "de" / "man1" / "frob.1.gz", long_page)         # a translation
    _write_page(root / "man1" / "tiny.1.gz", ".TH T 1\n.SH DESCRIPTION\nToo short to train on.\n")
    docs = texts.man_pages(root, max_per_family=2)
    # family "frob" is capped at its first 2 pages in sorted order ('-' sorts before '.')
    assert [s for s, _ in docs] == ["man/man1/frob-extra.1", "man/man1/frob-more.1.gz", "man/man8/zap.8.gz"]
    assert all("Frob the file named" in t or "Zap the file" in t or "Frobx" in t for _, t in docs)
    assert texts.man_pages(tmp_path / "nowhere") == []


def test_man_pages_without_groff_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(texts.shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match="groff"):
        texts.man_pages(tmp_path)


def test_builtin_sources_selection_and_sizes(monkeypatch):
    fake = {"stdlib": lambda: [(f"stdlib/m{i}", f"Docstring number {i} explains one thing. " * 8) for i in range(30)],
            "man": lambda: [(f"man/man1/p{i}", f"Manual page {i} describes a command. " * 8) for i in range(20)]}
    monkeypatch.setattr(recipe, "BUILTIN_SOURCES", fake)
    both = recipe.builtin_passages(("stdlib", "man"), seed=3)
    assert len(both) == 50 and {s.split("/")[0] for s, _ in both} == {"stdlib", "man"}
    assert both == recipe.builtin_passages(("stdlib", "man", "stdlib"), seed=3)    # a repeated name counts once
    assert recipe.builtin_passages(("man",), seed=3) != recipe.builtin_passages(("man",), seed=4)
    train, dev = recipe.builtin_pairs(0, 10, sources=("stdlib", "man"), seed=3)    # 0: all but the dev passages
    assert len(train.passages) == 40 and len(dev.passages) == 10
    assert not set(train.passages) & set(dev.passages)
    with pytest.raises(ConfigError, match="asked for 45 \\+ 10"):
        recipe.builtin_pairs(45, 10, sources=("stdlib", "man"))
    with pytest.raises(ConfigError, match="Unknown built-in training source"):
        recipe.builtin_passages(("stdlib", "wiki"))


def test_cli_builtin_option_errors_and_command_line(tmp_path):
    from typer.testing import CliRunner

    from msa_memory.cli import app
    from msa_memory.train.cli_support import train_router_command as _train_router_command

    bad = CliRunner().invoke(app, ["train-router", "--builtin", "stdlib,wiki", "--out", str(tmp_path / "r"), "--json"])
    assert bad.exit_code == 2 and "wiki" in bad.output
    both = CliRunner().invoke(app, ["train-router", "--builtin", "man", "--corpus", str(tmp_path),
                                    "--out", str(tmp_path / "r"), "--json"])
    assert both.exit_code == 2 and "--builtin" in both.output
    assert not (tmp_path / "r").exists()
    cmd = _train_router_command("r/", None, None, None, "default", "0,1", 2, 3, 8, 1e-3, 0, 400, 800, 0,
                                None, "cpu", "bm25", 1, "stdlib,man", 2048)
    assert "--builtin stdlib,man" in cmd and cmd.endswith("--negatives 2048") and "--n-train 0" in cmd
    cmd = _train_router_command("r/", None, None, None, "default", "1,5", 2, 3, 8, 1e-3, 0, 400, 800, 0,
                                None, "cpu", layer_loss="sum")
    assert cmd.endswith("--layer-loss sum")
    bad = CliRunner().invoke(app, ["train-router", "--layer-loss", "all", "--out", str(tmp_path / "r"), "--json"])
    assert bad.exit_code == 2 and "layer_loss" in bad.output and not (tmp_path / "r").exists()


def _module(path, docs):
    path.parent.mkdir(parents=True, exist_ok=True)
    body = [f'"""{docs[0]}"""', ""] + [f'def f{i}():\n    """{d}"""\n' for i, d in enumerate(docs[1:])]
    path.write_text("\n".join(body))


def test_package_docstrings_skips_tests_vendored_duplicates_and_caps_packages(tmp_path):
    long = lambda tag: f"{tag} explains what the function does and why it does it that way. " * 4  # noqa: E731
    _module(tmp_path / "alpha" / "core.py", [long("Alpha module"), long("Alpha f0"), long("Shared text"), "short"])
    _module(tmp_path / "alpha" / "tests" / "test_core.py", [long("Alpha test")])
    _module(tmp_path / "alpha" / "_vendor" / "six.py", [long("Vendored")])
    _module(tmp_path / "beta" / "a.py", [long("Beta a"), long("Shared text")])     # duplicate of alpha's
    _module(tmp_path / "beta" / "b.py", [long("Beta b")])
    _module(tmp_path / "gamma.py", [long("Gamma single-module package")])
    (tmp_path / "broken.py").write_text("def (:\n")                                # unparsable: skipped

    docs = texts.package_docstrings(tmp_path)
    names = [s for s, _ in docs]
    assert names == ["packages/alpha/core.py:<module>", "packages/alpha/core.py:f0", "packages/alpha/core.py:f1",
                     "packages/beta/a.py:<module>", "packages/beta/b.py:<module>", "packages/gamma.py:<module>"]
    assert sum("Shared text" in d for _, d in docs) == 1                           # exact duplicate dropped
    assert docs == texts.package_docstrings(tmp_path)                             # deterministic
    # a package stops contributing once it has given max_chars_per_package characters
    capped = [s for s, _ in texts.package_docstrings(tmp_path, max_chars_per_package=250)]
    assert capped == ["packages/alpha/core.py:<module>", "packages/beta/a.py:<module>", "packages/gamma.py:<module>"]
    assert "packages" in recipe.BUILTIN_SOURCES


def test_installed_packages_lists_distributions(tmp_path):
    info = tmp_path / "frob-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: frob\nVersion: 1.2.3\n")
    assert texts.installed_packages(tmp_path) == ["frob==1.2.3"]
    assert any(p.startswith("torch==") for p in texts.installed_packages())


def test_fact_maker_names_outlast_a_large_corpus():
    """~42k facts (a 70k-passage corpus at p_fact 0.6) need more than the 23,520 names of 2-3
    syllable words: the maker moves on to 4 syllables instead of failing."""
    from msa_memory.train.pairs import FactMaker

    fm = FactMaker("train", 0)
    names = [fm._name() for _ in range(30_000)]
    assert len(set(names)) == 30_000
    assert max(len(n.split()[1]) for n in names) > max(len(n.split()[1]) for n in names[:10_000])


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_varied_fact_names_never_hold_an_eval_syllable(seed):
    """``names="varied"`` draws from ~16k syllables, and no word it makes contains one of the
    benchmark's eval syllables, not even across a syllable boundary."""
    from msa_memory.train.pairs import _SYL_EVAL, _SYL_TRAIN, FactMaker

    fm = FactMaker("train", seed, names="varied")
    words = [fm._name().split()[1].lower() for _ in range(400)]
    assert len(set(words)) > 390                                       # distinct words, not 14 syllables' combos
    assert not [w for w in words if any(e in w for e in _SYL_EVAL)]
    assert all(len(w) <= 12 for w in words)
    assert sum(all(_split_into(w, _SYL_TRAIN)) for w in words) < 5     # hardly ever the old train names
    again = FactMaker("train", seed, names="varied")
    assert [again._name().split()[1].lower() for _ in range(400)] == words   # deterministic


def _split_into(word, syllables):
    """Whether ``word`` is a concatenation of ``syllables`` (a one-element list: True or False)."""
    ok = [True] + [False] * len(word)
    for i in range(len(word)):
        if ok[i]:
            for s in syllables:
                if word.startswith(s, i):
                    ok[i + len(s)] = True
    return [ok[-1]]


def test_fact_names_option_checks_and_reaches_the_pairs(tmp_path):
    from typer.testing import CliRunner

    from msa_memory.cli import app
    from msa_memory.train.cli_support import train_router_command as _train_router_command
    from msa_memory.train.pairs import FactMaker, build_pairs

    with pytest.raises(ConfigError, match="training only"):
        FactMaker("eval", 0, names="varied")
    with pytest.raises(ConfigError, match="syllables, varied"):
        FactMaker("train", 0, names="words")
    text = "First sentence here is long enough. Second sentence is also long enough. Third one ends it here."
    docs = [("a", text)] * 30
    plain = build_pairs(docs, seed=3, p_fact=1.0)
    varied = build_pairs(docs, seed=3, p_fact=1.0, fact_names="varied")
    fm = FactMaker("train", 3)
    first = fm.make()[1]
    assert plain.queries[1].text in first                             # the default recipe is unchanged
    assert [q.text for q in plain.queries if q.kind == "ict"] == [q.text for q in varied.queries if q.kind == "ict"]
    assert {q.text for q in plain.queries if q.kind == "fact"}.isdisjoint(q.text for q in varied.queries)
    bad = CliRunner().invoke(app, ["train-router", "--fact-names", "words", "--out", str(tmp_path / "r"), "--json"])
    assert bad.exit_code == 2 and "--fact-names" in bad.output and not (tmp_path / "r").exists()
    cmd = _train_router_command("r/", None, None, None, "default", "1,5", 2, 3, 8, 1e-3, 0, 400, 800, 0,
                                None, "cpu", fact_names="varied")
    assert cmd.endswith("--fact-names varied")
