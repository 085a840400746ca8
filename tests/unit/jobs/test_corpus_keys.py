"""Source keys are unique by construction (issue 41, item 5): JSON Lines ids and line numbers.

A JSON Lines record with an ``id`` is keyed ``<file>#id=<id>``, one without ``<file>#line=<n>``,
so an explicit id can never take the key of another record's line number; two records with the same
id refuse the file (skipped, the reason names the id and both lines). A rerun over the unchanged
folder must then commit nothing.

Run: .venv/bin/python -m pytest tests/unit/jobs/test_corpus_keys.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

from msa_memory.encode.scan import scan_corpus
from msa_memory.jobs import encode_corpus
from msa_memory.jobs.plan import diff_sources
from msa_memory.store import open_store

SMALL = dict(shard_tokens=600, max_passage_tokens=256, workers=1, torch_threads=1)


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_explicit_id_and_line_number_never_share_a_key(tmp_path: Path) -> None:
    # the repro: {"id": "2"} on line 1, an id-less record on line 2
    _jsonl(tmp_path / "d" / "file.jsonl", [{"id": "2", "text": "first"}, {"text": "second"}])
    scan = scan_corpus([tmp_path / "d"])
    keys = [s.key for s in scan.sources]
    assert keys == ["d/file.jsonl#id=2", "d/file.jsonl#line=2"]
    assert len(set(keys)) == len(keys) and scan.skipped == []
    # an id that looks like a line key stays in the id namespace
    _jsonl(tmp_path / "e" / "f.jsonl", [{"text": "a"}, {"id": "line=1", "text": "b"}, {"id": 7, "text": "c"}])
    assert [s.key for s in scan_corpus([tmp_path / "e"]).sources] == ["e/f.jsonl#id=7", "e/f.jsonl#id=line=1",
                                                                      "e/f.jsonl#line=1"]


def test_duplicate_ids_in_one_file_refuse_the_file_naming_its_lines(tmp_path: Path) -> None:
    _jsonl(tmp_path / "d" / "dup.jsonl", [{"id": "a", "text": "x"}, {"text": "y"}, {"id": "a", "text": "z"}])
    _jsonl(tmp_path / "d" / "mixed.jsonl", [{"id": 5, "text": "x"}, {"id": "5", "text": "y"}])  # 5 and "5" are one id
    _jsonl(tmp_path / "d" / "ok.jsonl", [{"id": "a", "text": "fine"}])
    scan = scan_corpus([tmp_path / "d"])
    assert [s.key for s in scan.sources] == ["d/ok.jsonl#id=a"]
    reasons = {Path(s.path).name: s.reason for s in scan.skipped}
    assert "duplicate id 'a' on lines 1 and 3" in reasons["dup.jsonl"]
    assert "duplicate id '5' on lines 1 and 2" in reasons["mixed.jsonl"]
    assert {s.key for s in scan.skipped} == {"d/dup.jsonl", "d/mixed.jsonl"}  # their old documents are kept


def test_record_ids_of_other_types_are_refused(tmp_path: Path) -> None:
    _jsonl(tmp_path / "d" / "f.jsonl", [{"id": 1.5, "text": "x"}])
    _jsonl(tmp_path / "d" / "n.jsonl", [{"id": None, "text": "no id: keyed by line"}, {"id": True, "text": "y"}])
    scan = scan_corpus([tmp_path / "d"])
    reasons = {Path(s.path).name: s.reason for s in scan.skipped}
    assert "line 1" in reasons["f.jsonl"] and "float" in reasons["f.jsonl"]
    assert "line 2" in reasons["n.jsonl"] and "bool" in reasons["n.jsonl"]


def test_a_file_named_like_a_record_key_does_not_duplicate_a_key(tmp_path: Path) -> None:
    _jsonl(tmp_path / "d" / "a.jsonl", [{"text": "record"}])
    (tmp_path / "d" / "a.jsonl#line=1").write_text("a text file whose name is a record key")
    scan = scan_corpus([tmp_path / "d"])
    keys = [s.key for s in scan.sources]
    assert keys == ["d/a.jsonl#line=1"] and scan.sources[0].kind == "jsonl"
    (sk,) = scan.skipped
    assert sk.path.endswith("a.jsonl#line=1") and "same source key" in sk.reason and "a.jsonl" in sk.reason


def test_rerun_of_unchanged_jsonl_folder_commits_nothing(tmp_path: Path, tiny_model_dir: Path) -> None:
    corpus = tmp_path / "faq"
    _jsonl(corpus / "file.jsonl", [{"id": "2", "text": "The dome opens at sunset."},
                                   {"text": "The pager rota changes on Mondays."},
                                   {"id": 3, "text": "Fuel is delivered on Fridays."}])
    store = tmp_path / "m.msa"
    first = encode_corpus([corpus], store, model=str(tiny_model_dir), **SMALL)
    assert first.committed and first.docs_added == 3 and len(first.files_added) == 3
    again = encode_corpus([corpus], store, model=str(tiny_model_dir), **SMALL)
    assert not again.committed and again.files_unchanged == 3 and again.files_added == [] and again.docs_deleted == 0
    assert open_store(store).latest_version() == first.version
    keys = sorted(set(open_store(store).documents(columns=["source_path"]).column("source_path").to_pylist()))
    assert keys == ["faq/file.jsonl#id=2", "faq/file.jsonl#id=3", "faq/file.jsonl#line=2"]


def test_plan_protects_exactly_the_documents_of_a_skipped_file_whose_name_has_a_hash(tmp_path: Path) -> None:
    from test_job_plan import _scan, _store_with

    from msa_memory.encode.sources import SkippedFile

    store, ids = _store_with(tmp_path, {"d/a#b.md": ("AB", 1), "d/a": ("A", 1), "d/c#d.jsonl#id=1": ("R", 1),
                                        "d/c": ("C", 1)})
    skipped = [SkippedFile("/x/d/a#b.md", "unreadable (Permission denied)", "d/a#b.md"),
               SkippedFile("/x/d/c#d.jsonl", "invalid JSON Lines (line 3: ...)", "d/c#d.jsonl")]
    diff = diff_sources(_scan([], ["d/"], skipped), store)
    # a skipped a#b.md keeps its documents; d/a and d/c (gone) are deleted, not protected by a#b.md / c#d.jsonl
    assert diff.deleted == ["d/a", "d/c"]
    assert diff.delete_ids == sorted(ids["d/a"] + ids["d/c"])
