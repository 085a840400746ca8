"""msa-encode against a real Dask cluster: the test starts `dask scheduler` and two `dask worker`
processes on 127.0.0.1 and runs `msa-encode --scheduler tcp://127.0.0.1:PORT` as a subprocess.

The committed content must equal that of a local (in-process) run of the same job (router keys
within one bf16 ulp: the torch thread count differs, see jobkit.assert_same_content).
Run: .venv/bin/python -m pytest tests/cli/test_encode_cluster.py -q
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from jobkit import assert_same_content

from msa_memory.jobs import encode_corpus

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_workers(address: str, n: int, timeout: float = 90.0) -> None:
    from distributed import Client

    with Client(address, timeout="30s") as c:
        c.wait_for_workers(n, timeout=timeout)


def test_msa_encode_on_a_real_cluster(tmp_path: Path, corpus: Path, tiny_model_dir: Path) -> None:
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "MSA_DISABLE_PROGRESS_BARS": "1", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--no-dashboard"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)]
    try:
        for i in range(2):
            procs.append(subprocess.Popen(
                [str(BIN / "dask"), "worker", address, "--nthreads", "1", "--name", f"w{i}", "--no-dashboard",
                 "--local-directory", str(tmp_path / f"w{i}")],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        _wait_for_workers(address, 2)
        store = tmp_path / "cluster.msa"
        p = subprocess.run([str(BIN / "msa-encode"), str(corpus), "--store", str(store), "--model", str(tiny_model_dir),
                            "--scheduler", address, "--torch-threads", "1", "--shard-tokens", "400", "--max-passage-tokens", "256", "--json"],
                           capture_output=True, text=True, env=env, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        res = json.loads(p.stdout.strip().splitlines()[-1])
        assert res["committed"] and res["version"] == 1 and res["shards_written"] >= 3
        # the content equals an in-process run of the same job (which worker ran which shard is Dask's choice)
        local = tmp_path / "local.msa"
        encode_corpus([corpus], local, model=str(tiny_model_dir), shard_tokens=400, max_passage_tokens=256, workers=1,
                      torch_threads=1)
        assert_same_content(store, local, router_ulps=1)  # 1 torch thread per worker vs 2 in-process
    finally:
        for proc in reversed(procs):
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.time() + 20
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
