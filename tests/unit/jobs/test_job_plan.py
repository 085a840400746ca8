"""The job plan (msa_memory/jobs/plan.py): diff against a real store version, shard batching.

Run: .venv/bin/python -m pytest tests/unit/jobs/test_job_plan.py -q
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np

from msa_memory.encode.sources import CorpusScan, SkippedFile, SourceText
from msa_memory.jobs.plan import diff_sources, make_shard_tasks, plan_id_of
from msa_memory.schemas.records import Passage
from msa_memory.store import create_store, write_shard
from msa_memory.testing.store_kit import random_docs, tiny_identity


def _src(key: str, text: str) -> SourceText:
    return SourceText(key=key, text=text, sha256=hashlib.sha256(text.encode()).hexdigest(), n_bytes=len(text),
                      kind="text", path=f"/x/{key}")


def _store_with(tmp_path: Path, files: dict[str, tuple[str, int]]):
    """A store whose live docs are ``n`` passages per key with the sha of the given text."""
    s = create_store(tmp_path / "m.msa", tiny_identity())
    rng = np.random.default_rng(0)
    keys = sorted(files)
    counts = [files[k][1] for k in keys]
    ids = s.reserve_ids(sum(counts))
    passages, enc = random_docs(s.identity, ids, [4] * len(ids), rng)
    out, i = [], 0
    for k, c in zip(keys, counts):
        sha = hashlib.sha256(files[k][0].encode()).hexdigest()
        for j in range(c):
            out.append(dataclasses.replace(passages[i], source_path=k, passage_index=j, file_sha256=sha))
            i += 1
    rec = write_shard(s.root, "seed", out, enc)
    return s.commit(add=[rec]), {k: [int(ids[x]) for x in range(len(ids)) if out[x].source_path == k] for k in keys}


def _scan(sources: list[SourceText], roots: list[str], skipped: list[SkippedFile] = ()) -> CorpusScan:
    return CorpusScan(sources=sorted(sources, key=lambda s: s.key), skipped=list(skipped), roots=roots)


def test_plan_diff_unchanged_changed_deleted_added(tmp_path: Path) -> None:
    store, ids = _store_with(tmp_path, {"d/a.md": ("A", 2), "d/b.md": ("B", 1), "d/c.md": ("C", 3),
                                        "other/x.md": ("X", 1)})
    scan = _scan([_src("d/a.md", "A"), _src("d/b.md", "B changed"), _src("d/new.md", "N")], ["d/"])
    diff = diff_sources(scan, store)
    assert diff.read_version == store.version == 1
    assert diff.unchanged == ["d/a.md"] and diff.replaced == ["d/b.md"] and diff.added == ["d/new.md"]
    assert diff.deleted == ["d/c.md"]  # other/x.md lies outside the scanned folder: kept
    assert [s.key for s in diff.to_encode] == ["d/b.md", "d/new.md"]
    assert diff.delete_ids == sorted(ids["d/b.md"] + ids["d/c.md"])
    assert diff.has_changes


def test_plan_diff_unchanged_folder_has_no_changes(tmp_path: Path) -> None:
    store, _ = _store_with(tmp_path, {"d/a.md": ("A", 2), "d/b.md": ("B", 1)})
    diff = diff_sources(_scan([_src("d/a.md", "A"), _src("d/b.md", "B")], ["d/"]), store)
    assert not diff.has_changes and diff.unchanged == ["d/a.md", "d/b.md"] and diff.delete_ids == []


def test_plan_diff_keeps_documents_of_skipped_files_and_folders(tmp_path: Path) -> None:
    store, _ = _store_with(tmp_path, {"d/a.md": ("A", 1), "d/gone.md": ("G", 1), "d/locked/x.md": ("L", 1),
                                      "d/data.jsonl#1": ("R1", 1), "d/data.jsonl#2": ("R2", 1)})
    skipped = [SkippedFile("/x/d/a.md", "unreadable (Permission denied)", "d/a.md"),
               SkippedFile("/x/d/locked", "unreadable folder (Permission denied)", "d/locked/"),
               SkippedFile("/x/d/data.jsonl", "invalid JSON Lines (line 3: ...)", "d/data.jsonl")]
    diff = diff_sources(_scan([], ["d/"], skipped), store)
    assert diff.deleted == ["d/gone.md"]


def test_plan_diff_file_argument_scope(tmp_path: Path) -> None:
    store, ids = _store_with(tmp_path, {"a.md": ("A", 1), "b.md": ("B", 1)})
    diff = diff_sources(_scan([], ["a.md"]), store)  # a.md was passed but vanished; b.md not in scope
    assert diff.deleted == ["a.md"] and diff.delete_ids == ids["a.md"]


def _passages(spec: list[tuple[str, int]]) -> tuple[list[Passage], list[int]]:
    ps, counts = [], []
    for key, n in spec:
        for j in range(n):
            ps.append(Passage(text=f"{key} {j}", source_path=key, passage_index=j))
            counts.append(100)
    return ps, counts


def test_shard_tasks_keep_files_together_and_are_deterministic() -> None:
    ps, counts = _passages([("a", 2), ("b", 1), ("c", 5), ("d", 1)])
    ids = np.arange(100, 100 + len(ps), dtype=np.int64)
    tasks = make_shard_tasks(ps, counts, ids, plan_id="ab" * 32, shard_tokens=300)
    # a file larger than a shard is cut; its tail shares a shard with the next small file
    assert [t.keys for t in tasks] == [("a", "b"), ("c",), ("c", "d")]
    assert [t.n_tokens for t in tasks] == [300, 300, 300]
    assert [t.shard_id for t in tasks] == [f"job-{'ab' * 8}-{i:05d}" for i in range(3)]
    assert np.concatenate([t.doc_ids for t in tasks]).tolist() == ids.tolist()
    again = make_shard_tasks(ps, counts, ids, plan_id="ab" * 32, shard_tokens=300)
    assert [(t.shard_id, t.doc_ids.tolist(), t.passages) for t in again] == \
        [(t.shard_id, t.doc_ids.tolist(), t.passages) for t in tasks]


def test_plan_id_depends_on_content_version_and_settings() -> None:
    srcs = [_src("d/a.md", "A"), _src("d/b.md", "B")]
    ident = tiny_identity().to_dict()
    base = plan_id_of(ident, 3, srcs, {"shard_tokens": 10})
    assert base == plan_id_of(ident, 3, list(srcs), {"shard_tokens": 10})
    assert base != plan_id_of(ident, 4, srcs, {"shard_tokens": 10})
    assert base != plan_id_of(ident, 3, srcs, {"shard_tokens": 11})
    assert base != plan_id_of(ident, 3, [srcs[0], _src("d/b.md", "B2")], {"shard_tokens": 10})
    assert base != plan_id_of({**ident, "model_fingerprint": "0" * 64}, 3, srcs, {"shard_tokens": 10})
