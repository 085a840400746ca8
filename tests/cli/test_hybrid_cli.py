"""Hybrid retrieval end to end on a tiny random-weight model: msa-encode builds the lexical index, msa search /
ask --retriever hybrid use it, an incremental store scores as a fresh encode of the same corpus, verify names
a damaged postings file, a store encoded without the index is refused until reindex-lexical adds it, and a
store of lex1 (unstemmed) postings answers hybrid questions until reindex-lexical upgrades it to lex2.
Run: .venv/bin/python -m pytest tests/cli/test_hybrid_cli.py -q
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from jobkit import make_corpus
from typer.testing import CliRunner

from msa_memory.cli import app, encode_app
from msa_memory.store import open_store

runner = CliRunner()
QUERIES = ("telescope mirror night", "fuel generator tank", "Fact 3: value", "badge policy travel leave")


def _tail(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def _encode(corpus: Path, store: Path, model: Path, shard_tokens: int = 400) -> dict:
    r = runner.invoke(encode_app, [str(corpus), "--store", str(store), "--model", str(model), "--shard-tokens", str(shard_tokens),
                                   "--torch-threads", "1", "--json"])
    assert r.exit_code == 0, r.output
    return _tail(r.stdout)


def _lexical_scores(store: Path) -> dict[tuple[str, int], list[float]]:
    """(source_path, passage_index) -> BM25 score of each query, over the store's latest version."""
    s = open_store(store)
    index = s.lexical_index()
    tab = s.documents(["doc_id", "source_path", "passage_index"])
    where = {d: (p, i) for d, p, i in zip(*(tab.column(c).to_pylist() for c in ("doc_id", "source_path", "passage_index")))}
    scores = np.stack([index.scores(q) for q in QUERIES], axis=1)
    return {where[int(d)]: row.tolist() for d, row in zip(index.doc_ids, scores)}


def _same_scores(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-12, err_msg=str(key))


def test_encode_builds_the_index_and_search_ask_use_it(tmp_path: Path, corpus: Path, tiny_model_dir: Path) -> None:
    store = tmp_path / "m.msa"
    _encode(corpus, store, tiny_model_dir)
    s = open_store(store)
    assert s.lexical_info()["complete"] and s.manifest["stats"]["n_docs"] >= 8
    assert all("postings.lex2.parquet" in s._view(e["shard_id"]).record.files for e in s.manifest["shards"])
    r = runner.invoke(app, ["store", "info", str(store)])
    assert r.exit_code == 0 and f"lexical : lex2 postings on {len(s.manifest['shards'])} of " in r.output
    args = [str(store), "--model", str(tiny_model_dir), "--device", "cpu"]
    r = runner.invoke(app, ["search", str(store), "fuel generator tank", "-k", "3", *args[1:], "--retriever", "hybrid",
                            "--json"])
    assert r.exit_code == 0, r.output
    out = _tail(r.stdout)
    from msa_memory.runtime import Memory

    mem = Memory(str(store), model=str(tiny_model_dir))
    want = mem.search("fuel generator tank", k=3, retriever="hybrid")
    assert out["retriever"] == "hybrid" and [x["doc_id"] for x in out["results"]] == want.column("doc_id").to_pylist()
    r = runner.invoke(app, ["ask", str(store), "fuel generator tank?", "-k", "2", "--max-new-tokens", "2", *args[1:],
                            "--retriever", "hybrid", "--json"])
    assert r.exit_code == 0, r.output
    ans = _tail(r.stdout)
    fused = mem.search("fuel generator tank?", k=2, retriever="hybrid").column("doc_id").to_pylist()
    assert ans["mode"] == "text" and ans["retriever"] == "hybrid"
    assert [d["doc_id"] for d in ans["rounds"][0]["docs"]] == fused
    r = runner.invoke(app, ["ask", str(store), "q?", *args[1:], "--retriever", "hybrid", "--mode", "interleave"])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "mode='text'" in r.output
    r = runner.invoke(app, ["search", str(store), "q", *args[1:], "--retriever", "bm25"])
    assert r.exit_code == 2 and "retriever='bm25' is not one of ['routing', 'hybrid']" in r.output


def test_incremental_store_scores_as_a_fresh_encode(tmp_path: Path, tiny_model_dir: Path) -> None:
    """A then A ∪ B then a file deleted (three encodes, several shards) vs one encode of the final corpus;
    then every shard compacted into one, and a verify."""
    grow = tmp_path / "grow" / "notes"
    make_corpus(grow, 10, seed=5)
    moved = tmp_path / "later"
    for f in sorted(grow.rglob("note00[5-9].md")):                      # B: held back from the first encode
        (moved / f.relative_to(grow)).parent.mkdir(parents=True, exist_ok=True)
        shutil.move(f, moved / f.relative_to(grow))
    store = tmp_path / "grow.msa"
    assert _encode(grow, store, tiny_model_dir, 4000)["version"] == 1
    shutil.copytree(moved, grow, dirs_exist_ok=True)
    assert _encode(grow, store, tiny_model_dir, 4000)["version"] == 2
    (grow / "part1" / "note001.md").unlink()
    res = _encode(grow, store, tiny_model_dir, 4000)
    assert res["version"] == 3 and res["files_deleted"] == ["notes/part1/note001.md"]
    assert open_store(store).manifest["deletions"]                      # its shard lives on: documents masked
    fresh = tmp_path / "fresh" / "notes"
    shutil.copytree(grow, fresh)
    _encode(fresh, tmp_path / "fresh.msa", tiny_model_dir)
    want = _lexical_scores(tmp_path / "fresh.msa")
    assert max(max(v) for v in want.values()) > 0
    _same_scores(_lexical_scores(store), want)
    s = open_store(store)
    c = s.compact(merge_below_chunks=10**6)                              # every shard merged into one
    assert len(c.manifest["shards"]) == 1 < len(s.manifest["shards"])
    _same_scores(_lexical_scores(store), want)
    assert runner.invoke(app, ["store", "verify", str(store)]).exit_code == 0


def test_verify_names_a_damaged_postings_file(tmp_path: Path, corpus: Path, tiny_model_dir: Path) -> None:
    store = tmp_path / "m.msa"
    _encode(corpus, store, tiny_model_dir)
    sid = open_store(store).manifest["shards"][0]["shard_id"]
    path = store / "shards" / sid / "postings.lex2.parquet"
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x01
    path.write_bytes(bytes(data))
    r = runner.invoke(app, ["store", "verify", str(store)])
    assert r.exit_code == 4 and f"shards/{sid}/postings.lex2.parquet" in r.output and "crc32c mismatch" in r.output
    r = runner.invoke(app, ["store", "verify", str(store), "--json"])
    assert r.exit_code == 4
    assert [p["file"] for p in _tail(r.stdout)["report"]["problems"]] == [f"shards/{sid}/postings.lex2.parquet"]


def test_store_encoded_without_the_index_is_refused_then_reindexed(tmp_path: Path, corpus: Path, tiny_model_dir: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import msa_memory.store as store_pkg

    old = tmp_path / "old.msa"
    # shards as a release without the lexical index wrote them (the job's worker imports write_shard per task)
    monkeypatch.setattr(store_pkg, "write_shard", functools.partial(store_pkg.write_shard, lexical=False))
    _encode(corpus, old, tiny_model_dir)
    monkeypatch.undo()
    n_shards = len(open_store(old).manifest["shards"])
    args = ["--model", str(tiny_model_dir), "--device", "cpu", "--retriever", "hybrid"]
    for cmd in (["search", str(old), "fuel tank"], ["ask", str(old), "fuel tank?"]):
        r = runner.invoke(app, [*cmd, *args])
        assert r.exit_code == 2 and r.output.count("\n") == 1, r.output
        assert r.output.startswith(f"error: Store {str(old)!r} (version 1) has no lexical index for {n_shards} of its "
                                   f"{n_shards} shards")
        assert f"`msa store reindex-lexical {old}`" in r.output
    assert runner.invoke(app, ["search", str(old), "fuel tank", *args[:-2]]).exit_code == 0   # routing as before
    r = runner.invoke(app, ["store", "info", str(old)])
    assert f"lexical : lex2 postings on 0 of {n_shards} shards (`msa store reindex-lexical {old}` adds the rest)" in r.output
    r = runner.invoke(app, ["store", "reindex-lexical", str(old), "--json"])
    assert r.exit_code == 0, r.output
    out = _tail(r.stdout)
    assert out["committed"] and out["version"] == 2 and out["indexed_shards"] == n_shards
    r = runner.invoke(app, ["store", "reindex-lexical", str(old)])
    assert r.exit_code == 0 and "nothing to do" in r.output
    assert runner.invoke(app, ["search", str(old), "fuel tank", *args]).exit_code == 0
    assert runner.invoke(app, ["store", "verify", str(old)]).exit_code == 0
    fresh = tmp_path / "fresh.msa"
    _encode(corpus, fresh, tiny_model_dir)
    _same_scores(_lexical_scores(old), _lexical_scores(fresh))


def test_lex1_store_answers_then_reindex_upgrades_it(tmp_path: Path, corpus: Path, tiny_model_dir: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from msa_memory.runtime import Memory
    from msa_memory.store import lexical

    old = tmp_path / "old.msa"
    monkeypatch.setattr(lexical, "ANALYZER", "lex1")      # shards as releases before lex2 wrote them
    _encode(corpus, old, tiny_model_dir)
    monkeypatch.undo()
    s = open_store(old)
    n_shards = len(s.manifest["shards"])
    assert all("postings.lex1.parquet" in s._view(e["shard_id"]).record.files for e in s.manifest["shards"])
    args = ["--model", str(tiny_model_dir), "--device", "cpu", "--retriever", "hybrid", "--json"]
    r = runner.invoke(app, ["search", str(old), "fuel generator tanks", "-k", "3", *args])
    assert r.exit_code == 0, r.output
    mem = Memory(str(old), model=str(tiny_model_dir))
    assert mem.lexical_index().analyzer == "lex1"
    want = mem.search("fuel generator tanks", k=3, retriever="hybrid").column("doc_id").to_pylist()
    assert [x["doc_id"] for x in _tail(r.stdout)["results"]] == want
    r = runner.invoke(app, ["store", "info", str(old)])
    assert f"lexical : lex2 postings on 0 of {n_shards} shards (`msa store reindex-lexical {old}` adds the rest)" in r.output
    assert runner.invoke(app, ["store", "verify", str(old)]).exit_code == 0
    r = runner.invoke(app, ["store", "reindex-lexical", str(old), "--json"])
    assert r.exit_code == 0 and _tail(r.stdout)["indexed_shards"] == n_shards, r.output
    assert open_store(old).lexical_index().analyzer == "lex2"
    assert runner.invoke(app, ["store", "verify", str(old)]).exit_code == 0
    fresh = tmp_path / "fresh.msa"
    _encode(corpus, fresh, tiny_model_dir)
    _same_scores(_lexical_scores(old), _lexical_scores(fresh))
