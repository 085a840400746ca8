"""``--tokenizer`` on ``msa-encode``, ``msa search`` and ``msa ask`` for a checkpoint saved without tokenizer files.

A tiny MSA checkpoint in the reference's spelling with no tokenizer files: without ``--tokenizer``
each command exits 1 with one line naming the checkpoint folder and ``--tokenizer``; with it,
msa-encode commits and search/ask answer from the store.

Run: ``.venv/bin/python -m pytest tests/cli/test_tokenizer_option.py -q``
"""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from msa_memory.cli import app, encode_app
from msa_memory.encode.tiny import tiny_tokenizer, write_tiny_msa_checkpoint

runner = CliRunner()


def _tail(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_tokenizer_option_loads_a_checkpoint_without_tokenizer(tmp_path: Path, corpus: Path) -> None:
    ckpt = write_tiny_msa_checkpoint(tmp_path / "ckpt", tokenizer=False, pooling_kernel_size=16)
    tiny_tokenizer().save_pretrained(str(tmp_path / "tok"))
    store = tmp_path / "m.msa"
    enc = [str(corpus), "--store", str(store), "--model", str(ckpt), "--torch-threads", "1", "--device", "cpu"]
    r = runner.invoke(encode_app, enc)
    assert r.exit_code == 1 and r.output.startswith("error: MSA checkpoint") and str(ckpt) in r.output
    assert "--tokenizer" in r.output and r.output.count("\n") <= 2 and not (store / "versions").exists()
    r = runner.invoke(encode_app, [*enc, "--tokenizer", str(tmp_path / "tok"), "--json"])
    assert r.exit_code == 0, r.output
    assert _tail(r.stdout)["committed"]
    rest = ["--model", str(ckpt), "--device", "cpu"]
    r = runner.invoke(app, ["search", str(store), "dome telescope", "-k", "2", *rest, "--json"])
    assert r.exit_code == 1 and _tail(r.stdout)["type"] == "ModelLoadError" and "--tokenizer" in r.stdout
    r = runner.invoke(app, ["search", str(store), "dome telescope", "-k", "2", *rest, "--tokenizer", str(tmp_path / "tok"),
                            "--json"])
    assert r.exit_code == 0, r.output
    assert len(_tail(r.stdout)["results"]) == 2
    r = runner.invoke(app, ["ask", str(store), "Which dome?", "--mode", "pooled", "--max-new-tokens", "2", *rest,
                            "--tokenizer", str(tmp_path / "tok"), "--json"])
    assert r.exit_code == 0, r.output
    assert _tail(r.stdout)["mode"] == "pooled"
