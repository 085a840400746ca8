"""Memory Parallel (``runtime.parallel``): router keys sharded by document, against one unsharded index.

- :func:`shard_bounds` (hypothesis): contiguous, covering, non-empty shards within one document's chunks of
  an equal share;
- :func:`merge_topk` equals a full sort of the candidates;
- :class:`ShardedRouterIndex` against :class:`RouterIndex` over the same keys (random keys, a shared map and
  per-layer maps of different lengths, max and mean chunk reduce): the same documents and bit-identical
  scores: each chunk's score is the same dot product on either side, and a document's chunks all sit in one
  shard, so its reduce sees the same values;
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
from hypothesis import given, settings
from hypothesis import strategies as st

from msa_memory.errors import ConfigError
from msa_memory.runtime.parallel import ShardedRouterIndex, merge_topk, shard_bounds
from msa_memory.routing import RouterIndex, RoutingConfig

WORDS = "apple river door code blue red cat meeting orchard sea barn map green north east lobby".split()
QUESTIONS = ["blue door code", "what grows in the orchard", "item 7", "the meeting in the east lobby"]


@given(st.lists(st.integers(1, 50), min_size=1, max_size=60), st.integers(1, 8))
@settings(max_examples=200, deadline=None)
def test_shard_bounds_cover_and_balance(chunks, n):
    c = np.array(chunks)
    if len(c) < n:
        with pytest.raises(ConfigError, match="fewer than the"):
            shard_bounds(c, n)
        return
    b = shard_bounds(c, n)
    assert b[0] == 0 and b[-1] == len(c) and len(b) == n + 1
    assert np.all(np.diff(b) >= 1)
    share = c.sum() / n
    for s in range(n):   # a shard over its share by more than one document only when forced to one document
        got = c[b[s]:b[s + 1]].sum()
        assert got <= share + c.max() or b[s + 1] - b[s] == 1


@given(st.lists(st.floats(-1e3, 1e3, width=32), min_size=1, max_size=40), st.integers(1, 40))
@settings(max_examples=100, deadline=None)
def test_merge_topk_equals_a_full_sort(scores, k):
    s = np.array(scores, dtype=np.float32)
    idx = np.random.default_rng(len(scores)).permutation(len(s)).astype(np.int64)
    pad_s, pad_i = np.full(3, -np.inf), np.full(3, -1)
    got_s, got_i = merge_topk(np.concatenate([s, pad_s]), np.concatenate([idx, pad_i]), k)
    order = sorted(range(len(s)), key=lambda j: (-float(s[j]), idx[j]))[:k]
    assert got_i.tolist() == idx[order].tolist()
    assert got_s.tolist() == s[order].tolist()


def _random_index_inputs(seed, per_layer):
    rng = np.random.default_rng(seed)
    n_docs, L, H, D = 37, 3, 2, 16
    counts = rng.integers(1, 6, size=n_docs)
    base = np.repeat(np.arange(n_docs), counts)
    maps = []
    for layer in range(L):
        if per_layer and layer == 1:                  # a layer with more rows (a second grid), its own order
            m = np.concatenate([base, np.repeat(np.arange(n_docs), rng.integers(1, 3, size=n_docs))])
            maps.append(m[rng.permutation(len(m))])
        else:
            maps.append(base)
    keys = [torch.from_numpy(rng.standard_normal((len(m), H, D)).astype(np.float32)) for m in maps]
    return keys, (maps if per_layer else base), np.arange(100, 100 + n_docs)


@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("reduce", ["max", "mean"])
@pytest.mark.parametrize("n_dev", [2, 3, 5])
def test_sharded_index_equals_one_index(per_layer, reduce, n_dev):
    keys, cmap, ids = _random_index_inputs(n_dev, per_layer)
    cfg = RoutingConfig(chunk_reduce=reduce, top_k=6)
    one = RouterIndex(keys, cmap, ids, cfg)
    sh = ShardedRouterIndex(keys, cmap, ids, cfg, ["cpu"] * n_dev)
    assert sh.n_docs == one.n_docs and sh.n_chunks == one.n_chunks and sh.nbytes() == one.nbytes()
    q = torch.from_numpy(np.random.default_rng(1).standard_normal((5, 2, 16)).astype(np.float32))
    for layer in range(3):
        a, b = one.route(layer, q, 6), sh.route(layer, q, 6)
        assert a.doc_ids.tolist() == b.doc_ids.tolist() and a.doc_index.tolist() == b.doc_index.tolist()
        assert np.array_equal(a.scores, b.scores)
        full = one.gather_scores(one.doc_scores(layer, q))
        assert np.array_equal(full, sh.gather_scores(sh.doc_scores(layer, q)))
        summed_one = one.add(one.doc_scores(layer, q), one.doc_scores(layer, q[:1]))
        summed_sh = sh.add(sh.doc_scores(layer, q), sh.doc_scores(layer, q[:1]))
        a, b = one.route_scores(layer, summed_one, 40), sh.route_scores(layer, summed_sh, 40)   # k > N: all
        assert a.doc_ids.tolist() == b.doc_ids.tolist() and np.array_equal(a.scores, b.scores)
    assert sh.collectives == 3 * 3


def test_sharded_index_refuses_more_shards_than_documents():
    keys, cmap, ids = _random_index_inputs(0, False)
    with pytest.raises(ConfigError, match="fewer than the 40"):
        ShardedRouterIndex(keys, cmap, ids, RoutingConfig(), ["cpu"] * 40)


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
