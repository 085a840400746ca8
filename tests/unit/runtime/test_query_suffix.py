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

from conftest import PASSAGES, build_store
from msa_memory.errors import ConfigError
from msa_memory.runtime import Memory

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
    li = plain_model.router_layers[-1]
    seen = {}
    h = plain_model.hf_model.model.layers[li].input_layernorm.register_forward_hook(
        lambda m, i, o: seen.setdefault("x", o.detach()))
    try:
        with torch.no_grad():
            plain_model.hf_model(input_ids=torch.tensor([ids]))
    finally:
        h.remove()
    np.testing.assert_allclose(qx[int(offs[1]) - 1, -1].numpy(), seen["x"][0, -1].numpy(), atol=1e-4)


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
    toks, _ = mem._generate(st, q, list(range(P + k, P + k + len(q.ids))), route=True, max_new_tokens=3,
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


def test_bad_suffix_configurations_are_refused(tiny_msa_model, store_builder, tmp_path):
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
    build, passages = store_builder
    msa = _with_suffix(tiny_msa_model)
    store = build(tmp_path / "msa.msa", msa, passages=passages)
    with pytest.raises(ConfigError, match="query suffix"):
        Memory(store, model=msa)
