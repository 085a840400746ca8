"""Peak memory of msa-encode does not grow with the size of a text file (issue 41, item 9).

The repro: ``msa-encode --dry-run`` on a 32 MB text file peaked at 4.4 GB with the default model
(a 200 MB file was killed at 22.7 GB). Then planning held each file's text and its passages (2-5 x
its size). Now a plain-text file is scanned, split and encoded from the file a block at a time: what
the plan keeps of a file is a record per passage (byte range, token count, id) and one shard task per
``shard_tokens`` tokens (a reference into the file), not its text.

The tests run real ``msa-encode`` children on the tiny random-weight model, on a small and on a big
generated text file, and compare their peak RSS. Each child is started by a small Python parent that
reports its ``ru_maxrss``: Linux charges a child the high-water RSS of the address space it ran in
before ``exec``, which for a child of this (large) pytest process is pytest's own. The bound on
``peak(big) - peak(small)`` comes from what grows with the file:

- one batch, the same for both files but reached in full only by the big one: ``BATCH_MB`` =
  64 MiB of fixed buffers (allocator arenas, the block cache of 16 x 256 KiB, Dask) + one tokenizer
  batch (``encode.passages._BATCH_CHARS`` characters, ~100 bytes per byte-level token in the
  tokenizer and its Python lists);
- the plan's records: per passage, in the plan a byte range, a token count and an id (32 bytes) and
  in its shard task a copy of the range and the id (24 bytes), with ``array`` over-allocation
  (1/8) and slack: ``PASSAGE_BYTES`` = 96; per shard task its objects besides those (task, part,
  3 numpy array headers, the index of its one or two blocks, key and id strings: 0.9 KiB under
  tracemalloc) times 4 for allocator slack: ``TASK_BYTES`` = 4096. Counts come from the run's report.

The old code held the text, so on the dry run (4 MiB vs 64 MiB) it needs >= 3 x 60 MiB more, over the
bound (~120 MiB): a watchdog kills a child as soon as its RSS passes the bound, so a regression fails
in seconds instead of filling the machine's memory. The real encode (256 KiB vs 2 MiB, every token
encoded at ~15K tokens/s) checks that encoding many shards adds nothing per shard.

Run: .venv/bin/python -m pytest tests/unit/jobs/test_plan_memory.py -q   (~10 min on a busy 2-core
machine: the byte-level tokenizer reads ~0.5 MB/s per pass)
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from msa_memory.encode import passages

BATCH_MB = 64 + 100 * passages._BATCH_CHARS / 2**20  # fixed buffers + one tokenizer batch
PASSAGE_BYTES = 96
TASK_BYTES = 4096
BIN = Path(sys.executable).parent


def _text_file(path: Path, n_bytes: int, seed: int = 0) -> Path:
    """Made-up paragraphs of 20-60 words (ASCII), ``n_bytes`` long, written in pieces."""
    words = ("dome telescope mirror night shift summit road weather humidity wind cryostat detector archive "
             "pipeline frame observer operator engineer pager rota fuel generator tank shuttle").split()
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        written = 0
        while written < n_bytes:
            para = " ".join(rng.choice(words) for _ in range(rng.randint(20, 60))) + f". Fact {written}.\n\n"
            para = para[: n_bytes - written]
            f.write(para)
            written += len(para)
    return path


#: the small parent: runs the command, writes the command's peak RSS (KiB) to argv[1]
_SHIM = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[2:]); "
         "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); sys.exit(rc)")


def _descendants_rss_kb(pid: int) -> int:
    """Resident KiB of the descendants of ``pid`` (``/proc/PID/task/*/children``)."""
    total, todo = 0, [(pid, False)]
    while todo:
        p, count = todo.pop()
        try:
            if count:
                with open(f"/proc/{p}/status") as f:
                    total += next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0)
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend((int(c), True) for c in f.read().split())
        except (OSError, ValueError):
            continue
    return total


def _peak(corpus: Path, store: Path, model: Path, log: Path, *args: str, kill_above_kb: int | None = None,
          timeout_s: float = 1200) -> tuple[int, int, dict]:
    """Run ``msa-encode --json ARGS`` in a child; (peak RSS in KiB, exit status, its JSON)."""
    peak_file = log.with_suffix(".maxrss")
    cmd = [sys.executable, "-c", _SHIM, str(peak_file), str(BIN / "msa-encode"), str(corpus), "--store", str(store),
           "--model", str(model), "--json", "--torch-threads", "1", *args]
    env = {**os.environ, "MSA_DISABLE_PROGRESS_BARS": "1", "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as out:
        child = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        killed: list[str] = []

        def watch() -> None:
            t0 = time.monotonic()
            while child.returncode is None and not killed:
                rss = _descendants_rss_kb(child.pid)
                if kill_above_kb is not None and rss > kill_above_kb:
                    killed.append(f"RSS {rss / 1024:.0f} MiB passed the bound {kill_above_kb / 1024:.0f} MiB")
                elif time.monotonic() - t0 > timeout_s:
                    killed.append(f"still running after {timeout_s:.0f} s")
                if killed:
                    os.killpg(child.pid, signal.SIGKILL)  # the small parent and msa-encode under it
                    return
                time.sleep(0.05)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        child.wait()
        watcher.join()
    assert not killed, f"msa-encode {' '.join(args)} on {corpus}: {killed[0]}"
    text = log.read_text(errors="replace")
    assert child.returncode == 0, text[-2000:]
    return int(peak_file.read_text()), child.returncode, json.loads(text.strip().splitlines()[-1])


def _n_tasks(res: dict) -> int:
    return int(res["message"].split()[2]) if res["dry_run"] else res["shards_written"]  # "dry run: N shard(s) ..."


def _records(res: dict) -> int:
    """Bytes the plan's records may take (module note): per passage and per shard task of a run's report."""
    return PASSAGE_BYTES * res["docs_added"] + TASK_BYTES * _n_tasks(res)


def _compare(tmp_path: Path, model: Path, small_bytes: int, big_bytes: int, *args: str) -> None:
    """Peak RSS of ``msa-encode ARGS`` on a big file minus that on a small one <= the bound of the module note."""
    _text_file(tmp_path / "small" / "notes.txt", small_bytes)
    _text_file(tmp_path / "big" / "notes.txt", big_bytes, seed=1)
    small_kb, _, small = _peak(tmp_path / "small", tmp_path / "s.msa", model, tmp_path / "small.log", *args)
    # the kill bound, before the big run's counts are known: the small run's passages and shards a byte, x 1.25
    scale = 1.25 * big_bytes / small_bytes
    worst_kb = small_kb + int((BATCH_MB * 2**20 + scale * _records(small)) / 1024)
    peak_kb, _, big = _peak(tmp_path / "big", tmp_path / "b.msa", model, tmp_path / "big.log", *args,
                            kill_above_kb=worst_kb)
    for res, n in ((small, small_bytes), (big, big_bytes)):
        assert res["skipped"] == [] and res["tokens_planned"] >= n * 0.99  # byte-level: a token per byte
    bound_kb = small_kb + int((BATCH_MB * 2**20 + _records(big)) / 1024)
    grew = (peak_kb - small_kb) / 1024
    print(f"msa-encode {' '.join(args)}: {small_bytes / 2**20:g} MiB file: peak {small_kb / 1024:.0f} MiB; "
          f"{big_bytes / 2**20:g} MiB file: {peak_kb / 1024:.0f} MiB (+{grew:.0f} MiB for "
          f"{(big_bytes - small_bytes) / 2**20:g} MiB more text, {big['docs_added']} passages, {_n_tasks(big)} shards); "
          f"bound +{(bound_kb - small_kb) / 1024:.0f} MiB")
    assert peak_kb <= bound_kb


@pytest.mark.slow
def test_dry_run_peak_rss_does_not_grow_with_the_file(tmp_path: Path, tiny_model_dir: Path) -> None:
    _compare(tmp_path, tiny_model_dir, 4 * 2**20, 64 * 2**20, "--dry-run", "--max-file-mb", "100")


@pytest.mark.slow
def test_encode_peak_rss_does_not_grow_with_the_file(tmp_path: Path, tiny_model_dir: Path) -> None:
    _compare(tmp_path, tiny_model_dir, 2**18, 2**21, "--shard-tokens", "65536")
