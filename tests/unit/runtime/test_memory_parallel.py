"""Memory Parallel through ``Memory`` (the sharded indexes themselves: ``tests/unit/routing/test_parallel.py``):

- ``Memory(devices=[...])`` against ``Memory()`` on a tiny random MSA model: search, pooled answers and the
  per-layer routes, with one merge per router layer in a prefill and one gather per search;
- ``Memory(distributed=True)`` in two real processes joined by gloo (``torch.multiprocessing``): every rank
  gets the single-process routes and answer tokens while holding only its shard's keys.

Scores are equal up to fp32 rounding, not bit for bit: each shard's score GEMM has its own shape, and a BLAS may
block its reduction differently (MKL on AVX512 does). These tests route with cosine scores (``COSINE``: the
sharding does not depend on the score, and a cosine's magnitude is at most 1, so :func:`_score_bound` derives
the bound from the shapes alone); documents and answer tokens must be the same, which the data guarantees only
if no two scores are closer than twice the bound, so the test checks that first.
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
from msa_memory.routing.config import RoutingConfig
from msa_memory.routing.parallel import ShardedRouterIndex
from msa_memory.testing.numerics import gamma
from msa_memory.testing.runtime_kit import build_store

WORDS = "apple river door code blue red cat meeting orchard sea barn map green north east lobby".split()
COSINE = RoutingConfig(score="cosine")
QUESTIONS = ["blue door code", "what grows in the orchard", "item 7", "the meeting in the east lobby"]


# ---------------------------------------------------------------- Memory on a tiny random MSA model
@pytest.fixture(scope="module")
def msa_setup(tmp_path_factory):
    from msa_memory.encode.model import load_model
    from msa_memory.encode.tiny import write_tiny_msa_checkpoint

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


def _score_bound(mem) -> float:
    """|a - b| of one search score computed twice in fp32 with sums in other orders. A layer's score is a cosine
    (|s| <= 1): the dot over Dk = H·D, the two norms (D terms, a sqrt and a divide each), the mean over H heads;
    each computation is within γ_N of the exact value, N = Dk + 2(D+2) + H + 1 (Higham). A search sums L layers'
    scores: L·γ_N + γ_L·L for one computation, twice that for two."""
    assert mem.index.config.score == "cosine"
    _, H, D = mem.index.keys[0].shape
    L = mem.index.n_layers
    n = H * D + 2 * (D + 2) + H + 1
    return 2 * (L * gamma(n) + L * gamma(L))


def _assert_same_answers(got, want, bound):
    for g, w in zip(got, want, strict=True):
        s = np.sort(np.asarray(w["scores"]))
        assert np.diff(s).min() > 2 * bound        # no near-ties: rounding cannot reorder these documents
        np.testing.assert_allclose(g["scores"], w["scores"], rtol=0, atol=bound)
        assert (g["ids"], g["tokens"], g["per_layer"]) == (w["ids"], w["tokens"], w["per_layer"])


def test_memory_devices_equals_one_device(msa_setup):
    from msa_memory.runtime import Memory

    _, model, store = msa_setup
    one = Memory(store, model=model, routing=COSINE)
    sh = Memory(store, model=model, devices=["cpu", "cpu", "cpu"], routing=COSINE)
    assert isinstance(sh.index, ShardedRouterIndex) and sh.index.bounds.tolist()[0] == 0
    _assert_same_answers(_answers(sh), _answers(one), _score_bound(one))
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
        res = {"answers": _answers(Memory(str(store_root), model=model, routing=COSINE))}
        with open(os.path.join(out_dir, "single.json"), "w") as f:
            json.dump(res, f)
        return
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        mem = Memory(str(store_root), model=model, distributed=True, routing=COSINE)
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
    one = Memory(store, model=model, routing=COSINE)
    world = 2
    args = (str(ckpt), str(store.root), str(tmp_path))
    mp.start_processes(_rank_main, args=(0, 0, *args), nprocs=1, join=True, start_method="spawn")
    want = json.loads((tmp_path / "single.json").read_text())["answers"]
    mp.start_processes(_rank_main, args=(world, _free_port(), *args), nprocs=world, join=True, start_method="spawn")
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    for g in got:
        _assert_same_answers(g["answers"], want, _score_bound(one))
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
    # the plumbing of --devices; score equality up to rounding is the Memory tests' (the CLI routes with dot scores)
    assert [r["doc_id"] for r in rows[0]] == [r["doc_id"] for r in rows[1]]
    bad = runner.invoke(app, ["search", *base, "--devices", ","])
    assert bad.exit_code != 0 and "--devices ',' names no device" in bad.output
