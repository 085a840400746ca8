"""Corpus readers (msa_memory/encode/corpus.py): formats, keys, globs, .gitignore, bad inputs.

Run: .venv/bin/python -m pytest tests/unit/jobs/test_corpus_readers.py -q
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from jobkit import minimal_pdf

from msa_memory.encode.scan import scan_corpus, source_root_key
from msa_memory.encode.sources import ReaderOptions
from msa_memory.errors import ConfigError


def _write(root: Path, rel: str, data: str | bytes) -> Path:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data.encode() if isinstance(data, str) else data)
    return p


def test_scan_reads_every_supported_format(tmp_path: Path) -> None:
    root = tmp_path / "docs"
    _write(root, "a.md", "# Title\nThe dome opens at sunset.")
    _write(root, "b.rst", "Title\n=====\n\nKESTREL has 16 CCDs.")
    _write(root, "c.txt", "plain text")
    _write(root, "src/tool.py", "def f():\n    return 42\n")
    _write(root, "README", "no extension, still text")
    _write(root, "page.html", "<html><head><title>T</title><script>var x=1;</script></head>"
                              "<body><h1>Site</h1><p>Dial <b>5555</b> for help.</p></body></html>")
    _write(root, "doc.pdf", minimal_pdf("The tank holds 30000 litres."))
    _write(root, "faq.jsonl", json.dumps({"id": "q1", "text": "First answer."}) + "\n\n"
           + json.dumps({"text": "Second answer."}) + "\n")
    scan = scan_corpus([root])
    by_key = {s.key: s for s in scan.sources}
    assert sorted(by_key) == ["docs/README", "docs/a.md", "docs/b.rst", "docs/c.txt", "docs/doc.pdf",
                              "docs/faq.jsonl#id=q1", "docs/faq.jsonl#line=3", "docs/page.html", "docs/src/tool.py"]
    assert scan.skipped == []
    assert by_key["docs/page.html"].kind == "html"
    assert by_key["docs/page.html"].text.splitlines() == ["Site", "Dial 5555 for help."]
    assert "var x" not in by_key["docs/page.html"].text
    assert by_key["docs/doc.pdf"].text == "The tank holds 30000 litres."
    assert by_key["docs/faq.jsonl#id=q1"].text == "First answer."
    assert by_key["docs/faq.jsonl#line=3"].sha256 == hashlib.sha256(b"Second answer.").hexdigest()
    raw = (root / "a.md").read_bytes()
    assert by_key["docs/a.md"].sha256 == hashlib.sha256(raw).hexdigest()
    assert by_key["docs/a.md"].n_bytes == len(raw)
    assert scan.roots == ["docs/"]


def test_scan_skips_bad_inputs_with_reasons_and_loses_nothing_else(tmp_path: Path) -> None:
    root = tmp_path / "bad"
    _write(root, "good.md", "A good file.")
    _write(root, "empty.txt", "")
    _write(root, "blank.md", "   \n\n")
    _write(root, "nul.dat", b"abc\x00def")
    _write(root, "image.png", b"\x89PNG\r\n\x1a\n....")
    _write(root, "latin1.txt", "caf\xe9".encode("latin-1"))
    _write(root, "broken.pdf", b"%PDF-1.4 this is not a pdf")
    _write(root, "big.txt", "x" * 5000)
    _write(root, "notext.html", "<html><script>only()</script></html>")
    _write(root, "bad.jsonl", '{"text": "ok"}\n{not json}\n')
    _write(root, "nofield.jsonl", '{"body": "no text field"}\n')
    os.symlink("does-not-exist", root / "dangling.md")
    (root / "sub").mkdir()
    os.symlink("..", root / "sub" / "loop")
    _write(root, "sub/deep.txt", "deep file")
    os.mkfifo(root / "pipe.txt")
    scan = scan_corpus([root], ReaderOptions(max_file_bytes=4096))
    assert [s.key for s in scan.sources] == ["bad/good.md", "bad/sub/deep.txt"]
    reasons = {Path(s.path).name: s.reason for s in scan.skipped}
    assert reasons["empty.txt"] == "empty file"
    assert reasons["blank.md"].startswith("no text")
    assert reasons["nul.dat"].startswith("binary")
    assert reasons["image.png"].startswith("binary file type")
    assert reasons["latin1.txt"].startswith("not UTF-8")
    assert reasons["broken.pdf"].startswith("unparsable PDF")
    assert reasons["big.txt"].startswith("too large")
    assert reasons["notext.html"].startswith("no text")
    assert "line 2" in reasons["bad.jsonl"]
    assert "'text'" in reasons["nofield.jsonl"]
    assert reasons["dangling.md"] == "broken symlink"
    assert reasons["loop"].startswith("symlink loop")
    assert reasons["pipe.txt"] == "not a regular file"
    assert len(scan.skipped) == 13
    # skipped files keep their key, so the plan can protect their old documents
    assert {s.key for s in scan.skipped if s.key} >= {"bad/empty.txt", "bad/dangling.md"}


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_scan_skips_unreadable_file(tmp_path: Path) -> None:
    p = _write(tmp_path / "d", "secret.txt", "hidden")
    p.chmod(0)
    scan = scan_corpus([tmp_path / "d"])
    assert scan.sources == [] and scan.skipped[0].reason.startswith("unreadable")


def test_scan_include_exclude_globs(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    for rel in ("a.md", "b.py", "drafts/c.md", "deep/x/d.md"):
        _write(root, rel, f"content of {rel}")
    scan = scan_corpus([root], ReaderOptions(include=("*.md",), exclude=("drafts/",)))
    assert [s.key for s in scan.sources] == ["repo/a.md", "repo/deep/x/d.md"]
    assert scan.n_excluded == 1  # b.py; the drafts folder is pruned without listing
    scan = scan_corpus([root], ReaderOptions(exclude=("deep/**", "*.py")))
    assert [s.key for s in scan.sources] == ["repo/a.md", "repo/drafts/c.md"]


def test_scan_gitignore_only_on_request(tmp_path: Path) -> None:
    root = tmp_path / "proj"
    _write(root, ".gitignore", "build/\n*.log\n!keep.log\n")
    _write(root, "src/.gitignore", "generated.py\n")
    for rel in ("main.py", "build/out.txt", "run.log", "keep.log", "src/generated.py", "src/real.py"):
        _write(root, rel, f"content of {rel}")
    _write(root, ".git/HEAD", "ref: refs/heads/main")
    keys = [s.key for s in scan_corpus([root], ReaderOptions(respect_gitignore=True)).sources]
    assert keys == ["proj/keep.log", "proj/main.py", "proj/src/real.py"]
    keys_all = [s.key for s in scan_corpus([root]).sources]
    assert "proj/build/out.txt" in keys_all and "proj/src/generated.py" in keys_all
    assert not any(k.startswith("proj/.git/") for k in keys_all)  # VCS metadata is never a corpus


def test_scan_keys_do_not_depend_on_cwd_and_files_are_keyed_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "notes"
    f = _write(root, "x/y.md", "text")
    monkeypatch.chdir(tmp_path)
    k1 = [s.key for s in scan_corpus(["notes"]).sources]
    monkeypatch.chdir(root / "x")
    k2 = [s.key for s in scan_corpus([str(root)]).sources]
    assert k1 == k2 == ["notes/x/y.md"]
    assert [s.key for s in scan_corpus([f]).sources] == ["y.md"]
    assert source_root_key(root) == "notes/" and source_root_key(f) == "y.md"


def test_scan_rejects_missing_path_and_clashing_roots(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        scan_corpus([tmp_path / "nope"])
    (tmp_path / "a" / "docs").mkdir(parents=True)
    (tmp_path / "b" / "docs").mkdir(parents=True)
    with pytest.raises(ConfigError, match="both be stored under 'docs/'"):
        scan_corpus([tmp_path / "a" / "docs", tmp_path / "b" / "docs"])
    with pytest.raises(ConfigError):
        ReaderOptions(max_file_bytes=0)


def test_scan_covers_only_scanned_roots(tmp_path: Path) -> None:
    _write(tmp_path / "docs", "a.md", "x")
    scan = scan_corpus([tmp_path / "docs"])
    assert scan.covers("docs/old.md") and not scan.covers("other/a.md") and not scan.covers("docsX/a.md")
    f = tmp_path / "faq.jsonl"
    f.write_text('{"text": "x"}\n')
    scan = scan_corpus([f])  # a JSON Lines file argument covers its records (vanished ones are deleted)
    assert scan.covers("faq.jsonl#7") and not scan.covers("faq.jsonlx#7")
