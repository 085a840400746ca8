"""What a scan walks (issue 41, items 6 and 8): msa stores in the tree, symlinks in and out of the roots.

- A store folder inside the corpus (the job's own, or any folder with a store's marker files) is
  never read; the job converges to "no changes" and says which stores it left out.
- Symlinks whose target lies outside the scanned roots are not followed unless asked
  (``follow_links`` / ``--follow-links``) and are counted in the summary. Links that stay inside
  the roots are aliases: a file reached directly and through a link is stored once (under its own
  path), and a real folder first met through a link is read, not called a loop.

Real files, real symlinks, real stores and real ``msa-encode`` runs on the tiny random-weight model.
Run: .venv/bin/python -m pytest tests/unit/jobs/test_corpus_walk.py -q
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from typer.testing import CliRunner

from msa_memory.cli import encode_app
from msa_memory.encode.scan import scan_corpus
from msa_memory.encode.sources import ReaderOptions
from msa_memory.jobs import encode_corpus
from msa_memory.store import create_store, open_store
from msa_memory.testing.store_kit import tiny_identity

SMALL = dict(shard_tokens=600, max_passage_tokens=256, workers=1, torch_threads=1)


def _write(root: Path, rel: str, text: str) -> Path:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def _keys(scan) -> list[str]:
    return [s.key for s in scan.sources]


# ----------------------------------------------------------------------------- item 6: stores in the tree


def test_scan_leaves_out_every_msa_store_in_the_tree(tmp_path: Path) -> None:
    corpus = tmp_path / "notes"
    _write(corpus, "a.md", "The dome opens at sunset.")
    create_store(corpus / "deep" / "old.msa", tiny_identity())        # a store the job does not write
    (corpus / "mem.msa").mkdir()                                      # the job's store, not created yet
    _write(corpus, "mem.msa/_jobs/plan.json", '{"doc_ids": [1, 2]}')   # (a half-made store: no markers)
    scan = scan_corpus([corpus], store=corpus / "mem.msa")
    assert _keys(scan) == ["notes/a.md"] and scan.skipped == []
    assert scan.stores_excluded == sorted([str(corpus / "deep" / "old.msa"), str(corpus / "mem.msa")])
    # a file named like a marker is not a store by itself
    _write(corpus, "docs/msa_store.json", '{"just": "a file"}')
    assert "notes/docs/msa_store.json" in _keys(scan_corpus([corpus]))


def test_job_with_its_store_inside_the_corpus_converges(tmp_path: Path, tiny_model_dir: Path) -> None:
    corpus = tmp_path / "notes"
    for i in range(3):
        _write(corpus, f"n{i}.md", f"# Note {i}\n\nThe generator tank holds {1000 + i} litres of fuel.\n")
    create_store(corpus / "archive" / "old.msa", tiny_identity())
    store = corpus / "mem.msa"
    first = encode_corpus([corpus], store, model=str(tiny_model_dir), **SMALL)
    assert first.committed and sorted(first.files_added) == ["notes/n0.md", "notes/n1.md", "notes/n2.md"]
    assert first.stores_excluded == [str(corpus / "archive" / "old.msa")]
    for _ in range(2):  # the store now exists inside the corpus: still nothing to do
        again = encode_corpus([corpus], store, model=str(tiny_model_dir), **SMALL)
        assert not again.committed and again.files_added == [] and again.files_unchanged == 3
        assert again.stores_excluded == sorted([str(corpus / "archive" / "old.msa"), str(store)])
    assert open_store(store).latest_version() == first.version
    # the dry run and the human summary say so
    r = CliRunner().invoke(encode_app, [str(corpus), "--store", str(store), "--model", str(tiny_model_dir),
                                        "--dry-run", "--torch-threads", "1"])
    assert r.exit_code == 0, r.output
    assert "2 msa stores left out" in r.output and str(store) in r.output


# ----------------------------------------------------------------------------- item 8: symlinks


def _outside_and_corpus(tmp_path: Path) -> tuple[Path, Path]:
    outside = tmp_path / "outside"
    _write(outside, "secret.txt", "The vault code is 4242.")
    _write(outside, "private/notes.md", "Outside notes.")
    corpus = tmp_path / "docs"
    _write(corpus, "a.md", "Inside the corpus.")
    os.symlink(outside / "secret.txt", corpus / "secret.txt")
    os.symlink(outside, corpus / "ext")  # the folder holds the secret too: reachable twice
    return outside, corpus


def test_links_out_of_the_roots_are_not_followed_unless_asked(tmp_path: Path) -> None:
    outside, corpus = _outside_and_corpus(tmp_path)
    scan = scan_corpus([corpus])
    assert _keys(scan) == ["docs/a.md"] and scan.skipped == []
    assert scan.links_not_followed == [str(corpus / "ext"), str(corpus / "secret.txt")]
    followed = scan_corpus([corpus], ReaderOptions(follow_links=True))
    # asked: followed, and the secret reached through two links is stored once (under the first key)
    assert _keys(followed) == ["docs/a.md", "docs/ext/private/notes.md", "docs/ext/secret.txt"]
    assert followed.links_not_followed == [] and followed.skipped == []
    # a root given as a link is the user's own choice: followed
    os.symlink(outside, tmp_path / "linked")
    assert _keys(scan_corpus([tmp_path / "linked"])) == ["linked/private/notes.md", "linked/secret.txt"]


def test_links_inside_the_roots_read_each_file_once_and_are_not_loops(tmp_path: Path) -> None:
    corpus = tmp_path / "docs"
    _write(corpus, "v2/a.md", "Version two.")
    _write(corpus, "v2/sub/b.md", "Version two, deeper.")
    os.symlink("v2", corpus / "current")          # sorts before v2: met first through the link
    os.symlink("v2/a.md", corpus / "alias.md")    # a file reached directly and through a link
    os.symlink("../../v2", corpus / "v2" / "sub" / "up")  # a link to its own ancestor: a loop
    other = tmp_path / "other"
    _write(other, "c.md", "Another root.")
    os.symlink(corpus / "v2" / "a.md", other / "to-docs.md")  # into another scanned root
    scan = scan_corpus([corpus, other])
    assert _keys(scan) == ["docs/v2/a.md", "docs/v2/sub/b.md", "other/c.md"]
    assert [(Path(s.path).name, s.reason.split(" (")[0]) for s in scan.skipped] == [("up", "symlink loop")]
    assert scan.links_not_followed == []
    # an inside folder whose own path the scan leaves out (excluded) is read through the links to it,
    # each file once (a.md is reached through alias.md and current/: the first key is kept)
    scan = scan_corpus([corpus], ReaderOptions(exclude=("v2/",)))
    assert _keys(scan) == ["docs/alias.md", "docs/current/sub/b.md"]


def test_job_counts_links_not_followed_and_cli_follows_on_request(tmp_path: Path, tiny_model_dir: Path) -> None:
    _, corpus = _outside_and_corpus(tmp_path)
    store = tmp_path / "m.msa"
    res = encode_corpus([corpus], store, model=str(tiny_model_dir), **SMALL)
    assert res.committed and res.files_added == ["docs/a.md"]
    assert res.links_not_followed == [str(corpus / "ext"), str(corpus / "secret.txt")]
    args = [str(corpus), "--store", str(store), "--model", str(tiny_model_dir), "--torch-threads", "1",
            "--shard-tokens", "600"]
    r = CliRunner().invoke(encode_app, [*args, "--dry-run"])
    assert r.exit_code == 0 and "2 symlinks out of the scanned folders not followed (--follow-links)" in r.output
    r = CliRunner().invoke(encode_app, [*args, "--follow-links", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert sorted(out["files_added"]) == ["docs/ext/private/notes.md", "docs/ext/secret.txt"]
    assert out["links_not_followed"] == []
    texts = open_store(store).documents(columns=["text"]).column("text").to_pylist()
    assert texts.count("The vault code is 4242.") == 1
    # without the flag again: the outside documents go, as files gone from the folder do
    res = encode_corpus([corpus], store, model=str(tiny_model_dir), **SMALL)
    assert sorted(res.files_deleted) == ["docs/ext/private/notes.md", "docs/ext/secret.txt"]
