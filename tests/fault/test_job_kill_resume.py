"""Kill-and-resume of msa-encode: a real SIGKILL mid-job, then the same command again.

Oracles: after the kill the store still reads as version 0 (nothing committed); the rerun reuses
the shards the killed job finished (checksum-verified by the store) and encodes only the rest;
the final store holds the same documents with bit-identical tensors as an uninterrupted run.
Run: .venv/bin/python -m pytest tests/fault/test_job_kill_resume.py -q
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit" / "jobs"))

from jobkit import make_corpus, store_digest, write_tiny_model  # noqa: E402

from msa_memory.jobs import encode_corpus  # noqa: E402
from msa_memory.store import open_store  # noqa: E402

BIN = Path(sys.executable).parent


def _finished_shards(store: Path) -> int:
    return sum(1 for _ in (store / "shards").glob("*/_record.json")) if (store / "shards").exists() else 0


def test_sigkill_mid_job_then_resume_is_bit_identical(tmp_path: Path) -> None:
    model = write_tiny_model(tmp_path / "model")
    corpus = make_corpus(tmp_path / "notes", 60, words=(120, 200))
    args = ["--model", str(model), "--shard-tokens", "1200", "--max-passage-tokens", "512", "--torch-threads", "1"]
    env = {**os.environ, "MSA_DISABLE_PROGRESS_BARS": "1"}
    store = tmp_path / "killed.msa"
    proc = subprocess.Popen([str(BIN / "msa-encode"), str(corpus), "--store", str(store), *args, "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True)
    deadline = time.time() + 240
    while _finished_shards(store) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    if proc.poll() is not None:
        pytest.fail(f"the job ended before it could be killed (rc={proc.returncode}); make the corpus bigger")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    killed_at = _finished_shards(store)
    assert open_store(store).latest_version() == 0  # nothing was published

    p = subprocess.run([str(BIN / "msa-encode"), str(corpus), "--store", str(store), *args, "--json"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["committed"] and res["version"] == 1
    assert res["shards_reused"] >= 3 and res["shards_reused"] <= killed_at
    assert res["shards_written"] >= 1  # the rest was encoded

    reference = tmp_path / "uninterrupted.msa"
    encode_corpus([corpus], reference, model=str(model), shard_tokens=1200, max_passage_tokens=512, workers=1,
                  torch_threads=1)
    assert store_digest(store) == store_digest(reference)
    assert open_store(store).verify()["ok"]
