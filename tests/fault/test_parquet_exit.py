"""A process that reads a store's Parquet tables exits cleanly: no abort at interpreter exit.

The repro: ``test_gc_keeps_what_a_reader_process_has_open``'s reader process printed its result and then
died with SIGABRT ("terminate called without an active exception") in about one run in thirty on a busy
2-core machine; a bare ``pq.read_table(python_file)`` aborted 24 times in 300 runs with a second such loop
beside it. That is Arrow's read-ahead (``pre_buffer``) leaving a native thread that is torn down while it
is alive at exit (apache/arrow#34314). ``store._layout.read_parquet`` reads with ``pre_buffer=False`` and
``use_threads=False`` (the backends' files already buffer: 1 MiB reads on object storage).

Here: two loops side by side (each the load beside the other), 40 short processes each, every one
reading a shard's documents table through ``read_parquet`` and exiting; every exit code must be 0. On a
2-core CPU it failed 6 runs in 6 before (one or two aborts in 80 processes; ``pre_buffer=False`` alone still
aborted) and passed 6 in 6 after.
Run: .venv/bin/python -m pytest tests/fault/test_parquet_exit.py -q
"""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from msa_memory.store import create_store
from msa_memory.testing.store_kit import add_docs, tiny_identity

_CHILD = """
import sys
from msa_memory.store._layout import open_backend, read_parquet
t = read_parquet(open_backend(sys.argv[1]), sys.argv[2], "docs", "none")
print(t.num_rows)
"""
RUNS = 40


def _loop(root: str, key: str) -> list[tuple[int, str]]:
    bad = []
    for _ in range(RUNS):
        p = subprocess.run([sys.executable, "-c", _CHILD, root, key], capture_output=True, text=True, timeout=120)
        if p.returncode != 0:
            bad.append((p.returncode, p.stderr[-300:]))
    return bad


def test_processes_reading_parquet_exit_with_code_zero(tmp_path):
    s = create_store(tmp_path / "mem.msa", tiny_identity(hidden_size=2))
    s, *_ = add_docs(s, [5, 9, 3], np.random.default_rng(0), "a")
    key = next(k for k in (p.relative_to(s.root).as_posix() for p in s.root.rglob("*.parquet")))
    with ThreadPoolExecutor(2) as pool:
        bad = [b for res in pool.map(lambda _: _loop(str(s.root), key), range(2)) for b in res]
    assert not bad, f"{len(bad)} of {2 * RUNS} reader processes did not exit with 0: {bad[:3]}"
