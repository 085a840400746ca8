"""Peak memory of planning one big file is its size times a small constant (issue 41, item 9).

The repro: ``msa-encode --dry-run`` on a 32 MB text file peaked at 4.4 GB with the default model
(a 200 MB file was killed at 22.7 GB): the passage splitter tokenized the whole text in one call,
several times over, holding every token's encoding at once. Now it counts in bounded batches.

The test runs real ``msa-encode --dry-run`` children on the tiny random-weight model: first on a
one-line file (the baseline: Python, torch, the model, Dask imports), then on a generated
``BIG_MB`` text file, and compares their peak RSS. Each is started by a small Python parent that
reports its ``ru_maxrss``: Linux charges a child the high-water RSS of the address space it ran in
before ``exec``, which for a child of this (large) pytest process is pytest's own.
The bound comes from what the plan holds for one ASCII file of F bytes:

- the file's bytes while it is read and hashed (F, freed after decoding) and its text (F, held by
  the scan's ``SourceText``);
- the passages' texts (F) and their records: ``Passage`` objects, counts and shard tasks, a few
  hundred bytes per passage of at most 512 byte-level tokens (<= 1 F here);
- allocator slack on all of that (freed chunks are not always returned to the OS): <= 1 F;

so at most 5 F, plus ``BATCH_MB`` for one tokenizer batch (``encode.passages._BATCH_CHARS``
characters, ~100 bytes per byte-level token in the tokenizer and its Python lists) and the other
fixed buffers. A watchdog kills a child as soon as its RSS passes the bound, so a regression fails
in seconds instead of filling the machine's memory.

Run: .venv/bin/python -m pytest tests/unit/jobs/test_plan_memory.py -q   (~1-2 min: the tiny model's
byte-level tokenizer reads ~0.5 MB/s per pass on a busy 2-core machine)
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

BIG_MB = 16
FACTOR = 5
BATCH_MB = 64 + 100 * passages._BATCH_CHARS / 2**20  # fixed buffers + one tokenizer batch
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


def _dry_run_peak(corpus: Path, store: Path, model: Path, log: Path, kill_above_kb: int | None = None,
                  timeout_s: float = 900) -> tuple[int, int, dict]:
    """Run ``msa-encode --dry-run --json`` in a child; (peak RSS in KiB, exit status, its JSON)."""
    peak_file = log.with_suffix(".maxrss")
    cmd = [sys.executable, "-c", _SHIM, str(peak_file), str(BIN / "msa-encode"), str(corpus), "--store", str(store),
           "--model", str(model), "--dry-run", "--json", "--torch-threads", "1"]
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
    assert not killed, f"msa-encode --dry-run on {corpus}: {killed[0]}"
    text = log.read_text(errors="replace")
    assert child.returncode == 0, text[-2000:]
    return int(peak_file.read_text()), child.returncode, json.loads(text.strip().splitlines()[-1])


@pytest.mark.slow
def test_dry_run_peak_rss_is_file_size_times_a_small_factor(tmp_path: Path, tiny_model_dir: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    (small / "a.txt").write_text("A one-line note about the dome.\n")
    base_kb, _, res = _dry_run_peak(small, tmp_path / "s.msa", tiny_model_dir, tmp_path / "small.log")
    assert res["docs_added"] == 1

    size = BIG_MB * 2**20
    _text_file(tmp_path / "big" / "big.txt", size)
    bound_kb = base_kb + int((FACTOR * size / 2**20 + BATCH_MB) * 1024)
    peak_kb, _, res = _dry_run_peak(tmp_path / "big", tmp_path / "b.msa", tiny_model_dir, tmp_path / "big.log",
                                    kill_above_kb=bound_kb)
    assert res["skipped"] == [] and res["tokens_planned"] >= size * 0.99  # byte-level: a token per byte
    extra_mb = (peak_kb - base_kb) / 1024
    print(f"baseline {base_kb / 1024:.0f} MiB; {BIG_MB} MiB file: peak {peak_kb / 1024:.0f} MiB "
          f"(+{extra_mb:.0f} MiB = {extra_mb / BIG_MB:.1f} x the file); bound +{(bound_kb - base_kb) / 1024:.0f} MiB")
    assert peak_kb <= bound_kb
