"""`msa ask` / `msa search` on a tiny MSA checkpoint + store: exit codes, key lines, final JSON line.
Run: .venv/bin/python -m pytest tests/unit/runtime/test_cli_ask.py -q
"""

from __future__ import annotations

import json

from typer.testing import CliRunner

from msa_memory.cli import app

runner = CliRunner()


def _args(tiny_store, tiny_msa_model):
    return [str(tiny_store.root), "--model", tiny_msa_model.source["path"], "--device", "cpu"]


def test_cli_search_json_lists_k_documents(tiny_store, tiny_msa_model):
    store, *rest = _args(tiny_store, tiny_msa_model)
    res = runner.invoke(app, ["search", store, "blue door code", "-k", "3", *rest, "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert [r["rank"] for r in out["results"]] == [1, 2, 3]
    assert all(r["source_path"].startswith("notes/") for r in out["results"])


def test_cli_search_centre_queries_ranks_as_memory_does(tiny_store, tiny_msa_model, tmp_path, monkeypatch):
    from msa_memory.runtime import Memory

    monkeypatch.setenv("MSA_CACHE_DIR", str(tmp_path))
    store, *rest = _args(tiny_store, tiny_msa_model)
    res = runner.invoke(app, ["search", store, "blue door code", "-k", "4", *rest, "--centre-queries", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    mem = Memory(tiny_store, model=tiny_msa_model.source["path"], device="cpu")   # loaded as the CLI loads it (its
    mem.centre_queries("store")                                                  # dtype: bf16 on AVX512-BF16 CPUs)
    want = mem.search("blue door code", k=4).to_pylist()
    assert out["centre_queries"] is True
    assert [r["doc_id"] for r in out["results"]] == [r["doc_id"] for r in want]
    assert [r["score"] for r in out["results"]] == [r["score"] for r in want]


def test_cli_ask_prints_answer_sources_and_json(tiny_store, tiny_msa_model):
    store, *rest = _args(tiny_store, tiny_msa_model)
    res = runner.invoke(app, ["ask", store, "What is the blue door code?", "--mode", "text", "-k", "2",
                              "--max-new-tokens", "3", *rest])
    assert res.exit_code == 0, res.output
    assert "sources (text, 1 round(s)):" in res.output and "notes/" in res.output
    res = runner.invoke(app, ["ask", store, "What is the blue door code?", "--mode", "pooled",
                              "--max-new-tokens", "2", *rest, "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["mode"] == "pooled" and set(out["rounds"][0]["per_layer"]) == {"0", "1"}


def test_cli_ask_bad_mode_is_a_usage_error(tiny_store, tiny_msa_model):
    store, *rest = _args(tiny_store, tiny_msa_model)
    res = runner.invoke(app, ["ask", store, "q?", "--mode", "fast", *rest, "--json"])
    assert res.exit_code == 2
    assert json.loads(res.stdout.strip().splitlines()[-1])["type"] == "ConfigError"
