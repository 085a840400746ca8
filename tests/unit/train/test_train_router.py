"""Router training: loss vs a hand-written reference, learning on a synthetic task, adapter round trip, features vs the encoder, reindex vs a fresh encode, the CLI.

Run: ``.venv/bin/python -m pytest tests/unit/train -x -q`` (tiny random-weight models, CPU, < 1 min).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from msa_memory.errors import ConfigError, IdentityMismatchError
from msa_memory.train.scores import decoupled_infonce, recall_at_k
from msa_memory.train.trainer import Features, RouterProjections, TrainConfig, evaluate, select_layers, train_router


# ----------------------------------------------------------------------------- loss and scores

def _reference_loss(scores, positive, tau):
    """MSA INFONCE_DECOUPLE written out with Python loops (msa-reference §6.2)."""
    per_sample = []
    for s, p in zip(scores.tolist(), positive.tolist()):
        pos = [i for i, x in enumerate(p) if x]
        neg = [j for j, x in enumerate(p) if not x]
        if not pos:
            continue
        terms = []
        for i in pos:
            zi = s[i] / tau
            denom = math.exp(zi) + sum(math.exp(s[j] / tau) for j in neg)
            terms.append(-(zi - math.log(denom)))
        per_sample.append(sum(terms) / len(pos))
    return sum(per_sample) / len(per_sample)


def test_decoupled_infonce_equals_reference():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(5, 9, generator=g) * 2 - 1
    positive = torch.zeros(5, 9, dtype=torch.bool)
    positive[0, 1] = positive[1, [2, 3]] = positive[2, [0, 4, 8]] = positive[4, 7] = True  # row 3: none
    got = decoupled_infonce(scores, positive, tau=0.1)
    assert abs(float(got) - _reference_loss(scores, positive, 0.1)) < 1e-5
    # positives never compete with each other: raising another positive's score leaves this one's term
    p2 = positive[:1].clone()
    p2[0, 5] = True
    lo, hi = scores[:1].clone(), scores[:1].clone()
    lo[0, 5], hi[0, 5] = 0.0, 5.0
    term5 = lambda z: -(z / 0.1 - math.log(math.exp(z / 0.1) + sum(math.exp(float(scores[0, j]) / 0.1)  # noqa: E731
                                                                    for j in range(9) if j not in (1, 5))))
    diff = float(decoupled_infonce(hi, p2, tau=0.1)) - float(decoupled_infonce(lo, p2, tau=0.1))
    assert abs(diff - (term5(5.0) - term5(0.0)) / 2) < 1e-4
    assert abs(float(decoupled_infonce(hi, p2, tau=0.1)) - _reference_loss(hi, p2, 0.1)) < 1e-5


def test_decoupled_infonce_gradient_and_tau_clamp():
    s = torch.tensor([[0.9, 0.1, -0.3]], requires_grad=True)
    p = torch.tensor([[True, False, False]])
    decoupled_infonce(s, p, tau=0.1).backward()
    assert s.grad[0, 0] < 0 < s.grad[0, 1]  # push the positive up, the negatives down
    assert float(decoupled_infonce(s.detach(), p, tau=5.0)) == pytest.approx(_reference_loss(s.detach(), p, 0.5), abs=1e-5)


def test_recall_at_k_counts_positives():
    s = torch.tensor([[0.9, 0.8, 0.1, 0.0], [0.1, 0.2, 0.3, 0.4]])
    p = torch.tensor([[False, True, False, False], [True, False, False, True]])
    r = recall_at_k(s, p, (1, 2))
    assert r[1] == pytest.approx(0.5) and r[2] == pytest.approx(0.75)


# ----------------------------------------------------------------------------- training on a synthetic task

def _synthetic(n_docs, seed, A, E=24, L=2, chunks=2, T=4):
    """Docs have a topic u_d; chunk inputs are u_d + noise, query tokens A_l u_d + noise.

    A random rotation A_l separates query and key spaces, so the identity-like initial router is
    poor and a trained linear router is good.
    """
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(n_docs, E, generator=g)
    x = torch.stack([(u.repeat_interleave(chunks, 0) + 0.3 * torch.randn(n_docs * chunks, E, generator=g))
                     for _ in range(L)])                                       # (L, C, E)
    chunk_doc = torch.arange(n_docs).repeat_interleave(chunks)
    qx = torch.stack([(u.repeat_interleave(T, 0) @ A[li].T) + 0.3 * torch.randn(n_docs * T, E, generator=g)
                      for li in range(L)], dim=1)                              # (Q*T, L, E)
    offs = torch.arange(0, n_docs * T + 1, T)
    return Features((3, 5), x, chunk_doc, n_docs, qx, offs, [(d,) for d in range(n_docs)], ["ict"] * n_docs,
                    [tuple((d + j) % n_docs for j in (1, 2)) for d in range(n_docs)])


def _task(seed, E=24):
    """Training / held-out features of the synthetic task and an identity-initialised router of layers 3, 5."""
    g = torch.Generator().manual_seed(seed)
    A = [torch.linalg.qr(torch.randn(E, E, generator=g))[0] for _ in range(2)]
    eye = torch.eye(E)
    proj = RouterProjections((3, 5), [eye.clone(), eye.clone()], [eye[:12].clone(), eye[:12].clone()],
                             n_q_heads=2, n_kv_heads=1, head_dim=12)
    return _synthetic(96, 1, A), _synthetic(48, 2, A), proj


@pytest.mark.parametrize("bf16,layer_loss", [(False, "each"), (True, "each"), (False, "sum"), (False, "both")])
def test_training_increases_held_out_recall(bf16, layer_loss):
    train, held, proj = _task(0)
    cfg = TrainConfig(epochs=6, batch_size=16, lr=2e-2, n_hard=2, n_random=16, ks=(1, 5), bf16=bf16,
                      layer_loss=layer_loss)
    before = evaluate(proj, held, cfg)["recall"]
    hist = train_router(proj, train, held, cfg)
    after = evaluate(proj, held, cfg)["recall"]
    assert hist[0]["epoch"] == 0 and len(hist) == 7 and hist[-1]["loss"] < hist[1]["loss"]
    assert after[1] > before[1] + 0.3 and after[5] > 0.9, (before, after)
    chosen, trace = select_layers(evaluate(proj, held, cfg)["layer_scores"], evaluate(proj, held, cfg)["positive"],
                                  proj.layers, max_layers=2, k=5)
    assert set(chosen) <= {3, 5} and trace


def test_freeze_keys_trains_the_queries_alone():
    train, held, proj = _task(0)
    k0 = [w.detach().clone() for w in proj.k]
    q0 = [w.detach().clone() for w in proj.q]
    cfg = TrainConfig(epochs=2, batch_size=16, lr=2e-2, n_hard=2, n_random=16, ks=(1, 5), freeze_keys=True)
    before = evaluate(proj, held, cfg)["recall"]
    train_router(proj, train, held, cfg)
    assert all(torch.equal(a, b) for a, b in zip(proj.k, k0))
    assert not any(torch.equal(a, b) for a, b in zip(proj.q, q0))
    assert evaluate(proj, held, cfg)["recall"][5] > before[5]


def test_training_refuses_features_read_with_another_query_suffix():
    import dataclasses

    train, held, proj = _task(0)
    cfg = TrainConfig(epochs=1, batch_size=16, query_reduce="last", query_suffix="\nThis passage is about")
    with pytest.raises(ConfigError, match="training features' queries were read with the suffix ''"):
        train_router(proj, train, held, cfg)
    sfx = [dataclasses.replace(f, query_suffix=cfg.query_suffix) for f in (train, held)]
    with pytest.raises(ConfigError, match="held-out features"):
        train_router(proj, sfx[0], held, cfg)
    assert len(train_router(proj, *sfx, cfg)) == 2


def test_layer_selection_started_from_chosen_layers_continues_the_same_selection():
    """select_layers(start=...) grows given layers as the selection would have after choosing them."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(5, 40, 30, generator=g)
    positive = torch.zeros(40, 30, dtype=torch.bool)
    positive[torch.arange(40), torch.randint(0, 30, (40,), generator=g)] = True
    scores[:, positive] += torch.tensor([0.2, 1.0, 0.6, 0.1, 0.8])[:, None]   # layers differ in strength
    layers = (1, 4, 6, 9, 12)
    full, trace = select_layers(scores, positive, layers, max_layers=5, k=5)
    assert len(trace) >= 2
    first = [layers.index(l) for l in trace[0]["layers"]]
    rest, trace2 = select_layers(scores, positive, layers, max_layers=5, k=5, start=first)
    assert rest == full and trace2 == trace[1:]
    # a start that no layer improves stays as it is
    assert select_layers(scores, positive, layers, max_layers=5, k=5, start=[layers.index(l) for l in full]) == \
        (full, [])


def test_frozen_layers_keep_their_weights_and_the_others_learn_to_complement_them():
    """frozen_layers: those layers' q/k stay bit-identical; with the sum loss the rest still learn."""
    train, held, proj = _task(4)
    eye = torch.eye(24)
    cfg = TrainConfig(epochs=4, batch_size=16, lr=2e-2, n_hard=2, n_random=16, ks=(1, 5), layer_loss="sum",
                      frozen_layers=[3])
    before = evaluate(proj, held, cfg)["recall"]
    train_router(proj, train, held, cfg)
    assert torch.equal(proj.q[0], eye) and torch.equal(proj.k[0], eye[:12])
    assert not torch.equal(proj.q[1], eye) and not torch.equal(proj.k[1], eye[:12])
    assert evaluate(proj, held, cfg)["recall"][5] > before[5] + 0.3
    assert cfg.frozen_layers == (3,)
    for bad in ((7,), (3, 5)):   # not a router layer; every layer (nothing would train)
        with pytest.raises(ConfigError, match="frozen layers"):
            train_router(proj, train, None, TrainConfig(epochs=1, frozen_layers=bad))


def test_layer_sum_loss_is_the_infonce_of_the_layer_averaged_score():
    """One step's loss under layer_loss="sum" / "each" / "both", recomputed by hand on a tiny task."""
    from msa_memory.train.trainer import _layer_doc_scores

    E = 24
    g = torch.Generator().manual_seed(9)
    A = [torch.linalg.qr(torch.randn(E, E, generator=g))[0] for _ in range(2)]
    f = _synthetic(8, 3, A)
    eye = torch.eye(E)
    losses = {}
    for mode in ("each", "sum", "both"):
        proj = RouterProjections((3, 5), [eye.clone(), eye.clone()], [eye[:12].clone(), eye[:12].clone()],
                                 n_q_heads=2, n_kv_heads=1, head_dim=12)
        cfg = TrainConfig(epochs=1, batch_size=8, lr=1e-9, n_hard=0, n_random=0, layer_loss=mode)
        losses[mode] = train_router(proj, f, None, cfg)[-1]["loss"]
    qx, qmask = f.query_batch(torch.arange(8))
    s = [_layer_doc_scores(proj, li, qx[li], qmask, f.x_chunks[li], f.chunk_doc, 8, cfg).float() for li in range(2)]
    pos = torch.eye(8, dtype=torch.bool)
    each = float(sum(decoupled_infonce(x, pos, tau=0.1) for x in s) / 2)
    summed = float(decoupled_infonce((s[0] + s[1]) / 2, pos, tau=0.1))
    assert losses["each"] == pytest.approx(each, rel=1e-4) and losses["sum"] == pytest.approx(summed, rel=1e-4)
    assert losses["both"] == pytest.approx((each + summed) / 2, rel=1e-4) and abs(each - summed) > 1e-3
    with pytest.raises(ConfigError, match="layer_loss"):
        TrainConfig(layer_loss="max")


def test_features_save_load_round_trip(tmp_path):
    from msa_memory.train.features import load_features, save_features

    E = 24
    A = [torch.eye(E), torch.eye(E)]
    f = _synthetic(10, 7, A)
    f.x_chunks = f.x_chunks.to(torch.bfloat16)
    save_features(f, str(tmp_path / "f.pt"))
    g = load_features(str(tmp_path / "f.pt"))
    assert g.layers == f.layers and g.n_docs == f.n_docs and g.positives == f.positives
    assert g.kinds == f.kinds and g.hard_negatives == f.hard_negatives
    for a, b in ((g.x_chunks, f.x_chunks), (g.chunk_doc, f.chunk_doc), (g.q_x, f.q_x), (g.q_offsets, f.q_offsets)):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_held_out_against_distractor_passages_keeps_scores_and_can_only_lower_recall():
    E = 24
    g = torch.Generator().manual_seed(3)
    A = [torch.linalg.qr(torch.randn(E, E, generator=g))[0] for _ in range(2)]
    held, extra = _synthetic(20, 4, A), _synthetic(60, 5, A)
    both = held.with_distractors(extra)
    assert both.n_docs == 80 and both.n_queries == held.n_queries and both.positives == held.positives
    assert torch.equal(both.chunk_doc[held.chunk_doc.shape[0]:], extra.chunk_doc + 20)
    eye = torch.eye(E)
    proj = RouterProjections((3, 5), [eye.clone(), eye.clone()], [eye[:12].clone(), eye[:12].clone()],
                             n_q_heads=2, n_kv_heads=1, head_dim=12)
    cfg = TrainConfig(ks=(1, 5, 16))
    small, big = evaluate(proj, held, cfg), evaluate(proj, both, cfg)
    assert torch.allclose(big["layer_scores"][:, :, :20], small["layer_scores"])
    assert all(big["recall"][k] <= small["recall"][k] for k in (1, 5, 16))


# ----------------------------------------------------------------------------- tiny real model

@pytest.fixture(scope="module")
def tiny_loaded():
    from msa_memory.encode import load_model
    from msa_memory.encode.tiny import tiny_model, tiny_tokenizer

    with pytest.warns(Warning):
        return load_model(tiny_model("gemma3"), tokenizer=tiny_tokenizer(), router_layers="all", chunk_tokens=16,
                          dtype=torch.float32)


TEXTS = [f"Passage {i}: the quick fox number {i} jumps over {i * 7} lazy dogs near river {i % 3}. " * (1 + i % 3)
         for i in range(12)]


def test_passage_features_equal_encoder_router_inputs(tiny_loaded):
    from msa_memory.encode import Encoder
    from msa_memory.schemas.records import Passage, to_float32
    from msa_memory.train.features import extract_passages

    x, chunk_doc = extract_passages(tiny_loaded, TEXTS, max_batch_tokens=300, dtype=torch.float32)
    enc = Encoder(tiny_loaded, keep_router_inputs=True, store_dtype="float32").encode(
        np.arange(len(TEXTS)), [Passage(t, "a.txt", i) for i, t in enumerate(TEXTS)])
    np.testing.assert_allclose(x.numpy(), to_float32(enc.x_router, "float32"), atol=1e-5)
    assert np.array_equal(np.bincount(chunk_doc.numpy()), enc.n_chunks)


def test_training_on_given_features_equals_training_from_pairs(tiny_loaded, tmp_path):
    """run_training(features=...) (what benchmarks/device_train.py runs on a GPU over features it
    extracted from pre-tokenized pairs) saves the same adapter as run_training on the pairs."""
    from msa_memory.encode import RouterAdapter, router_from_model_qk
    from msa_memory.train.features import extract_passage_tokens, extract_query_tokens, query_tokens
    from msa_memory.train.pairs import PairSet, Query
    from msa_memory.train.recipe import run_training

    def pairs(lo, hi):
        ps = PairSet(passages=TEXTS[lo:hi], sources=[f"t{i}" for i in range(lo, hi)])
        ps.queries = [Query(f"fox number {i} river", (i - lo,), "fact" if i % 2 else "ict") for i in range(lo, hi)]
        return ps

    train, dev = pairs(0, 9), pairs(9, 12)
    cfg = TrainConfig(epochs=2, batch_size=4, lr=1e-2, seed=0, n_random=4, hard_source="routing", n_hard=2)
    fresh = lambda: tiny_loaded.with_router(  # noqa: E731  (run_training swaps in its candidate subset)
        router_from_model_qk(tiny_loaded.hf_model, tiny_loaded.router.config, warn=False))
    common = dict(candidate_layers=(1, 2), max_layers=2, config=cfg, command="t", log=lambda s: None,
                  dev_distractors=True)
    a = run_training(out=tmp_path / "pairs", train_pairs=train, dev_pairs=dev, loaded=fresh(), **common)

    def feats(ps):
        seqs = [tiny_loaded.wrap_ids(t, i) for i, t in enumerate(ps.passages)]
        x, cd = extract_passage_tokens(tiny_loaded, seqs)
        qx, qoff = extract_query_tokens(tiny_loaded, [query_tokens(tiny_loaded.tokenizer, q.text) for q in ps.queries])
        return Features(tiny_loaded.router_layers, x, cd, len(seqs), qx, qoff, [q.positives for q in ps.queries],
                        [q.kind for q in ps.queries])

    b = run_training(out=tmp_path / "feats", features=(feats(train), feats(dev)), loaded=fresh(), **common)
    assert (a["train"], a["dev"]) == (b["train"], b["dev"]) == (train.counts(), dev.counts())
    assert a["router_layers"] == b["router_layers"] and a["router_id"] == b["router_id"]
    ta, tb = (RouterAdapter.load(tmp_path / n).state_tensors() for n in ("pairs", "feats"))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_query_features_are_text_mode_routing_rows(tiny_loaded):
    from msa_memory.train.features import extract_queries, query_tokens

    qs = ["where is the fox?", "count the dogs by river two"]
    qx, offs = extract_queries(tiny_loaded, qs, dtype=torch.float32)
    ids, skip = query_tokens(tiny_loaded.tokenizer, qs[1])
    bos = tiny_loaded.tokenizer.bos_token_id
    assert skip == (1 if ids[0] == bos else 0) and int(offs[2] - offs[1]) == len(ids) - skip
    # one query alone through the plain HF model gives the same input_layernorm outputs
    from msa_memory.testing.hf_kit import layer_input

    x = layer_input(tiny_loaded.hf_model, tiny_loaded.router_layers[-1], ids)
    np.testing.assert_allclose(qx[offs[1]:offs[2], -1].numpy(), x[skip:].numpy(), atol=1e-4)


def _adapter(tiny_loaded, seed, layers=(1, 3)):
    from msa_memory.train.recipe import adapter_from_projections

    rc = tiny_loaded.router.config
    g = torch.Generator().manual_seed(seed)
    proj = RouterProjections(tuple(layers), [torch.randn(rc.n_q_heads * rc.head_dim, rc.hidden_size, generator=g)
                                             for _ in layers],
                             [torch.randn(rc.n_kv_heads * rc.head_dim, rc.hidden_size, generator=g) for _ in layers],
                             rc.n_q_heads, rc.n_kv_heads, rc.head_dim)
    return adapter_from_projections(proj, rc, layers=layers, extra={"seed": seed}), proj


def test_adapter_save_load_round_trip(tiny_loaded, tmp_path):
    from msa_memory.encode import RouterAdapter

    ad, proj = _adapter(tiny_loaded, 0)
    ad.save(tmp_path / "r")
    back = RouterAdapter.load(tmp_path / "r")
    assert back.config == ad.config and back.config.router_layers == (1, 3) and back.config.score == "cosine"
    assert back.fingerprint() == ad.fingerprint()
    for i, l in enumerate((1, 3)):
        assert torch.equal(back.q_proj[str(l)].weight, proj.q[i].detach())
        assert torch.equal(back.k_proj[str(l)].weight, proj.k[i].detach())
    assert json.loads((tmp_path / "r" / "router_adapter.json").read_text())["extra"] == {"seed": 0}


def test_adapter_records_the_reducers_it_was_trained_with(tiny_loaded, tmp_path):
    from msa_memory.encode import RouterAdapter
    from msa_memory.train.recipe import adapter_from_projections

    _, proj = _adapter(tiny_loaded, 0)
    cfg = TrainConfig(score="dot", head_reduce="max", query_reduce="mean", chunk_reduce="mean")
    ad = adapter_from_projections(proj, tiny_loaded.router.config, train_config=cfg)
    ad.save(tmp_path / "r")
    back = RouterAdapter.load(tmp_path / "r").config
    assert (back.score, back.head_reduce, back.query_reduce, back.chunk_reduce) == ("dot", "max", "mean", "mean")


def _store(root, loaded, texts, keep=True):
    from msa_memory.encode import Encoder
    from msa_memory.schemas.records import Passage
    from msa_memory.store import create_store, write_shard

    enc_ = Encoder(loaded, keep_router_inputs=keep, store_dtype="bfloat16", max_batch_tokens=400)
    st = create_store(root, enc_.identity())
    ids = st.reserve_ids(len(texts))
    ps = [Passage(t, f"doc{i}.txt", 0) for i, t in enumerate(texts)]
    return st.commit(add=[write_shard(root, "s0", ps, enc_.encode(ids, ps))]), ids


def test_reindex_gives_fresh_encode_router_keys(tiny_loaded, tmp_path):

    from msa_memory.schemas.records import to_float32
    from msa_memory.train.reindex import reindex_router_to

    src, ids = _store(tmp_path / "a.msa", tiny_loaded, TEXTS)
    new_ad, _ = _adapter(tiny_loaded, 7)
    out, stats = reindex_router_to(src, tmp_path / "b.msa", new_ad)
    assert stats["docs"] == len(TEXTS) and out.identity.router_id == new_ad.fingerprint()
    assert out.identity.router_layers == (1, 3)
    fresh_model = tiny_loaded.with_router(new_ad)
    fresh, _ = _store(tmp_path / "c.msa", fresh_model, TEXTS)
    assert fresh.identity.compatible_with(out.identity) == []
    for pos in range(2):
        k_re, d_re = out.router_keys(pos)
        k_fr, d_fr = fresh.router_keys(pos)
        assert np.array_equal(d_re, d_fr)
        # keys from bf16-stored inputs vs fp32 inputs: equal up to bf16 rounding
        np.testing.assert_allclose(to_float32(k_re, "bfloat16"), to_float32(k_fr, "bfloat16"), atol=2e-2, rtol=2e-2)
    a, b = out.load_kv(ids[:3]), fresh.load_kv(ids[:3])
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert out.texts(ids) == list(TEXTS)
    # the runtime opens a re-keyed store (it keeps x_router) with the new adapter and routes with it
    from msa_memory.runtime import Memory

    hits, _, _ = Memory(out, model=fresh_model).route(TEXTS[4][:40], k=3)
    assert len(hits) == 3 and set(hits) <= set(ids.tolist())
    # the same through the CLI
    from typer.testing import CliRunner

    from msa_memory.cli import app

    new_ad.save(tmp_path / "adapter")
    r = CliRunner().invoke(app, ["store", "reindex-router", str(tmp_path / "a.msa"), "--adapter",
                                 str(tmp_path / "adapter"), "--dest", str(tmp_path / "d.msa"), "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["docs"] == len(TEXTS) and res["router_id"] == new_ad.fingerprint() and res["layers"] == [1, 3]


def test_store_pairs_training_reads_kept_router_inputs_instead_of_encoding(tiny_loaded, tmp_path, monkeypatch):
    """--store --pairs: passages are the store's texts unchanged, so x̄ comes from the store (equal to
    a fresh extraction up to bf16 rounding); a store without router inputs is encoded again."""
    from msa_memory.encode import Encoder
    from msa_memory.schemas.records import Passage
    from msa_memory.store import create_store, write_shard
    from msa_memory.train import features as feats_mod
    from msa_memory.train.cli_support import train_router_from_cli

    texts = [t + f" Extra words {i}." * (i % 4) for i, t in enumerate(TEXTS * 2)]  # 24 docs, varied chunk counts
    root = tmp_path / "kept.msa"
    st, ids = _store(root, tiny_loaded, texts)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps({"query": f"fox number {i} river", "positive_ids": [int(ids[i])]})
                                for i in range(len(texts))))
    fresh, _ = feats_mod.extract_passages(tiny_loaded, texts)
    from_store = feats_mod.store_features(tiny_loaded, st, [int(d) for d in ids], [])
    assert from_store is not None and from_store.n_docs == len(texts)
    np.testing.assert_allclose(from_store.x_chunks.float().numpy(), fresh.float().numpy(), rtol=2e-2, atol=2e-2)

    calls = []
    real = feats_mod.extract_passages
    monkeypatch.setattr(feats_mod, "extract_passages", lambda *a, **k: calls.append(1) or real(*a, **k))
    lines: list[str] = []
    common = dict(corpus=None, model="unused", layers="all", max_layers=2, epochs=1, batch_size=8, lr=1e-2,
                  n_train=0, n_dev=10, seed=0, cache=None, device="cpu", command="t", loaded=tiny_loaded)
    summary = train_router_from_cli(out=str(tmp_path / "r1"), store=str(root), pairs=str(pairs), log=lines.append,
                                    **common)
    assert not calls and any("read from the store's kept router inputs" in x for x in lines), lines
    assert summary["train"]["queries"] + summary["dev"]["queries"] == len(texts)

    # the same store without router inputs: the texts are encoded again (and say so)
    enc = Encoder(tiny_loaded, keep_router_inputs=False, max_batch_tokens=400)
    bare = create_store(tmp_path / "bare.msa", enc.identity())
    bids = bare.reserve_ids(len(texts))
    ps = [Passage(t, f"doc{i}.txt", 0) for i, t in enumerate(texts)]
    bare = bare.commit(add=[write_shard(tmp_path / "bare.msa", "s0", ps, enc.encode(bids, ps))])
    pairs.write_text("\n".join(json.dumps({"query": f"fox number {i}", "positive_ids": [int(bids[i])]})
                                for i in range(len(texts))))
    lines.clear()
    train_router_from_cli(out=str(tmp_path / "r2"), store=str(tmp_path / "bare.msa"), pairs=str(pairs),
                          log=lines.append, **common)
    assert calls and any("keeps no router inputs" in x for x in lines), lines


def test_store_adaptation_starts_from_the_adapter_keeps_its_layers_and_rekeys_in_place(tiny_loaded, tmp_path):
    """--store --init-adapter A --keep-layers (the corpus adaptation of RECIPE's eighth session): training
    starts from A's weights (not the router the given model carries), keeps every layer whatever
    --max-layers says, and the store is re-keyed in place with the result; without --keep-layers the
    selection may drop a layer, which an in-place re-key refuses."""
    from msa_memory.encode import RouterAdapter
    from msa_memory.train.cli_support import train_router_from_cli
    from msa_memory.train.recipe import self_supervised_pairs
    from msa_memory.train.reindex import reindex_router

    texts = [t + f" Another sentence here {i}. And one more, {i * 3}." for i, t in enumerate(TEXTS * 2)]
    root = tmp_path / "mem.msa"
    st, ids = _store(root, tiny_loaded, texts)
    start, _ = _adapter(tiny_loaded, 11, layers=(0, 1, 2, 3))          # not the weights tiny_loaded carries
    start.save(tmp_path / "start")
    common = dict(corpus=None, pairs=None, model="unused", layers="0,1,2,3", batch_size=8, lr=1e-2, n_train=0, n_dev=10,
                  seed=0, cache=None, device="cpu", command="t", loaded=tiny_loaded, log=lambda m: None,
                  init_adapter=str(tmp_path / "start"))
    s0 = train_router_from_cli(out=str(tmp_path / "r0"), store=str(root), max_layers=1, epochs=0, keep_layers=True,
                               **common)
    assert s0["router_layers"] == [0, 1, 2, 3] and s0["selection"] == [] and not (tmp_path / "r0" / "candidates").exists()
    got0 = RouterAdapter.load(tmp_path / "r0")
    for l in ("0", "1", "2", "3"):                            # 0 epochs: exactly the starting adapter's weights
        assert torch.equal(got0.q_proj[l].weight, start.q_proj[l].weight)
    s1 = train_router_from_cli(out=str(tmp_path / "r1"), store=str(root), max_layers=1, epochs=1, keep_layers=True,
                               **common)
    adapted = RouterAdapter.load(tmp_path / "r1")
    assert adapted.config.router_layers == (0, 1, 2, 3) and s1["train"]["queries"] > 0
    assert not torch.equal(adapted.q_proj["1"].weight, start.q_proj["1"].weight)
    new, _ = reindex_router(st, adapted)
    assert new.identity.router_id == adapted.fingerprint() and new.version > st.version
    assert new.texts(ids) == texts                  # the documents are untouched
    s2 = train_router_from_cli(out=str(tmp_path / "r2"), store=str(root), max_layers=1, epochs=1, **common)
    one = RouterAdapter.load(tmp_path / "r2")
    assert len(s2["router_layers"]) == 1 and one.config.router_layers == tuple(s2["router_layers"])
    with pytest.raises(IdentityMismatchError, match="differ from store"):
        reindex_router(new, one)
    # the pairs: a tenth (at least 10) of the documents held out, deterministic, every query on its own split
    tr, dev = self_supervised_pairs([(f"d{i}", t) for i, t in enumerate(texts)], seed=0)
    again = self_supervised_pairs([(f"d{i}", t) for i, t in enumerate(texts)], seed=0)
    assert len(dev.passages) == 10 and len(tr.passages) == len(texts) - 10
    assert [q.text for q in tr.queries] == [q.text for q in again[0].queries]
    assert all(p < len(ps.passages) for ps in (tr, dev) for q in ps.queries for p in q.positives)
    assert {s for s in dev.sources}.isdisjoint(tr.sources)
    with pytest.raises(ConfigError, match="too few"):
        self_supervised_pairs([(f"d{i}", t) for i, t in enumerate(texts[:15])])


def test_reindex_refuses_layers_the_store_did_not_keep(tiny_loaded, tmp_path):

    from msa_memory.encode import RouterAdapter
    from msa_memory.train.reindex import reindex_router, reindex_router_to

    small = tiny_loaded.with_router(tiny_loaded.router.subset((0, 1)))
    src, _ = _store(tmp_path / "a.msa", small, TEXTS[:4])
    ad, _ = _adapter(tiny_loaded, 1, layers=(1, 3))
    assert isinstance(ad, RouterAdapter)
    with pytest.raises(IdentityMismatchError, match="did not keep"):
        reindex_router_to(src, tmp_path / "b.msa", ad)
    with pytest.raises(IdentityMismatchError, match="did not keep"):
        reindex_router(src, ad)
    # the earlier (src, dest, adapter) form still means a copy into a new store
    with pytest.raises(IdentityMismatchError, match="did not keep"):
        reindex_router(src, tmp_path / "b.msa", ad)
    assert not (tmp_path / "b.msa").exists()


# ----------------------------------------------------------------------------- end to end (CLI)

def _cli_model_and_corpus(tmp_path):
    """A tiny HF model folder and a 6-file corpus for the train-router CLI."""
    from msa_memory.encode.tiny import tiny_model, tiny_tokenizer

    mdir = tmp_path / "tiny"
    tiny_model("gemma3").save_pretrained(mdir)
    tiny_tokenizer().save_pretrained(mdir)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    words = ["river", "stone", "garden", "engine", "window", "signal", "copper", "forest", "ladder", "market"]
    for i in range(6):
        paras = []
        for _ in range(4):
            sents = [" ".join(rng.choice(words, 6)).capitalize() + f" number {rng.integers(100)}." for _ in range(4)]
            paras.append(" ".join(sents))
        (corpus / f"f{i}.txt").write_text("\n\n".join(paras))
    return mdir, corpus


def test_cli_train_router_and_reindex(tmp_path):
    """`msa train-router` on a tiny HF model + a small corpus writes a loadable adapter whose
    dev recall is reported per epoch; `msa store reindex-router` applies it to a store."""
    from typer.testing import CliRunner

    from msa_memory.cli import app
    from msa_memory.encode import RouterAdapter

    mdir, corpus = _cli_model_and_corpus(tmp_path)
    out = tmp_path / "router"
    r = CliRunner().invoke(app, ["train-router", "--corpus", str(corpus), "--model", str(mdir), "--out", str(out),
                                 "--layers", "1,3", "--max-layers", "1", "--epochs", "1", "--batch-size", "8",
                                 "--max-chars", "300", "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert [h["epoch"] for h in summary["history"]] == [0, 1] and len(summary["router_layers"]) == 1
    assert summary["candidate_layers"] == [1, 3] and summary["train"]["queries"] > 0
    ad = RouterAdapter.load(out)
    assert ad.config.router_layers == tuple(summary["router_layers"]) and ad.fingerprint() == summary["router_id"]
    assert json.loads((out / "training.json").read_text())["command"].startswith("msa train-router")
    # every trained layer is kept beside the chosen subset, with the same weights for the chosen layer
    full = RouterAdapter.load(out / "candidates")
    assert full.config.router_layers == (1, 3) and summary["candidates_adapter"] == str(out / "candidates")
    (layer,) = ad.config.router_layers
    assert torch.equal(full.q_proj[str(layer)].weight, ad.q_proj[str(layer)].weight)
    assert (full.config.score, full.config.query_reduce) == (ad.config.score, ad.config.query_reduce)

    # --init-adapter starts from those weights (0 epochs: kept exactly); the reducers go into the adapter and command
    out2 = tmp_path / "router2"
    r = CliRunner().invoke(app, ["train-router", "--corpus", str(corpus), "--model", str(mdir), "--out", str(out2),
                                 "--layers", "1,3", "--max-layers", "2", "--epochs", "0", "--batch-size", "8",
                                 "--max-chars", "300", "--init-adapter", str(out / "candidates"),
                                 "--query-reduce", "mean", "--json"])
    assert r.exit_code == 0, r.output
    start = RouterAdapter.load(out2 / "candidates") if (out2 / "candidates").exists() else RouterAdapter.load(out2)
    for l in start.config.router_layers:
        assert torch.equal(start.q_proj[str(l)].weight, full.q_proj[str(l)].weight)
        assert torch.equal(start.k_proj[str(l)].weight, full.k_proj[str(l)].weight)
    assert start.config.query_reduce == "mean"
    cmd = json.loads((out2 / "training.json").read_text())["command"]
    assert f"--init-adapter {out / 'candidates'}" in cmd and "--query-reduce mean" in cmd

    # --freeze-layers: layer 1 kept exactly as the starting adapter has it, layer 3 trained, the command records it
    out3 = tmp_path / "router3"
    r = CliRunner().invoke(app, ["train-router", "--corpus", str(corpus), "--model", str(mdir), "--out", str(out3),
                                 "--layers", "1,3", "--max-layers", "2", "--epochs", "1", "--batch-size", "8",
                                 "--max-chars", "300", "--init-adapter", str(out / "candidates"),
                                 "--freeze-layers", "1", "--layer-loss", "sum", "--lr", "0.05", "--json"])
    assert r.exit_code == 0, r.output
    got = RouterAdapter.load(out3 / "candidates") if (out3 / "candidates").exists() else RouterAdapter.load(out3)
    assert got.config.router_layers == (1, 3)
    assert torch.equal(got.q_proj["1"].weight, full.q_proj["1"].weight)
    assert not torch.equal(got.q_proj["3"].weight, full.q_proj["3"].weight)
    assert "--freeze-layers 1" in json.loads((out3 / "training.json").read_text())["command"]
    bad = CliRunner().invoke(app, ["train-router", "--corpus", str(corpus), "--model", str(mdir), "--out",
                                   str(tmp_path / "r4"), "--layers", "1,3", "--freeze-layers", "1", "--json"])
    assert bad.exit_code == 2 and "--init-adapter" in bad.output

    bad = CliRunner().invoke(app, ["train-router", "--pairs", "x.jsonl", "--out", str(tmp_path / "r2"), "--json"])
    assert bad.exit_code == 2 and "--pairs needs --store" in bad.output

    # --shifted-layers: the saved adapters key the shifted grid at those of the layers they keep; recorded in the
    # command; a layer that is no candidate is refused before any training
    out5 = tmp_path / "router5"
    r = CliRunner().invoke(app, ["train-router", "--corpus", str(corpus), "--model", str(mdir), "--out", str(out5),
                                 "--layers", "1,3", "--max-layers", "2", "--keep-layers", "--epochs", "0",
                                 "--batch-size", "8", "--max-chars", "300", "--init-adapter", str(out / "candidates"),
                                 "--shifted-layers", "3", "--json"])
    assert r.exit_code == 0, r.output
    shifted = RouterAdapter.load(out5)
    assert shifted.config.shifted_layers == (3,) and shifted.fingerprint() == full.with_shifted_layers([3]).fingerprint()
    assert "--shifted-layers 3" in json.loads((out5 / "training.json").read_text())["command"]
    bad = CliRunner().invoke(app, ["train-router", "--corpus", str(corpus), "--model", str(mdir), "--out",
                                   str(tmp_path / "r6"), "--layers", "1,3", "--max-chars", "300", "--shifted-layers", "2",
                                   "--json"])
    assert bad.exit_code == 2 and "--shifted-layers [2] are not among the candidate layers [1, 3]" in bad.output
    # --shifted-window: that grid's windows finer than the chunks; recorded; without --shifted-layers refused
    out7 = tmp_path / "router7"
    r = CliRunner().invoke(app, ["train-router", "--corpus", str(corpus), "--model", str(mdir), "--out", str(out7),
                                 "--layers", "1,3", "--max-layers", "2", "--keep-layers", "--epochs", "0",
                                 "--batch-size", "8", "--max-chars", "300", "--init-adapter", str(out / "candidates"),
                                 "--shifted-layers", "3", "--shifted-window", "4", "--json"])
    assert r.exit_code == 0, r.output
    fine = RouterAdapter.load(out7)
    assert fine.config.shifted_window == 4 and fine.fingerprint() == full.with_shifted_layers([3], 4).fingerprint()
    assert "--shifted-layers 3 --shifted-window 4" in json.loads((out7 / "training.json").read_text())["command"]
    for extra, msg in ((["--shifted-window", "4"], "name its layers too"),
                       (["--shifted-layers", "3", "--shifted-window", "5"], "shifted_window must be an even number")):
        bad = CliRunner().invoke(app, ["train-router", "--corpus", str(corpus), "--model", str(mdir), "--out",
                                       str(tmp_path / "r8"), "--layers", "1,3", "--max-chars", "300", *extra, "--json"])
        assert bad.exit_code == 2 and msg in bad.output, bad.output


def test_cli_train_router_with_a_query_suffix(tmp_path):
    """`--query-suffix` (with `--query-reduce last`): the queries' features are read with the suffix appended
    (cached apart from bare ones), the adapter carries it, the recorded command gives it back through bash;
    without `--query-reduce last` it is refused before any work."""
    import subprocess

    from typer.testing import CliRunner

    from msa_memory.cli import app
    from msa_memory.encode import RouterAdapter
    from msa_memory.train.features import load_features, query_tokens

    mdir, corpus = _cli_model_and_corpus(tmp_path)
    suffix = "\nThis passage is about"
    out, cache = tmp_path / "router", tmp_path / "cache"
    args = ["train-router", "--corpus", str(corpus), "--model", str(mdir), "--out", str(out), "--layers", "1,3",
            "--keep-layers", "--epochs", "1", "--batch-size", "8", "--max-chars", "300", "--cache", str(cache),
            "--query-reduce", "last", "--query-suffix", suffix, "--json"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    ad = RouterAdapter.load(out)
    assert (ad.config.query_reduce, ad.config.query_suffix) == ("last", suffix)
    cached = sorted(f.name for f in cache.iterdir())
    assert len(cached) == 2 and all("-suffix-" in n for n in cached), cached
    dev = load_features(str(next(cache.glob("dev-*.pt"))))
    assert dev.query_suffix == suffix
    from transformers import AutoTokenizer

    tk = AutoTokenizer.from_pretrained(mdir)
    n_sfx = len(tk(suffix, add_special_tokens=False)["input_ids"])
    assert n_sfx > 0
    rows = (dev.q_offsets[1:] - dev.q_offsets[:-1]).tolist()
    from msa_memory.train.recipe import files_pairs

    _, dev_pairs = files_pairs([str(corpus)], seed=0, max_chars=300)
    want = [len(query_tokens(tk, q.text, suffix)[0]) - query_tokens(tk, q.text, suffix)[1] for q in dev_pairs.queries]
    assert rows == want
    cmd = json.loads((out / "training.json").read_text())["command"]
    assert "--query-reduce last --query-suffix $'\\nThis passage is about'" in cmd
    word = cmd.split("--query-suffix ", 1)[1].split(" --", 1)[0]
    assert subprocess.run(["bash", "-c", f"printf %s {word}"], capture_output=True, text=True).stdout == suffix
    bad = CliRunner().invoke(app, [a if a != "last" else "max" for a in args])
    assert bad.exit_code == 2 and "needs query_reduce 'last'" in bad.output, bad.output
    # --freeze-keys: only the query projections learn (the starting adapter's keys stay valid); needs --init-adapter
    out2 = tmp_path / "router2"
    args2 = [a if a != str(out) else str(out2) for a in args]
    stamps = {f.name: f.stat().st_mtime_ns for f in cache.iterdir()}
    r = CliRunner().invoke(app, args2 + ["--init-adapter", str(out), "--freeze-keys", "--lr", "0.05"])
    assert r.exit_code == 0, r.output
    assert {f.name: f.stat().st_mtime_ns for f in cache.iterdir()} == stamps       # the suffixed features reused
    got = RouterAdapter.load(out2)
    for l in got.config.router_layers:
        assert torch.equal(got.k_proj[str(l)].weight, ad.k_proj[str(l)].weight)
        assert not torch.equal(got.q_proj[str(l)].weight, ad.q_proj[str(l)].weight)
    assert json.loads((out2 / "training.json").read_text())["command"].endswith("--freeze-keys")
    bad = CliRunner().invoke(app, args2 + ["--freeze-keys"])
    assert bad.exit_code == 2 and "--freeze-keys" in bad.output and "--init-adapter" in bad.output, bad.output


def test_chunks_of_equals_the_per_passage_ranges():
    """Features.chunks_of (the vectorised gather of a training step) == concatenated per-passage ranges."""
    rng = np.random.default_rng(0)
    counts = rng.integers(1, 5, 40)
    cd = torch.repeat_interleave(torch.arange(40), torch.as_tensor(counts))
    f = Features((0,), torch.zeros(1, len(cd), 2), cd, 40, torch.zeros(3, 1, 2), torch.tensor([0, 3]), [(0,)])
    docs = torch.tensor(sorted(rng.choice(40, 17, replace=False).tolist()))
    cidx, owner = f.chunks_of(docs)
    offs = f.doc_chunk_offsets
    ranges = [torch.arange(int(offs[d]), int(offs[d + 1])) for d in docs.tolist()]
    assert torch.equal(cidx, torch.cat(ranges))
    assert torch.equal(owner, torch.repeat_interleave(torch.arange(len(ranges)), torch.tensor([len(r) for r in ranges])))
    assert torch.equal(cd[cidx], docs[owner])


def test_reindex_of_a_fine_shifted_grid(tiny_loaded, tmp_path):
    """A store whose shifted grid is finer than its chunks (windows of 2 tokens): reindex-router re-keys it
    like a fresh encode, and refuses an adapter whose grid has other windows (the kept inputs are the
    store's windows)."""
    from msa_memory.schemas.records import to_float32
    from msa_memory.train.reindex import reindex_router, reindex_router_to

    start, _ = _adapter(tiny_loaded, 3)
    start = start.with_shifted_layers([3], 2)
    texts = [t + f" Another sentence here {i}." for i, t in enumerate(TEXTS)]
    src, _ = _store(tmp_path / "a.msa", tiny_loaded.with_router(start), texts)
    assert src.identity.shifted_window == 2
    new_ad, _ = _adapter(tiny_loaded, 7)
    with pytest.raises(IdentityMismatchError, match="windows of"):
        reindex_router(src, new_ad.with_shifted_layers([3]))
    with pytest.raises(IdentityMismatchError, match="windows of"):
        reindex_router_to(src, tmp_path / "x.msa", new_ad.with_shifted_layers([3]))
    new_f = new_ad.with_shifted_layers([3], 2)
    fresh, _ = _store(tmp_path / "fresh.msa", tiny_loaded.with_router(new_f), texts)
    got, _ = reindex_router(src, new_f)
    assert got.identity.router_id == new_f.fingerprint() and got.identity.shifted_window == 2
    (k, d), (k_fr, d_fr) = got.router_keys_shifted(0), fresh.router_keys_shifted(0)
    assert np.array_equal(d, d_fr)
    np.testing.assert_allclose(to_float32(k, "bfloat16"), to_float32(k_fr, "bfloat16"), atol=2e-2, rtol=2e-2)


def test_reindex_and_adaptation_keep_the_shifted_grid(tiny_loaded, tmp_path):
    """A store built with a shifted grid (layer 3): reindex-router re-keys both grids (equal to a fresh encode
    with the new adapter, up to bf16 rounding of the kept inputs), in place only with the store's shifted
    layers, into a new store with any subset of them; training from it (--init-adapter) keeps the grid."""
    from msa_memory.encode import RouterAdapter
    from msa_memory.schemas.records import to_float32
    from msa_memory.store import open_store
    from msa_memory.train.cli_support import train_router_from_cli
    from msa_memory.train.reindex import reindex_router, reindex_router_to

    start, _ = _adapter(tiny_loaded, 3)
    start = start.with_shifted_layers([3])
    texts = [t + f" Another sentence here {i}. And one more, {i * 3}." for i, t in enumerate(TEXTS * 2)]
    src, ids = _store(tmp_path / "a.msa", tiny_loaded.with_router(start), texts)
    assert src.identity.shifted_layers == (3,)
    new_ad, _ = _adapter(tiny_loaded, 7)
    with pytest.raises(IdentityMismatchError, match="shifted layers"):
        reindex_router(src, new_ad)
    new_s = new_ad.with_shifted_layers([3])
    fresh, _ = _store(tmp_path / "fresh.msa", tiny_loaded.with_router(new_s), texts)
    for got in (reindex_router(src, new_s)[0], reindex_router_to(src, tmp_path / "b.msa", new_s)[0]):
        assert got.identity.router_id == new_s.fingerprint() and got.identity.shifted_layers == (3,)
        k, d = got.router_keys_shifted(0)
        k_fr, d_fr = fresh.router_keys_shifted(0)
        assert np.array_equal(d, d_fr)
        np.testing.assert_allclose(to_float32(k, "bfloat16"), to_float32(k_fr, "bfloat16"), atol=2e-2, rtol=2e-2)
    plain, _ = reindex_router_to(src, tmp_path / "c.msa", new_ad)          # a copy may leave the grid out
    assert plain.identity.shifted_layers == () and not any(p.name == "k_router_s" for p in plain.root.rglob("*"))
    # corpus adaptation from the shifted adapter keeps its grid, so the result re-keys the store in place
    start.save(tmp_path / "start")
    s = train_router_from_cli(out=str(tmp_path / "r1"), store=str(tmp_path / "a.msa"), corpus=None, pairs=None,
                              model="unused", layers="1,3", max_layers=2, epochs=1, batch_size=8, lr=1e-2, n_train=0,
                              n_dev=10, seed=0, cache=None, device="cpu", command="t", loaded=tiny_loaded,
                              log=lambda m: None, init_adapter=str(tmp_path / "start"), keep_layers=True)
    adapted = RouterAdapter.load(tmp_path / "r1")
    assert adapted.config.shifted_layers == (3,) and s["router_layers"] == [1, 3]
    new, _ = reindex_router(open_store(tmp_path / "a.msa"), adapted)     # the latest version (re-keyed above)
    assert new.identity.router_id == adapted.fingerprint()


def test_a_router_with_the_same_keys_reroutes_a_store_in_place_without_router_inputs(tiny_loaded, tmp_path):
    """`msa store reindex-router STORE --adapter A` (no --dest) for a store without router inputs, where A has
    the key projections of the version's router (here: the same router plus a suffix query, as the default is
    tokenmax plus one): a new version names A, keeps every stored key (no key array written) and routes as a
    store built by A does; and back. Other keys, other layers or a wrong source router are refused with
    nothing published; the older versions keep their router."""
    import dataclasses

    from msa_memory.encode import RouterAdapter
    from msa_memory.errors import ConfigError
    from msa_memory.runtime import Memory
    from msa_memory.store import open_store
    from msa_memory.train.reindex import reindex_router

    full, _ = _adapter(tiny_loaded, 3)
    full = full.with_shifted_layers([1, 3], 4)
    texts = [t + f" Another sentence here {i}. And one more, {i * 3}." for i, t in enumerate(TEXTS * 2)]
    src, ids = _store(tmp_path / "a.msa", tiny_loaded.with_router(full), texts, keep=False)
    assert src.identity.hidden_size == 0 and src.version == 1
    sq = RouterAdapter(dataclasses.replace(full.config, router_layers=(3,), shifted_layers=(3,),
                                           query_reduce="last", query_suffix="\nThis passage is about"))
    t = full.state_tensors()
    t["model.layers.3.self_attn.router_q_proj.0.weight"] = torch.randn(sq.q_proj["3"].weight.shape,
                                                                        generator=torch.Generator().manual_seed(5))
    sq.load_tensors(t)
    with_sq = full.with_suffix_queries(sq)
    fresh, _ = _store(tmp_path / "fresh.msa", tiny_loaded.with_router(with_sq), texts, keep=False)
    new, stats = reindex_router(src, with_sq, source_adapter=full, message="suffix query")
    assert stats["copied"] and not stats["unchanged"] and stats["version"] == new.version == 2
    assert stats["chunks"] == src.stats()["n_chunks"] and stats["seconds_keys"] == 0
    assert new.identity.router_id == with_sq.fingerprint() == fresh.identity.router_id
    assert new.manifest["operation"] == "reindex" and new.manifest["message"] == "suffix query"
    assert new.manifest["changes"]["previous_router_id"] == full.fingerprint()
    assert not (tmp_path / "a.msa" / "router_keys").exists()                 # nothing but the manifest written
    assert new.manifest["shards"] == src.manifest["shards"]
    for p in range(2):
        assert np.array_equal(new.router_keys(p)[0], fresh.router_keys(p)[0])
        assert np.array_equal(new.router_keys_shifted(p)[0], fresh.router_keys_shifted(p)[0])
    q = "Where does the quick fox number 5 jump?"
    model = tiny_loaded.with_router(with_sq)
    a, b = Memory(open_store(tmp_path / "a.msa"), model=model).search(q, k=5), Memory(fresh, model=model).search(q, k=5)
    assert a.column("doc_id").to_pylist() == b.column("doc_id").to_pylist()
    assert np.allclose(a.column("score").to_numpy(), b.column("score").to_numpy())
    assert open_store(tmp_path / "a.msa", version=1).identity.router_id == full.fingerprint()   # v1 keeps its own
    # again: nothing to do; back to the router that built it: the keys are the same the other way round too
    again, stats = reindex_router(new, with_sq, source_adapter=with_sq)
    assert stats["unchanged"] and again.version == 2
    with pytest.raises(IdentityMismatchError, match="source_adapter has router id"):
        reindex_router(new, full, source_adapter=full)                      # v2 is routed by with_sq now
    back, stats = reindex_router(new, full, source_adapter=with_sq)
    assert stats["copied"] and back.version == 3 and back.identity.router_id == full.fingerprint()
    # other keys, other layers: refused, nothing published
    other, _ = _adapter(tiny_loaded, 7)
    with pytest.raises(ConfigError, match="keeps no router inputs"):
        reindex_router(back, other.with_shifted_layers([1, 3], 4), source_adapter=full)
    with pytest.raises(IdentityMismatchError, match="differ from store"):
        reindex_router(back, full.subset([3]), source_adapter=full)
    with pytest.raises(IdentityMismatchError, match="shifted layers"):
        reindex_router(back, full.with_shifted_layers([3], 4), source_adapter=full)
    assert open_store(tmp_path / "a.msa").version == 3
    report = open_store(tmp_path / "a.msa").verify()
    assert report["ok"], report


@pytest.mark.parametrize("window", [None, 4])
def test_a_part_of_the_store_router_is_copied_without_router_inputs(tiny_loaded, tmp_path, window):
    """A store that kept no router inputs can still be copied (--dest) to a part of the router that built it:
    fewer layers, its shifted grid at fewer layers, or none (a store of the default adapter → `aligned`).
    The copy's router keys and K̄V̄ are the source's rows bit for bit and equal a fresh encode with that part,
    and Memory routes it as it routes the fresh store. Any other adapter is refused with the inputs error, a
    source_adapter that did not build the store by its id; nothing is written then."""
    from msa_memory.errors import ConfigError
    from msa_memory.runtime import Memory
    from msa_memory.store import open_store
    from msa_memory.train.reindex import reindex_router_to

    full, _ = _adapter(tiny_loaded, 3)
    full = full.with_shifted_layers([1, 3], window)
    texts = [t + f" Another sentence here {i}. And one more, {i * 3}." for i, t in enumerate(TEXTS * 2)]
    src, ids = _store(tmp_path / "a.msa", tiny_loaded.with_router(full), texts, keep=False)
    assert src.identity.hidden_size == 0 and src.identity.shifted_window == window
    import dataclasses

    from msa_memory.encode import RouterAdapter

    sq = RouterAdapter(dataclasses.replace(full.config, router_layers=(3,), shifted_layers=(), shifted_window=None,
                                           query_reduce="last", query_suffix="\nThis passage is about"))
    t = full.state_tensors()
    t["model.layers.3.self_attn.router_q_proj.0.weight"] = torch.randn(sq.q_proj["3"].weight.shape,
                                                                        generator=torch.Generator().manual_seed(5))
    sq.load_tensors(t)
    parts = {"aligned": full.with_shifted_layers([]), "layer3": full.subset([3]),
             "grid3": full.with_shifted_layers([3]), "same": full,
             "suffix query": full.with_suffix_queries(sq)}      # the same keys: suffix queries read them
    for name, part in parts.items():
        fresh, _ = _store(tmp_path / f"fresh-{name}.msa", tiny_loaded.with_router(part), texts, keep=False)
        out, stats = reindex_router_to(src, tmp_path / f"{name}.msa", part, source_adapter=full)
        out = open_store(tmp_path / f"{name}.msa")
        assert stats["copied"] and stats["docs"] == len(texts)
        for f in ("router_id", "router_layers", "shifted_layers", "shifted_window", "hidden_size"):
            assert getattr(out.identity, f) == getattr(fresh.identity, f), (name, f)
        for p, l in enumerate(part.config.router_layers):
            k, d = out.router_keys(p)
            assert np.array_equal(k, src.router_keys(full.config.router_layers.index(l))[0])
            assert np.array_equal(k, fresh.router_keys(p)[0]) and np.array_equal(d, fresh.router_keys(p)[1])
        for j, l in enumerate(part.config.shifted_layers):
            assert np.array_equal(out.router_keys_shifted(j)[0], fresh.router_keys_shifted(j)[0])
        kv_pos = [full.config.router_layers.index(l) for l in part.config.router_layers]
        for got, want, whole in zip(out.load_kv(ids), fresh.load_kv(ids), src.load_kv(ids)):
            assert np.array_equal(got, want) and np.array_equal(got, whole[:, kv_pos])
        model = tiny_loaded.with_router(part)
        q = "Where does the quick fox number 5 jump?"
        a, b = Memory(out, model=model).search(q, k=5), Memory(fresh, model=model).search(q, k=5)
        assert a.column("doc_id").to_pylist() == b.column("doc_id").to_pylist()
    other, _ = _adapter(tiny_loaded, 7)
    for bad in (other, other.with_shifted_layers([3], window), full.with_shifted_layers([3], 2 if window else 4)):
        with pytest.raises(ConfigError, match="keeps no router inputs"):
            reindex_router_to(src, tmp_path / "bad.msa", bad, source_adapter=full)
        assert not (tmp_path / "bad.msa").exists()
    with pytest.raises(IdentityMismatchError, match="source_adapter has router id"):
        reindex_router_to(src, tmp_path / "bad.msa", parts["aligned"], source_adapter=other)
    assert not (tmp_path / "bad.msa").exists()
    # a store that kept its inputs: a part's keys are copied too (the encoder's own, not recomputed from the
    # bf16 inputs), and the inputs of the kept layers travel with them
    kept, _ = _store(tmp_path / "kept.msa", tiny_loaded.with_router(full), texts)
    out, stats = reindex_router_to(kept, tmp_path / "kept-part.msa", parts["grid3"], source_adapter=full)
    assert stats["copied"] and out.identity.hidden_size == kept.identity.hidden_size > 0
    for p in range(2):                                                   # layers 1, 3; the grid at 3 alone
        assert np.array_equal(out.router_keys(p)[0], kept.router_keys(p)[0])
        assert np.array_equal(out.router_inputs(p)[0], kept.router_inputs(p)[0])
    assert np.array_equal(out.router_keys_shifted(0)[0], kept.router_keys_shifted(1)[0])
    assert np.array_equal(out.router_inputs_shifted(0)[0], kept.router_inputs_shifted(1)[0])


def test_cli_train_router_distills_a_bm25_teacher(tmp_path):
    """`msa train-router --objective distill` (BM25 teacher over the corpus' own queries) trains and records the
    options; a bad --objective or --teacher, or --queries with --corpus, is refused before any work."""
    from typer.testing import CliRunner

    from msa_memory.cli import app

    mdir, corpus = _cli_model_and_corpus(tmp_path)
    out = tmp_path / "router"
    base = ["train-router", "--corpus", str(corpus), "--model", str(mdir), "--layers", "1,3", "--keep-layers",
            "--epochs", "1", "--batch-size", "8", "--max-chars", "300", "--json"]
    r = CliRunner().invoke(app, [*base, "--out", str(out), "--objective", "distill", "--teacher", "bm25",
                                 "--teacher-mined", "3", "--teacher-random", "2"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["train"]["queries"] > 0 and sorted(summary["router_layers"]) == [1, 3]
    cmd = json.loads((out / "training.json").read_text())["command"]
    for part in ("--objective distill", "--teacher bm25", "--teacher-mined 3", "--teacher-random 2"):
        assert part in cmd
    for flag, value in (("--objective", "contrastive"), ("--teacher", "gpt"), ("--queries", "summary")):
        bad = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "bad"), "--objective", "distill", flag, value])
        assert bad.exit_code == 2 and (value if flag != "--queries" else flag) in bad.output
        assert not (tmp_path / "bad").exists()
