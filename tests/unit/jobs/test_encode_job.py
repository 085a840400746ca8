"""encode_corpus end to end on a tiny random-weight model: create, incremental updates, dry run,
compute=False laziness, interrupt-and-resume, identity refusal, bad inputs.

The local cluster here is the default one for a CPU machine (one in-process worker), so the model
is loaded once for the whole file. Run: .venv/bin/python -m pytest tests/unit/jobs/test_encode_job.py -q
"""

from __future__ import annotations

from pathlib import Path

import pytest
from jobkit import edit, store_digest, write_tiny_model

from msa_memory.errors import IdentityMismatchError
from msa_memory.jobs import JobResult, encode_corpus
from msa_memory.store import open_store

# one torch thread: tiny matrices gain nothing from more, and spinning OpenMP threads on a busy
# 2-core machine make each forward ~50x slower (measured)
SMALL = dict(shard_tokens=600, max_passage_tokens=256, workers=1, torch_threads=1)


def _keys(root: Path) -> list[str]:
    return sorted(set(open_store(root).documents(columns=["source_path"]).column("source_path").to_pylist()))


def _by_source(root: Path) -> dict[tuple[str, int], str]:
    """(source_path, passage_index) -> sha of its K/V (ids differ between stores; plain-wrap tensors don't)."""
    import hashlib

    s = open_store(root)
    rows = s.documents(columns=["doc_id", "source_path", "passage_index"]).to_pylist()
    kv = s.load_kv([r["doc_id"] for r in rows])
    return {(r["source_path"], r["passage_index"]): hashlib.sha256(a.tobytes()).hexdigest() for r, a in zip(rows, kv)}


def test_encode_creates_store_and_commits_one_version(tmp_path: Path, corpus: Path, tiny_model_dir: Path) -> None:
    events: list[dict] = []
    res = encode_corpus([corpus], tmp_path / "m.msa", model=str(tiny_model_dir), progress=events.append, **SMALL)
    assert isinstance(res, JobResult) and res.committed and res.version == 1 and res.read_version == 0
    assert len(res.files_added) == 12 and res.files_replaced == [] and res.files_deleted == []
    s = open_store(tmp_path / "m.msa")
    assert s.version == 1 and s.stats()["n_docs"] == res.docs_added >= 12
    assert _keys(tmp_path / "m.msa") == sorted(f"notes/{p.relative_to(corpus).as_posix()}" for p in corpus.rglob("*.md"))
    # every passage is the byte range of its source file it claims to be
    docs = s.documents(columns=["source_path", "passage_index", "byte_start", "byte_end", "text"]).to_pylist()
    for d in docs:
        raw = (corpus.parent / d["source_path"]).read_bytes()
        assert raw[d["byte_start"]:d["byte_end"]].decode() == d["text"]
    assert res.shards_written >= 2 and res.shards_reused == 0 and res.tokens_encoded > 0 and res.bytes_written > 0
    kinds = [e["event"] for e in events]
    assert kinds[0] == "planned" and kinds[-1] == "committed" and kinds.count("shard") == res.shards_written
    assert sum(e["tokens"] for e in events if e["event"] == "shard") == res.tokens_planned == events[0]["tokens_total"]
    assert sum(e["tokens_encoded"] for e in events if e["event"] == "shard") == res.tokens_encoded >= res.tokens_planned
    assert not list((tmp_path / "m.msa" / "_jobs").glob("*.json"))  # journal removed after the commit
    assert s.verify()["ok"]


def test_encode_incremental_unchanged_changed_deleted_added_mixed(tmp_path: Path, corpus: Path, tiny_model_dir: Path) -> None:
    store = tmp_path / "m.msa"
    encode_corpus([corpus], store, model=str(tiny_model_dir), **SMALL)
    before = open_store(store).documents(columns=["doc_id", "source_path"]).to_pylist()
    ids_of = lambda rows, key: sorted(r["doc_id"] for r in rows if r["source_path"] == key)  # noqa: E731

    # unchanged: nothing committed
    res = encode_corpus([corpus], store, model=str(tiny_model_dir), **SMALL)
    assert not res.committed and res.version == 1 and res.files_unchanged == 12 and "no changes" in res.message
    assert open_store(store).latest_version() == 1
    # ... and loads no model to find that out (a model path that does not exist is never opened)
    assert not encode_corpus([corpus], store, model=str(tmp_path / "no-such-model"), **SMALL).committed

    # one changed: its documents replaced, all others keep their ids
    edit(corpus / "part1" / "note001.md", "# Note 1\n\nThe dome now opens at 17:05.\n")
    res = encode_corpus([corpus], store, model=str(tiny_model_dir), **SMALL)
    assert res.committed and res.version == 2 and res.files_replaced == ["notes/part1/note001.md"]
    assert res.files_unchanged == 11 and res.docs_deleted == len(ids_of(before, "notes/part1/note001.md"))
    after = open_store(store).documents(columns=["doc_id", "source_path", "text"]).to_pylist()
    assert [r["text"] for r in after if r["source_path"] == "notes/part1/note001.md"] == ["# Note 1\n\nThe dome now opens at 17:05."]
    for key in {r["source_path"] for r in before} - {"notes/part1/note001.md"}:
        assert ids_of(after, key) == ids_of(before, key)

    # one deleted
    (corpus / "part2" / "note002.md").unlink()
    res = encode_corpus([corpus], store, model=str(tiny_model_dir), **SMALL)
    assert res.version == 3 and res.files_deleted == ["notes/part2/note002.md"] and res.docs_added == 0
    assert "notes/part2/note002.md" not in _keys(store)

    # one added
    (corpus / "new.md").write_text("A brand new note about the generator fuel tank.\n")
    res = encode_corpus([corpus], store, model=str(tiny_model_dir), **SMALL)
    assert res.version == 4 and res.files_added == ["notes/new.md"] and res.files_unchanged == 11

    # mixed, all in one version
    edit(corpus / "part0" / "note003.md", "changed again")
    (corpus / "part0" / "note006.md").unlink()
    (corpus / "part2" / "extra.md").write_text("extra file")
    res = encode_corpus([corpus], store, model=str(tiny_model_dir), **SMALL)
    assert res.version == 5 and open_store(store).latest_version() == 5
    assert (res.files_added, res.files_replaced, res.files_deleted) == (
        ["notes/part2/extra.md"], ["notes/part0/note003.md"], ["notes/part0/note006.md"])

    # the incrementally built store holds the same documents and tensors as a fresh encode
    fresh = tmp_path / "fresh.msa"
    encode_corpus([corpus], fresh, model=str(tiny_model_dir), **SMALL)
    assert _keys(store) == _keys(fresh)
    assert _by_source(store) == _by_source(fresh)


def test_encode_dry_run_writes_nothing(tmp_path: Path, corpus: Path, tiny_model_dir: Path) -> None:
    res = encode_corpus([corpus], tmp_path / "m.msa", model=str(tiny_model_dir), dry_run=True, **SMALL)
    assert res.dry_run and not res.committed and len(res.files_added) == 12 and res.tokens_planned > 0
    assert not (tmp_path / "m.msa").exists()
    encode_corpus([corpus], tmp_path / "m.msa", model=str(tiny_model_dir), **SMALL)
    (corpus / "part0" / "note000.md").unlink()
    before = sorted(p.name for p in (tmp_path / "m.msa").rglob("*"))
    res = encode_corpus([corpus], tmp_path / "m.msa", model=str(tiny_model_dir), dry_run=True, **SMALL)
    assert res.files_deleted == ["notes/part0/note000.md"] and res.version == 1
    assert sorted(p.name for p in (tmp_path / "m.msa").rglob("*")) == before


def test_encode_compute_false_is_lazy_then_commits(tmp_path: Path, corpus: Path, tiny_model_dir: Path) -> None:
    import dask
    from dask.delayed import Delayed

    job = encode_corpus([corpus], tmp_path / "m.msa", model=str(tiny_model_dir), compute=False, **SMALL)
    assert isinstance(job, Delayed)
    assert not any((tmp_path / "m.msa" / "shards").glob("*")) and open_store(tmp_path / "m.msa").version == 0
    (res,) = dask.compute(job, scheduler="sync")
    assert res.committed and res.version == 1
    assert store_digest(tmp_path / "m.msa")["n_docs"] == res.docs_added


def test_encode_interrupted_job_resumes_bit_identical(tmp_path: Path, corpus: Path, tiny_model_dir: Path) -> None:
    """A job stopped after its first shard (no commit) reuses that shard on the rerun; same result."""
    reference = tmp_path / "ref.msa"
    encode_corpus([corpus], reference, model=str(tiny_model_dir), **SMALL)

    class Stop(Exception):
        pass

    def stop_after_first_shard(event: dict) -> None:
        if event["event"] == "shard":
            raise Stop

    store = tmp_path / "m.msa"
    with pytest.raises(Stop):
        encode_corpus([corpus], store, model=str(tiny_model_dir), progress=stop_after_first_shard, **SMALL)
    assert open_store(store).version == 0 and list((store / "_jobs").glob("*.json"))
    res = encode_corpus([corpus], store, model=str(tiny_model_dir), **SMALL)
    assert res.committed and res.shards_reused >= 1 and res.shards_written >= 1
    assert store_digest(store) == store_digest(reference)


def test_encode_refuses_another_model(tmp_path: Path, corpus: Path, tiny_model_dir: Path) -> None:
    encode_corpus([corpus], tmp_path / "m.msa", model=str(tiny_model_dir), **SMALL)
    other = write_tiny_model(tmp_path / "other-model", seed=1)
    edit(corpus / "part0" / "note000.md", "changed")
    with pytest.raises(IdentityMismatchError, match="model_fingerprint"):
        encode_corpus([corpus], tmp_path / "m.msa", model=str(other), **SMALL)
    assert open_store(tmp_path / "m.msa").latest_version() == 1


def test_encode_bad_inputs_are_skipped_and_reported(tmp_path: Path, corpus: Path, tiny_model_dir: Path) -> None:
    (corpus / "empty.md").write_text("")
    (corpus / "blob.md").write_bytes(b"\x00\x01\x02binary")
    (corpus / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    res = encode_corpus([corpus], tmp_path / "m.msa", model=str(tiny_model_dir), **SMALL)
    assert res.committed and len(res.files_added) == 12
    assert sorted(Path(s["path"]).name for s in res.skipped) == ["blob.md", "empty.md", "latin.txt"]
    assert all(s["reason"] for s in res.skipped)
    # a file that later becomes unreadable/empty keeps its documents (it is skipped, not deleted)
    edit(corpus / "part0" / "note000.md", "")
    res = encode_corpus([corpus], tmp_path / "m.msa", model=str(tiny_model_dir), **SMALL)
    assert not res.committed and "notes/part0/note000.md" in _keys(tmp_path / "m.msa")


def test_encode_config_errors(tmp_path: Path, corpus: Path, tiny_model_dir: Path) -> None:
    from msa_memory.errors import ConfigError, ModelLoadError

    with pytest.raises(ConfigError, match="does not exist"):
        encode_corpus([tmp_path / "nope"], tmp_path / "m.msa", model=str(tiny_model_dir))
    with pytest.raises(ConfigError):
        encode_corpus([corpus], tmp_path / "m.msa", model=str(tiny_model_dir), dtype="int8")
    with pytest.raises(ModelLoadError):
        encode_corpus([corpus], tmp_path / "m.msa", model=str(tmp_path / "no-model"))
    assert not (tmp_path / "m.msa").exists()
    # --store pointing at a folder that is not a store (and not empty) is refused; nothing is written there
    from msa_memory.errors import StoreExistsError

    with pytest.raises(StoreExistsError, match="not an empty directory"):
        encode_corpus([corpus], corpus / "part0", model=str(tiny_model_dir), **SMALL)
    assert sorted(p.name for p in (corpus / "part0").iterdir()) == ["note000.md", "note003.md", "note006.md", "note009.md"]
    # an empty folder is fine
    (tmp_path / "empty").mkdir()
    assert encode_corpus([corpus], tmp_path / "empty", model=str(tiny_model_dir), **SMALL).version == 1


def test_encode_on_a_client_passed_in_leaves_it_open(tmp_path: Path, corpus: Path, tiny_model_dir: Path) -> None:
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        kw = {k: v for k, v in SMALL.items() if k != "workers"}
        res = encode_corpus([corpus], tmp_path / "m.msa", model=str(tiny_model_dir), client=client, **kw)
        assert res.committed and res.shards_written >= 2
        assert client.status == "running"  # the caller's client is not closed by the job
        assert client.submit(lambda: 41 + 1).result() == 42
    reference = tmp_path / "ref.msa"
    encode_corpus([corpus], reference, model=str(tiny_model_dir), **SMALL)
    assert store_digest(tmp_path / "m.msa") == store_digest(reference)


def test_encode_keep_router_inputs_then_append_and_reindex(tmp_path: Path, corpus: Path, tiny_model_dir: Path) -> None:
    """--keep-router-inputs stores x_router; later runs keep them; reindex-router re-keys the store."""
    import numpy as np

    from msa_memory.encode import load_model
    from msa_memory.train.reindex import reindex_router

    root = tmp_path / "x.msa"
    encode_corpus([corpus], root, model=str(tiny_model_dir), keep_router_inputs=True, **SMALL)
    s = open_store(root)
    model = load_model(str(tiny_model_dir))
    assert s.identity.hidden_size == model.hidden_size > 0
    for layer in range(s.identity.n_layers):
        (x, cx), (k, ck) = s.router_inputs(layer), s.router_keys(layer)
        assert x.shape == (k.shape[0], model.hidden_size) and np.array_equal(cx, ck)
    # a later run without the flag follows the store (its identity keeps router inputs)
    (corpus / "new.md").write_text("A brand new note about the summit telescope schedule.\n")
    res = encode_corpus([corpus], root, model=str(tiny_model_dir), **SMALL)
    assert res.committed and res.files_added == ["notes/new.md"]
    s = open_store(root)
    x, cx = s.router_inputs(0)
    assert x.shape[0] == s.stats()["n_chunks"]
    # ... and can be re-keyed without re-encoding: same documents and content, new router id
    new, stats = reindex_router(s, tmp_path / "rekeyed.msa", model.router)
    assert stats["docs"] == s.stats()["n_docs"]
    ids = s.documents(columns=["doc_id"]).column(0).to_pylist()
    assert [a.tobytes() for a in new.load_kv(ids)] == [a.tobytes() for a in s.load_kv(ids)]


def test_encode_with_a_shifted_grid_resumes_bit_identical_and_updates_like_a_fresh_encode(
        tmp_path: Path, corpus: Path, tiny_model_dir: Path) -> None:
    """An adapter with shifted layers: the job keeps both grids; a job stopped after its first shard resumes
    to the uninterrupted result, shifted keys included; an edited file's shifted keys are a fresh encode's."""
    import hashlib
    import warnings

    from msa_memory.encode import UntrainedRouterWarning, load_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UntrainedRouterWarning)
        loaded = load_model(str(tiny_model_dir), router_layers="1,3")
    adapter = tmp_path / "adapter"
    loaded.router.with_shifted_layers([3]).save(adapter)
    kw = dict(model=str(tiny_model_dir), adapter=str(adapter), **SMALL)
    reference = tmp_path / "ref.msa"
    encode_corpus([corpus], reference, **kw)
    assert open_store(reference).identity.shifted_layers == (3,)

    class Stop(Exception):
        pass

    def stop(event: dict) -> None:
        if event["event"] == "shard":
            raise Stop

    store = tmp_path / "m.msa"
    with pytest.raises(Stop):
        encode_corpus([corpus], store, progress=stop, **kw)
    res = encode_corpus([corpus], store, **kw)
    assert res.shards_reused >= 1 and store_digest(store) == store_digest(reference)

    def shifted_by_source(root: Path) -> dict:
        s = open_store(root)
        src = dict(zip(*s.documents(columns=["doc_id", "source_path"]).to_pydict().values()))
        keys, docs = s.router_keys_shifted(0)
        out: dict = {}
        for d in sorted(set(docs.tolist())):
            out.setdefault(src[d], []).append(hashlib.sha256(keys[docs == d].tobytes()).hexdigest())
        return out

    edit(corpus / "part1" / "note001.md", "# Note 1\n\n" + "The dome now opens at 17:05. " * 9 + "\n")
    assert encode_corpus([corpus], store, **kw).files_replaced == ["notes/part1/note001.md"]
    fresh = tmp_path / "fresh.msa"
    encode_corpus([corpus], fresh, **kw)
    assert shifted_by_source(store) == shifted_by_source(fresh)
    assert open_store(store).verify()["ok"]
