"""Memory Parallel through ``Memory`` (the sharded indexes themselves: ``tests/unit/routing/test_parallel.py``):

- ``Memory(devices=[...])`` against ``Memory()`` on a tiny random MSA model: search, pooled answers and the
  per-layer routes, with one merge per router layer in a prefill and one gather per search;
- ``Memory(distributed=True)`` in two real processes joined by gloo (``torch.multiprocessing``): every rank
  gets the single-process routes and answer tokens while holding only its shard's keys.
"""

from __future__ import annotations

import json
import os
import socket
import sys

import numpy as np
import pytest
import torch

from msa_memory.errors import ConfigError
from msa_memory.routing.parallel import ShardedRouterIndex

WORDS = "apple river door code blue red cat meeting orchard sea barn map green north east lobby".split()
QUESTIONS = ["blue door code", "what grows in the orchard", "item 7", "the meeting in the east lobby"]


# ---------------------------------------------------------------- Memory on a tiny random MSA model
@pytest.fixture(scope="module")
def msa_setup(tmp_path_factory, store_builder):
    from msa_memory.encode.model import load_model
    from msa_memory.encode.tiny import write_tiny_msa_checkpoint

    build_store, _ = store_builder
    d = tmp_path_factory.mktemp("parallel")
    path = write_tiny_msa_checkpoint(d / "msa", pooling_kernel_size=16, extra_msa_config={"top_k_docs": 3})
    model = load_model(str(path), dtype=torch.float32)
    rng = np.random.default_rng(0)
    passages = [" ".join(rng.choice(WORDS, size=int(rng.integers(5, 40)))) + f" item {i}." for i in range(30)]
    store = build_store(d / "mem.msa", model, passages=passages)
    return path, model, store


def _answers(mem):
    out = []
    for q in QUESTIONS:
        ids, scores, _ = mem.route(q, 10)
        a = mem.ask(q, mode="pooled", max_new_tokens=6)
        out.append({"ids": ids.tolist(), "scores": scores.tolist(), "tokens": list(a.tokens),
                    "per_layer": {str(k): list(v) for k, v in a.rounds[0].per_layer.items()}})
    return out


def test_memory_devices_equals_one_device(msa_setup):
    from msa_memory.runtime import Memory

    _, model, store = msa_setup
    one = Memory(store, model=model)
    sh = Memory(store, model=model, devices=["cpu", "cpu", "cpu"])
    assert isinstance(sh.index, ShardedRouterIndex) and sh.index.bounds.tolist()[0] == 0
    assert _answers(one) == _answers(sh)
    n_router_layers = sh.index.n_layers
    assert sh.index.collectives == len(QUESTIONS) * (1 + n_router_layers)   # a gather a search, a merge a layer


def test_memory_refuses_devices_with_distributed(msa_setup):
    from msa_memory.runtime import Memory

    _, model, store = msa_setup
    with pytest.raises(ConfigError, match="give one of them"):
        Memory(store, model=model, devices=["cpu", "cpu"], distributed=True)
    with pytest.raises(ConfigError, match="torch.distributed initialised"):
        Memory(store, model=model, distributed=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, ckpt, store_root, out_dir):
    """One process of the job (``world`` 0: a plain single-process Memory, the reference, under the same
    thread settings, so the model's forward is computed the same way as in the ranks)."""
    import torch.distributed as dist

    from msa_memory.encode.model import load_model
    from msa_memory.runtime import Memory

    torch.set_num_threads(1)
    model = load_model(str(ckpt), dtype=torch.float32)
    if world == 0:
        res = {"answers": _answers(Memory(str(store_root), model=model))}
        with open(os.path.join(out_dir, "single.json"), "w") as f:
            json.dump(res, f)
        return
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        mem = Memory(str(store_root), model=model, distributed=True)
        res = {"answers": _answers(mem), "collectives": mem.index.collectives, "local_docs": mem.index.local.n_docs,
               "local_bytes": mem.index.nbytes(), "n_layers": mem.index.n_layers}
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(res, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(sys.platform != "linux", reason="gloo over loopback TCP is exercised on Linux CI")
def test_memory_distributed_gloo_equals_one_process(msa_setup, tmp_path):
    import torch.multiprocessing as mp

    from msa_memory.runtime import Memory

    ckpt, model, store = msa_setup
    one = Memory(store, model=model)
    world = 2
    args = (str(ckpt), str(store.root), str(tmp_path))
    mp.start_processes(_rank_main, args=(0, 0, *args), nprocs=1, join=True, start_method="spawn")
    want = json.loads((tmp_path / "single.json").read_text())["answers"]
    mp.start_processes(_rank_main, args=(world, _free_port(), *args), nprocs=world, join=True, start_method="spawn")
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    for g in got:
        assert g["answers"] == want
        assert g["collectives"] == len(QUESTIONS) * (1 + g["n_layers"])
    assert sum(g["local_docs"] for g in got) == one.index.n_docs
    assert sum(g["local_bytes"] for g in got) == one.index.nbytes()
    assert all(0 < g["local_bytes"] < one.index.nbytes() for g in got)


def test_cli_devices_shards_and_answers_the_same(msa_setup):
    from typer.testing import CliRunner

    from msa_memory.cli import app

    ckpt, _, store = msa_setup
    runner = CliRunner()
    base = [str(store.root), "blue door code", "-k", "5", "--model", str(ckpt), "--json"]
    one = runner.invoke(app, ["search", *base, "--device", "cpu"])
    two = runner.invoke(app, ["search", *base, "--devices", "cpu,cpu"])
    assert one.exit_code == 0 and two.exit_code == 0, one.output + two.output
    rows = [json.loads(r.stdout.strip().splitlines()[-1])["results"] for r in (one, two)]
    assert [(r["doc_id"], r["score"]) for r in rows[0]] == [(r["doc_id"], r["score"]) for r in rows[1]]
    bad = runner.invoke(app, ["search", *base, "--devices", ","])
    assert bad.exit_code != 0 and "--devices ',' names no device" in bad.output
