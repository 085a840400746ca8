"""An encode job whose uncommitted shard is removed under it by a real `msa store gc --grace-s 0`.

The store is fine (nothing committed is lost), so the job must say what happened and what to do
(rerun; give gc a longer grace period), not send the user to a backup.
Run: .venv/bin/python -m pytest tests/unit/jobs/test_job_interference.py -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from msa_memory.errors import JobError
from msa_memory.jobs import encode_corpus
from msa_memory.store import open_store

BIN = Path(sys.executable).parent


def test_gc_removing_the_jobs_uncommitted_shard_is_explained(tmp_path: Path, corpus: Path, tiny_model_dir: Path) -> None:
    store = tmp_path / "m.msa"
    env = {**os.environ, "MSA_DISABLE_PROGRESS_BARS": "1"}
    gc_runs: list[subprocess.CompletedProcess[str]] = []

    def gc_between_shard_and_commit(event: dict) -> None:   # the job's one shard is on disk, not yet committed
        if event["event"] == "shard" and not gc_runs:
            gc_runs.append(subprocess.run([str(BIN / "msa"), "store", "gc", str(store), "--grace-s", "0", "--yes", "--json"],
                                          capture_output=True, text=True, env=env, timeout=300))

    kw = dict(model=str(tiny_model_dir), shard_tokens=10**6, workers=1, torch_threads=1)
    with pytest.raises(JobError) as caught:
        encode_corpus([corpus], store, progress=gc_between_shard_and_commit, **kw)
    assert gc_runs and gc_runs[0].returncode == 0, gc_runs and gc_runs[0].stderr[-2000:]
    removed = json.loads(gc_runs[0].stdout.strip().splitlines()[-1])["orphans"]
    assert [o["kind"] for o in removed].count("shard") == 1
    msg = str(caught.value)
    assert "removed" in msg and "msa store gc" in msg and "--grace-s" in msg and "Rerun" in msg, msg
    assert "nothing committed is lost" in msg and "version 0" in msg and "backup" not in msg, msg
    assert "\n" not in msg
    s = open_store(store)
    assert s.latest_version() == 0 and s.verify()["ok"]
    res = encode_corpus([corpus], store, **kw)   # what the message says to do
    assert res.committed and res.version == 1 and open_store(store).verify()["ok"]


def test_gc_removing_a_shard_being_written_is_explained(tmp_path: Path, corpus: Path, tiny_model_dir: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """gc runs while the worker writes the shard (its staging folder goes, the rest is still written)."""
    from msa_memory.store import shards

    store = tmp_path / "m.msa"
    env = {**os.environ, "MSA_DISABLE_PROGRESS_BARS": "1"}
    gc_runs: list[subprocess.CompletedProcess[str]] = []

    def gc_mid_write(point: str) -> None:
        if point == "shard:kv" and not gc_runs:
            gc_runs.append(subprocess.run([str(BIN / "msa"), "store", "gc", str(store), "--grace-s", "0", "--yes"],
                                          capture_output=True, text=True, env=env, timeout=300))

    monkeypatch.setattr(shards, "fault_hook", gc_mid_write)
    # device cpu: the worker runs in this process, where the hook is (with a GPU the job runs worker processes)
    kw = dict(model=str(tiny_model_dir), shard_tokens=10**6, workers=1, torch_threads=1, device="cpu")
    with pytest.raises(JobError) as caught:
        encode_corpus([corpus], store, **kw)
    assert gc_runs and gc_runs[0].returncode == 0 and "staging" in gc_runs[0].stdout, gc_runs and gc_runs[0].stderr
    msg = str(caught.value)
    assert "removed, whole or in part" in msg and "msa store gc" in msg and "nothing committed is lost" in msg, msg
    monkeypatch.undo()
    assert open_store(store).latest_version() == 0
    res = encode_corpus([corpus], store, **kw)   # the damaged shard is set aside and encoded again
    assert res.committed and res.version == 1 and open_store(store).verify()["ok"]
