"""msa-encode onto an S3 bucket (issue 40 item 3): a real S3-compatible server on loopback (moto's server
mode in a child process, the ``s3_server`` / ``s3_url`` fixtures of tests/conftest.py), the tiny model.

Oracles:
- end to end: ``msa-encode DIR --store s3://...`` commits version 1 with the same documents and
  bit-identical tensors as the same job into a local folder; its journal (``_jobs/``) was on the bucket
  and is gone after the commit; ``msa search`` / ``msa ask`` on the URL answer as on the local store;
  a rerun after one file is edited, one added and one deleted encodes only those (version 2), and an
  unchanged rerun commits nothing;
- kill and resume: a real ``msa-encode`` process SIGKILLed after it finished some shards leaves the
  bucket at version 0 with its journal and shards there (``gc`` lists the shards as uncommitted
  debris); the same command again reuses them (checksum-verified) and encodes the rest, and the
  final store equals an uninterrupted run's; nothing is left for gc;
- Dask: a scheduler and 2 worker processes whose environment has no endpoint and no credentials
  (they share nothing with the client but the bucket); the job is given an ``S3Backend`` with
  options, which the workers reopen from its URL and options and write their shards straight to;
  the content equals an in-process run's.
Skipped, with the reason, when moto[server] or obstore is not installed.
Run: .venv/bin/python -m pytest tests/cli/test_encode_s3.py -q   (about a minute)
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

import pytest
from jobkit import assert_same_content, edit, make_corpus, store_digest

from msa_memory.jobs import encode_corpus
from msa_memory.store import open_store
from msa_memory.store._layout import open_backend

BIN = Path(sys.executable).parent
ARGS = ["--shard-tokens", "400", "--max-passage-tokens", "256", "--torch-threads", "1"]
KW = {"shard_tokens": 400, "max_passage_tokens": 256, "workers": 1, "torch_threads": 1}


def _tail(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def _finished_shards(url: str) -> list[str]:
    be = open_backend(url)
    return [s for s in be.list("shards") if be.probe(f"shards/{s}/_record.json")]


def test_msa_encode_onto_a_bucket_then_search_ask_and_an_incremental_rerun(
        s3_url: str, corpus: Path, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from msa_memory.cli import app, encode_app

    monkeypatch.setenv("MSA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)   # nothing may appear as a local folder named after the URL
    runner = CliRunner()
    enc = [str(corpus), "--store", s3_url, "--model", str(tiny_model_dir), *ARGS, "--json"]
    r = runner.invoke(encode_app, enc)
    assert r.exit_code == 0, r.output
    res = _tail(r.stdout)
    assert res["committed"] and res["version"] == 1 and res["store"] == s3_url and res["shards_written"] >= 2
    assert open_backend(s3_url).list("_jobs") == []      # the journal was on the bucket; removed after the commit
    assert not (tmp_path / "s3:").exists()
    local = tmp_path / "local.msa"
    encode_corpus([corpus], local, model=str(tiny_model_dir), **KW)
    assert_same_content(s3_url, local)                   # type: ignore[arg-type]
    assert open_store(s3_url).verify()["ok"]

    model = ["--model", str(tiny_model_dir), "--device", "cpu"]
    hits = {}
    for where in (s3_url, str(local)):
        r = runner.invoke(app, ["search", where, "fuel generator tank", "-k", "3", *model, "--json"])
        assert r.exit_code == 0, r.output
        hits[where] = [h["source_path"] for h in _tail(r.stdout)["results"]]
    assert hits[s3_url] == hits[str(local)] and len(hits[s3_url]) == 3
    r = runner.invoke(app, ["ask", s3_url, "What is fact 3?", "-k", "2", "--max-new-tokens", "2", *model, "--json"])
    assert r.exit_code == 0, r.output
    assert len(_tail(r.stdout)["rounds"][0]["docs"]) == 2

    # incremental: one file edited, one added, one deleted -> only those are encoded
    edit(corpus / "part1" / "note001.md", "# Note 1\n\nThe generator fuel tank was refilled on Tuesday.\n")
    (corpus / "part0" / "note099.md").write_text("# Note 99\n\nThe dome opens at dusk when the humidity is low.\n")
    (corpus / "part2" / "note002.md").unlink()
    r = runner.invoke(encode_app, enc)
    assert r.exit_code == 0, r.output
    res = _tail(r.stdout)
    assert res["committed"] and res["version"] == 2
    assert res["files_added"] == ["notes/part0/note099.md"] and res["files_replaced"] == ["notes/part1/note001.md"]
    assert res["files_deleted"] == ["notes/part2/note002.md"] and res["files_unchanged"] == 6
    assert res["docs_added"] == 2 and res["shards_written"] == 1
    s = open_store(s3_url)
    paths = set(s.documents(columns=["source_path"]).column("source_path").to_pylist())
    assert "notes/part2/note002.md" not in paths and "notes/part0/note099.md" in paths and s.verify()["ok"]
    r = runner.invoke(encode_app, enc)
    assert r.exit_code == 0 and not _tail(r.stdout)["committed"] and open_store(s3_url).version == 2


def test_msa_encode_killed_on_a_bucket_then_resumed(s3_url: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    corpus = make_corpus(tmp_path / "notes", 9, words=(120, 200))
    args = ["--model", str(tiny_model_dir), "--shard-tokens", "1200", "--max-passage-tokens", "512",
            "--torch-threads", "1", "--json"]
    env = {**os.environ, "MSA_DISABLE_PROGRESS_BARS": "1"}
    cmd = [str(BIN / "msa-encode"), str(corpus), "--store", s3_url, *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True)
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        try:
            if len(_finished_shards(s3_url)) >= 2:
                break
        except Exception:  # noqa: BLE001 - the store is not created yet
            pass
        time.sleep(0.05)
    if proc.poll() is not None:
        pytest.fail(f"the job ended before it could be killed (rc={proc.returncode}); make the corpus bigger")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    finished = _finished_shards(s3_url)
    s = open_store(s3_url)
    assert s.latest_version() == 0 and len(open_backend(s3_url).list("_jobs")) == 1   # nothing published
    orphans = {o["path"] for o in s.gc(dry_run=True, grace_s=0)["orphans"]}
    assert {f"shards/{x}" for x in finished} <= orphans, orphans                     # gc sees the debris

    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    res = _tail(p.stdout)
    assert res["committed"] and res["version"] == 1
    assert len(finished) >= 2 and 2 <= res["shards_reused"] <= len(finished) and res["shards_written"] >= 1
    assert open_backend(s3_url).list("_jobs") == []
    reference = tmp_path / "uninterrupted.msa"
    encode_corpus([corpus], reference, model=str(tiny_model_dir), shard_tokens=1200, max_passage_tokens=512,
                  workers=1, torch_threads=1)
    assert store_digest(s3_url) == store_digest(reference)          # type: ignore[arg-type]
    s = open_store(s3_url)
    assert s.verify()["ok"] and s.gc(dry_run=True, grace_s=0)["orphans"] == []      # the killed job's shards adopted


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_dask_workers_sharing_only_the_bucket_write_the_shards(
        s3_server, s3_url: str, corpus: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    from distributed import Client

    from msa_memory.store._s3 import S3Backend
    from msa_memory.testing.s3_server import ACCESS_KEY, REGION, SECRET_KEY

    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    # the workers get no endpoint and no credentials: only what the job hands them (URL + options)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update({"AWS_ALLOW_HTTP": "true", "MSA_DISABLE_PROGRESS_BARS": "1", "OMP_NUM_THREADS": "1"})
    procs = [subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--no-dashboard"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)]
    try:
        for i in range(2):
            procs.append(subprocess.Popen(
                [str(BIN / "dask"), "worker", address, "--nthreads", "1", "--name", f"w{i}", "--no-dashboard",
                 "--local-directory", str(tmp_path / f"w{i}")],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        with Client(address, timeout="30s") as c:
            c.wait_for_workers(2, timeout=90)
            options = {"endpoint": s3_server.endpoint, "access_key_id": ACCESS_KEY, "secret_access_key": SECRET_KEY,
                       "region": REGION}
            bucket = S3Backend(s3_url, options=options)
            res = encode_corpus([corpus], bucket, model=str(tiny_model_dir), client=c, shard_tokens=300,
                                max_passage_tokens=256, torch_threads=1)
        # the workers could reach the bucket only through the options the backend pickled with its URL
        assert res.committed and res.version == 1 and res.store == s3_url and res.shards_written >= 3
        local = tmp_path / "local.msa"
        encode_corpus([corpus], local, model=str(tiny_model_dir), shard_tokens=300, max_passage_tokens=256, workers=1,
                      torch_threads=1)
        assert_same_content(s3_url, local, router_ulps=1)   # type: ignore[arg-type]  # 1 torch thread vs 2
        assert open_store(s3_url).verify()["ok"] and open_backend(s3_url).list("_jobs") == []
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


def test_encode_token_ids_onto_a_bucket(s3_url: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    from msa_memory.encode.tiny import tiny_tokenizer
    from msa_memory.jobs import encode_token_ids

    tok = tiny_tokenizer()
    docs = {k: tok(t, add_special_tokens=False)["input_ids"] for k, t in
            [("door", "The blue door code is 4471."), ("cats", "Cats sleep all day in the barn.")]}
    kw = {"model": str(tiny_model_dir), "shard_tokens": 40, "workers": 1, "torch_threads": 1}
    res = encode_token_ids(docs, s3_url, **kw)
    assert res.committed and res.version == 1 and res.store == s3_url and res.shards_written == 2
    local = tmp_path / "ids.msa"
    encode_token_ids(docs, local, **kw)
    assert store_digest(s3_url) == store_digest(local)            # type: ignore[arg-type]
    assert not encode_token_ids(docs, s3_url, **kw).committed      # unchanged: nothing to do
    assert open_backend(s3_url).list("_jobs") == []
