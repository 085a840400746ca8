"""``msa train-reader`` end to end on the real default model, at a tiny scale: it makes the training corpus
and store, trains, writes a loadable reader adapter and its checkpoint, and ``--resume`` goes on from the
checkpoint's step.

Repro of what it guards: a refactor once cut ``run_reader_training`` out of ``train/reader.py`` and every
unit test still passed, while the command failed with an ImportError. Slow (the default model, a 10-passage
store, a few steps): marked ``slow``.
Run: .venv/bin/python -m pytest tests/cli/test_train_reader_cli.py -q
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from msa_memory.cli import app

runner = CliRunner()
TINY = ["--passages", "10", "--batch-size", "1", "--rank", "2", "--layers", "0,1", "--targets", "q_proj",
        "--eval-every", "1", "--n-dev", "1", "--k", "2", "--seed", "2", "--json"]   # seed 2: 10 passages with dev facts


@pytest.mark.slow
def test_train_reader_trains_saves_and_resumes(tmp_path):
    from msa_memory.runtime.reader import ReaderAdapter

    data, out = tmp_path / "data", tmp_path / "reader"
    res = runner.invoke(app, ["train-reader", "--data", str(data), "--out", str(out), "--steps", "1", *TINY])
    assert res.exit_code == 0, res.output
    first = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(first["history"]) == 1 and first["params"] > 0
    assert (data / "mem.msa").is_dir() and (data / "questions.jsonl").is_file() and (out / "checkpoint.pt").is_file()
    ad = ReaderAdapter.load(out)
    assert ad.config.layers == [0, 1] and ad.config.targets == ["q_proj"] and ad.config.extra["step"] == 1
    res = runner.invoke(app, ["train-reader", "--data", str(data), "--out", str(out), "--steps", "2", "--resume", *TINY])
    assert res.exit_code == 0, res.output
    again = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(again["history"]) == 1 and ReaderAdapter.load(out).config.extra["step"] == 2
