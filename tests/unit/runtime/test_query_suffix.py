"""A router adapter with a query suffix (``RouterConfig.query_suffix``, read at its last token).

On a tiny random Gemma 3 (plain wrap) and a real store built for it: search == brute force over HF's own
hidden states of question + suffix; the question's own tokens are the same with or without the suffix;
training features read the same rows; pooled mode routes with the suffix but answers from a prompt
without it; bad configurations are refused with a clear error.
Run: .venv/bin/python -m pytest tests/unit/runtime/test_query_suffix.py -q
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from msa_memory.errors import ConfigError
from msa_memory.runtime import Memory
from msa_memory.testing.runtime_kit import PASSAGES, build_store

SUFFIX = "\nThis passage is about"
Q = "What is the blue door code?"


def _with_suffix(loaded, suffix=SUFFIX, seed=0):
    from msa_memory.encode import RouterAdapter

    cfg = dataclasses.replace(loaded.router.config, query_reduce="last", query_suffix=suffix, extra={})
    ad = RouterAdapter(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in ad.parameters():
            w.copy_(torch.randn(w.shape, generator=g))
    return loaded.with_router(ad)


@pytest.fixture(scope="module")
def plain_model():
    from msa_memory.encode import load_model
    from msa_memory.encode.tiny import tiny_model, tiny_tokenizer

    with pytest.warns(Warning):
        base = load_model(tiny_model("gemma3"), tokenizer=tiny_tokenizer(), router_layers=(1, 2), chunk_tokens=16,
                          dtype=torch.float32)
    return _with_suffix(base)


@pytest.fixture(scope="module")
def suffix_memory(plain_model, tmp_path_factory):
    store = build_store(tmp_path_factory.mktemp("sfx") / "mem.msa", plain_model, [p * 2 for p in PASSAGES])
    return Memory(store, model=plain_model)


@torch.no_grad()
def _brute_scores(mem, ids, rows_from):
    """(L, N) per-layer document scores of the routing row at the end of ``ids`` (fp64, HF's own forward)."""
    rc = mem.model.router.config
    hf = mem.model.hf_model
    with torch.no_grad():
        hs = hf(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
    out = []
    for pos, li in enumerate(mem.identity.router_layers):
        x = hf.model.layers[li].input_layernorm(hs[li][0])[rows_from:].double()
        q = (x @ mem.model.router.q_proj[str(li)].weight.double().T).view(len(x), rc.n_q_heads, rc.head_dim)
        q = torch.nn.functional.normalize(q[-1], dim=-1)                     # "last": the final row only
        k_np, docs = mem.store.router_keys(pos)
        keys = torch.from_numpy(k_np.astype(np.float32)).double()           # stored L2-normalised (cosine)
        rep = rc.n_q_heads // rc.n_kv_heads
        S = torch.stack([keys[:, h // rep] @ q[h] for h in range(rc.n_q_heads)], -1).mean(-1).numpy()   # (C,)
        dense = np.searchsorted(mem.doc_ids, docs)
        out.append([S[dense == d].max() for d in range(len(mem.doc_ids))])
    return np.array(out)


def test_search_routes_the_last_token_of_question_plus_suffix(suffix_memory):
    mem = suffix_memory
    assert mem.model.router.config.score == "cosine" and mem.query_suffix == SUFFIX
    tok = mem.tokenizer
    ids = list(tok(Q, add_special_tokens=True)["input_ids"]) + list(tok(SUFFIX, add_special_tokens=False)["input_ids"])
    total = _brute_scores(mem, ids, 0).sum(0)
    tab = mem.search(Q, k=4)
    assert tab.column("doc_id").to_pylist() == mem.doc_ids[np.argsort(-total, kind="stable")[:4]].tolist()
    np.testing.assert_allclose(tab.column("score").to_numpy(), np.sort(total)[::-1][:4], rtol=1e-4)
    # without the suffix the same adapter would route another row: the suffix is what is read
    bare = _brute_scores(mem, list(tok(Q, add_special_tokens=True)["input_ids"]), 0).sum(0)
    assert not np.allclose(bare, total)


def test_training_features_read_the_rows_routing_reads(plain_model):
    from msa_memory.train.features import extract_queries, query_tokens

    tok = plain_model.tokenizer
    ids, skip = query_tokens(tok, Q, SUFFIX)
    bare, bskip = query_tokens(tok, Q)
    assert ids[:len(bare)] == bare and skip == bskip
    assert ids[len(bare):] == list(tok(SUFFIX, add_special_tokens=False)["input_ids"])
    qx, offs = extract_queries(plain_model, [Q, "count the dogs"], dtype=torch.float32)       # the router's suffix
    qb, ob = extract_queries(plain_model, [Q, "count the dogs"], dtype=torch.float32, suffix="")
    n_sfx = len(ids) - len(bare)
    assert int(offs[1] - offs[0]) == int(ob[1] - ob[0]) + n_sfx
    # causal attention: the question's own rows do not change when the suffix follows
    np.testing.assert_allclose(qx[:int(ob[1])].numpy(), qb[:int(ob[1])].numpy(), atol=1e-5)
    # the last row is HF's own input_layernorm output at the suffix's last token
    from msa_memory.testing.hf_kit import layer_input

    x = layer_input(plain_model.hf_model, plain_model.router_layers[-1], ids)
    np.testing.assert_allclose(qx[int(offs[1]) - 1, -1].numpy(), x[-1].numpy(), atol=1e-4)


@torch.no_grad()
def test_pooled_mode_routes_with_the_suffix_and_answers_without_it(suffix_memory):
    mem = suffix_memory
    head, q = mem.layout.head_ids(), mem.layout.question(Q)
    P, k = len(head), 2
    ans = mem.ask(Q, mode="pooled", k=k, max_new_tokens=3, stop_strings=())
    assert ans.n_prompt_tokens == P + len(q.ids)                # the suffix is not part of the prompt
    # the first router layer routes before any memory is attached: its choice is the top-k of the brute-force
    # scores of the suffix's last token after the template head, at MSA's positions
    sfx = mem.layout.encode([(Q, True), (SUFFIX, True)]).ids
    hf = mem.model.hf_model
    rc = mem.model.router.config
    li = mem.identity.router_layers[0]
    pos = torch.tensor([list(range(P)) + list(range(P + k, P + k + len(sfx)))])
    with torch.no_grad():
        hs = hf(input_ids=torch.tensor([head + sfx]), position_ids=pos, output_hidden_states=True).hidden_states
    x = hf.model.layers[li].input_layernorm(hs[li][0])[-1].double()
    qv = torch.nn.functional.normalize((mem.model.router.q_proj[str(li)].weight.double() @ x).view(rc.n_q_heads, -1), dim=-1)
    k_np, docs = mem.store.router_keys(0)
    keys = torch.from_numpy(k_np.astype(np.float32)).double()
    rep = rc.n_q_heads // rc.n_kv_heads
    S = torch.stack([keys[:, h // rep] @ qv[h] for h in range(rc.n_q_heads)], -1).mean(-1).numpy()
    dense = np.searchsorted(mem.doc_ids, docs)
    best = np.array([S[dense == d].max() for d in range(len(mem.doc_ids))])
    assert sorted(ans.rounds[0].per_layer[0]) == sorted(mem.doc_ids[np.argsort(-best, kind="stable")[:k]].tolist())
    # the answer is the one generated from the prompt without the suffix, attending those routes' memory
    st = mem.engine.new_state(len(q.ids) + 4, mem.prefix, top_k=k)
    st.preset_routes = mem.engine.pooled_routes(sfx, list(range(P + k, P + k + len(sfx))), [True] * len(sfx),
                                                mem.prefix, k)
    toks, _ = mem.generate_ids(st, q, list(range(P + k, P + k + len(q.ids))), route=True, max_new_tokens=3,
                            temperature=0.0, top_p=1.0, seed=None, on_token=None, timings={}, stop_strings=())
    assert toks == ans.tokens
    assert {p: r.doc_ids.tolist() for p, r in st.routes.items()} == ans.rounds[0].per_layer


def test_text_and_interleave_modes_route_with_the_suffix(suffix_memory):
    mem = suffix_memory
    ids, _, _ = mem.route(Q, 3)
    ans = mem.ask(Q, mode="text", k=3, max_new_tokens=2, stop_strings=())
    assert [h.doc_id for h in ans.rounds[0].docs] == ids.tolist()
    inter = mem.ask(Q, mode="interleave", k=3, max_new_tokens=2, max_rounds=1, stop_strings=())
    assert [h.doc_id for h in inter.rounds[0].docs][:3] == ids.tolist()


def test_bad_suffix_configurations_are_refused(tiny_msa_model, tmp_path):
    from msa_memory.encode import RouterConfig
    from msa_memory.train.trainer import TrainConfig

    base = dict(router_layers=(1,), n_q_heads=2, n_kv_heads=1, head_dim=8, hidden_size=16)
    with pytest.raises(ConfigError, match="needs query_reduce 'last'"):
        RouterConfig(**base, query_suffix=SUFFIX)
    with pytest.raises(ConfigError, match="must be a string"):
        RouterConfig(**base, query_reduce="last", query_suffix=3)
    with pytest.raises(ConfigError, match="needs query_reduce 'last'"):
        TrainConfig(query_suffix=SUFFIX)
    cfg = RouterConfig(**base)
    assert "query_suffix" not in cfg.to_dict()                       # router ids of adapters without one unchanged
    with_sfx = RouterConfig(**base, query_reduce="last", query_suffix=SUFFIX)
    assert RouterConfig.from_dict(with_sfx.to_dict()) == with_sfx
    # MSA's own prompt layout has no place for a suffix
    build, passages = build_store, PASSAGES
    msa = _with_suffix(tiny_msa_model)
    store = build(tmp_path / "msa.msa", msa, passages=passages)
    with pytest.raises(ConfigError, match="query suffix"):
        Memory(store, model=msa)


# ----------------------------------------------------------------------------- suffix queries beside token max

def _suffix_queries_model(loaded, seed=1, layers=(1,)):
    """``loaded`` with a random token-max router plus suffix queries at ``layers`` taken from a ``last`` adapter
    that shares its keys (what msa train-router --init-adapter --freeze-keys trains)."""
    from msa_memory.encode import RouterAdapter

    base = RouterAdapter(dataclasses.replace(loaded.router.config, query_reduce="max", query_suffix="", extra={}))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in base.parameters():
            w.copy_(torch.randn(w.shape, generator=g))
    src = RouterAdapter(dataclasses.replace(base.config, router_layers=tuple(layers), query_reduce="last",
                                            query_suffix=SUFFIX))
    t = base.state_tensors()
    for l in layers:
        t[f"model.layers.{l}.self_attn.router_q_proj.0.weight"] = torch.randn(src.q_proj[str(l)].weight.shape, generator=g)
    src.load_tensors(t)
    return loaded.with_router(base.with_suffix_queries(src)), base, src


@pytest.fixture(scope="module")
def sq_memory(plain_model, tmp_path_factory):
    m, _, _ = _suffix_queries_model(plain_model)
    store = build_store(tmp_path_factory.mktemp("sq") / "mem.msa", m, [p * 2 for p in PASSAGES])
    return Memory(store, model=m)


@torch.no_grad()
def _layer_scores(mem, x_rows, pos, proj):
    """(N,) brute-force document scores of query rows ``x_rows`` (T, E) under projection ``proj`` (Hq·D, E)
    against the store's keys of router position ``pos``: cosine per head, head mean, token max, chunk max."""
    rc = mem.model.router.config
    q = torch.nn.functional.normalize((x_rows.double() @ proj.double().T).view(len(x_rows), rc.n_q_heads, -1), dim=-1)
    k_np, docs = mem.store.router_keys(pos)
    keys = torch.from_numpy(k_np.astype(np.float32)).double()
    rep = rc.n_q_heads // rc.n_kv_heads
    S = torch.stack([q[:, h] @ keys[:, h // rep].T for h in range(rc.n_q_heads)], -1).mean(-1).amax(0).numpy()
    dense = np.searchsorted(mem.doc_ids, docs)
    return np.array([S[dense == d].max() for d in range(len(mem.doc_ids))])


def test_suffix_queries_add_to_the_token_max_of_the_question(sq_memory):
    mem = sq_memory
    r = mem.model.router
    assert r.config.suffix_layers == (1,) and r.config.query_reduce == "max" and mem.suffix_rows > 0
    assert "suffix_layers=[1]" in repr(mem) and "read by suffix queries at [1]" in mem._repr_html_()
    tok = mem.tokenizer
    bare = list(tok(Q, add_special_tokens=True)["input_ids"])
    ids = bare + list(tok(SUFFIX, add_special_tokens=False)["input_ids"])
    assert mem.suffix_rows == len(ids) - len(bare)
    hf = mem.model.hf_model
    with torch.no_grad():
        hs = hf(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
    total = np.zeros(len(mem.doc_ids))
    for pos, li in enumerate(mem.identity.router_layers):
        x = hf.model.layers[li].input_layernorm(hs[li][0])
        total += _layer_scores(mem, x[:len(bare)], pos, r.q_proj[str(li)].weight)            # the question's tokens
        if li in r.config.suffix_layers:
            total += _layer_scores(mem, x[-1:], pos, r.sq_proj[str(li)].weight)               # the suffix's end
    tab = mem.search(Q, k=4)
    assert tab.column("doc_id").to_pylist() == mem.doc_ids[np.argsort(-total, kind="stable")[:4]].tolist()
    np.testing.assert_allclose(tab.column("score").to_numpy(), np.sort(total)[::-1][:4], rtol=1e-4)


@torch.no_grad()
def test_pooled_suffix_query_layer_routes_by_the_summed_score(sq_memory):
    mem = sq_memory
    r = mem.model.router
    head, q = mem.layout.head_ids(), mem.layout.question(Q)
    P, k = len(head), 2
    ans = mem.ask(Q, mode="pooled", k=k, max_new_tokens=2, stop_strings=())
    sfx = mem.layout.encode([(Q, True), (SUFFIX, True)]).ids
    n_q = len(mem.layout.encode([(Q, True)]).ids)
    pos = torch.tensor([list(range(P)) + list(range(P + k, P + k + len(sfx)))])
    hf = mem.model.hf_model
    hs = hf(input_ids=torch.tensor([head + sfx]), position_ids=pos, output_hidden_states=True).hidden_states
    li = mem.identity.router_layers[0]                                  # routes before any memory is attached
    x = hf.model.layers[li].input_layernorm(hs[li][0])[P:]
    best = _layer_scores(mem, x[:n_q], 0, r.q_proj[str(li)].weight) + _layer_scores(mem, x[-1:], 0, r.sq_proj[str(li)].weight)
    assert sorted(ans.rounds[0].per_layer[0]) == sorted(mem.doc_ids[np.argsort(-best, kind="stable")[:k]].tolist())
    assert ans.n_prompt_tokens == P + len(q.ids)


def test_suffix_queries_adapter_round_trips_and_refuses_foreign_keys(plain_model, tmp_path):
    import json

    from msa_memory.encode import RouterAdapter
    from msa_memory.errors import ModelLoadError

    m, base, src = _suffix_queries_model(plain_model)
    ad = m.router
    assert ad.config.query_suffix == SUFFIX and torch.equal(ad.sq_proj["1"].weight, src.q_proj["1"].weight)
    assert ad.fingerprint() != base.fingerprint()
    ad.save(tmp_path / "full")
    back = RouterAdapter.load(tmp_path / "full")
    assert back.config == ad.config and back.fingerprint() == ad.fingerprint()
    assert back.subset([2]).config.suffix_layers == () and back.subset([2]).config.query_suffix == ""
    assert back.subset([1]).config.suffix_layers == (1,)
    # a subset folder names the token-max adapter and the suffix queries' folder: the same router
    base.save(tmp_path / "base")
    src.save(tmp_path / "src")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "router_subset.json").write_text(json.dumps(
        {"of": "../base", "router_layers": [1, 2], "router_id": ad.fingerprint(), "extra": ad.config.extra,
         "suffix": {"of": "../src", "router_layers": [1]}}))
    assert RouterAdapter.load(tmp_path / "sub").fingerprint() == ad.fingerprint()
    # suffix queries trained against other keys are refused
    other = RouterAdapter(src.config)
    with pytest.raises(ConfigError, match="other router keys at layer 1"):
        base.with_suffix_queries(other)
    with pytest.raises(ConfigError, match="trained for them"):
        base.with_suffix_queries(base)
    with pytest.raises(ConfigError, match="need a query suffix"):
        dataclasses.replace(ad.config, query_suffix="")
    (tmp_path / "src" / "router_adapter.safetensors").unlink()
    with pytest.raises(ModelLoadError):
        RouterAdapter.load(tmp_path / "sub")


@pytest.mark.parametrize("which", ["suffix queries", "last at the suffix"])
def test_the_benchmark_scores_suffix_adapters_as_memory_routes(which, sq_memory, suffix_memory):
    """benchmarks/bench_quality.routing_scores (from pooled features, as the benchmark scores) == Memory.search."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))
    import bench_quality as bq

    from msa_memory.train.features import extract_passages

    mem = sq_memory if which == "suffix queries" else suffix_memory
    loaded, ad = mem.model, mem.model.router
    texts = mem.store.texts(mem.doc_ids.tolist())
    x, chunk_doc = extract_passages(loaded, texts, dtype=torch.float32)
    qx, qoff, n_sfx = bq.query_inputs(loaded, ad, [Q], {})
    assert n_sfx == len(mem.tokenizer(SUFFIX, add_special_tokens=False)["input_ids"])
    got = bq.routing_scores(ad, list(loaded.router_layers), x, chunk_doc, qx, qoff, list(range(len(texts))), [0],
                            ad.config, suffix_rows=n_sfx)[0]
    tab = mem.search(Q, k=len(texts))
    want = np.full(len(texts), np.nan)
    want[np.searchsorted(mem.doc_ids, tab.column("doc_id").to_numpy())] = tab.column("score").to_numpy()
    np.testing.assert_allclose(got.numpy(), want, atol=3e-3)          # the benchmark reads queries in bf16
    bare = bq.routing_scores(ad, list(loaded.router_layers), x, chunk_doc, qx, qoff, list(range(len(texts))), [0],
                             ad.config)[0]                                 # the suffix rows routed as question rows
    assert np.abs(bare.numpy() - want).max() > 3e-2 if which == "suffix queries" else True


def test_training_from_an_adapter_with_suffix_queries_saves_one_without_them(plain_model, tmp_path):
    """--init-adapter of an adapter with suffix queries: its q/k train, its suffix queries are not carried."""
    from msa_memory.encode import RouterAdapter
    from msa_memory.train.pairs import PairSet, Query
    from msa_memory.train.recipe import run_training
    from msa_memory.train.trainer import TrainConfig

    m, base, _ = _suffix_queries_model(plain_model)
    m.router.save(tmp_path / "init")
    texts = [p * 2 for p in PASSAGES]
    ps = PairSet(passages=texts, sources=[f"t{i}" for i in range(len(texts))])
    ps.queries = [Query(t.split(".")[0], (i,), "ict") for i, t in enumerate(texts)]
    cfg = TrainConfig(epochs=0, batch_size=4, n_random=2, n_hard=0)
    run_training(out=tmp_path / "out", train_pairs=ps, dev_pairs=ps, config=cfg, loaded=plain_model, log=lambda s: None,
                 init_adapter=tmp_path / "init", candidate_layers=(1, 2), keep_layers=True)
    out = RouterAdapter.load(tmp_path / "out")
    assert out.config.suffix_layers == () and out.config.query_suffix == ""
    assert out.fingerprint() == base.fingerprint()              # 0 epochs: the token-max router it started from
