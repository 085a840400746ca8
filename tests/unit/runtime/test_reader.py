"""Reader adapters (question-side LoRA) and their training forward, on tiny random-weight models.

- The hooked LoRA equals its slow reference: the same model with ``W + (alpha/rank)·B·A`` merged into the
  weights (fp32, hidden sizes ≤ 64: the two differ by reassociation of sums of a few hundred terms, far
  below the 1e-4 bound), for every supported family; the reader is off outside requests that ask for it.
- The training forward (``MsaEngine.forward(grad=True)`` + the LM head) gives the logits of the inference
  forward with the same routes, so training optimises what ``Memory.ask(mode="pooled")`` runs.
- Gold forcing puts the gold passage in every layer's route; training lowers the answer loss.
- End-to-end (a writer LoRA active while the routed documents are encoded in the training graph): the
  differentiable pooled forward (``train.reader.pooled_kv``) gives the K̄V̄ the encoder stored; with a writer at
  B = 0 the answer loss is the one without a writer; the loss reaches the writer, and training lowers it.
- Files: save/load round trip; clear errors for a folder that is no adapter, another model's fingerprint
  and factors that do not fit the model.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from msa_memory.encode.tiny import FAMILIES, tiny_model
from msa_memory.errors import ConfigError, ModelLoadError
from msa_memory.runtime.engine import MsaEngine
from msa_memory.runtime.reader import READER_TARGETS, ReaderAdapter, ReaderConfig
from msa_memory.testing.numerics import gamma
from msa_memory.train.reader import ReaderQuestion, ReaderTrainer, lm_logits, pooled_kv


def _targets(model):
    layer = model.model.layers[0]
    return [t for t, part in READER_TARGETS.items() if hasattr(getattr(layer, part), t)]


def _random_reader(model, seed=0, rank=4):
    cfg = ReaderConfig(rank=rank, alpha=8.0, targets=_targets(model), layers=list(range(len(model.model.layers))))
    r = ReaderAdapter.for_model(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in r.params.values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return r


def _merged(model, reader):
    """The slow reference: a copy of ``model`` with the reader's update merged into its weights."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for key in reader.keys():
            li, t = key.split(".")
            lin = getattr(getattr(ref.model.layers[int(li)], READER_TARGETS[t]), t)
            a, b = reader.factors(key)
            lin.weight += (reader.config.scale * (b @ a)).to(lin.weight.dtype)
    return ref


@pytest.mark.parametrize("family", FAMILIES)
def test_reader_hooks_equal_the_merged_weights_and_are_off_elsewhere(family):
    model = tiny_model(family)
    ids = torch.randint(6, 262, (20,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        base = model(torch.tensor([ids])).logits[0, -1].float()
    reader = _random_reader(model).attach(model)
    with torch.no_grad():
        ref = _merged(model, reader)(torch.tensor([ids])).logits[0, -1].float()
        plain = model(torch.tensor([ids])).logits[0, -1].float()       # outside any engine request: base model
    eng = MsaEngine(model, [], lambda p, x: x, reader=reader, cpu_gemv=False)
    on = eng.forward(eng.new_state(32, reader=True), ids, list(range(len(ids))))
    off = eng.forward(eng.new_state(32), ids, list(range(len(ids))))
    assert (on - ref).abs().max() < 1e-4, family
    assert (off - base).abs().max() < 1e-4 and (plain - base).abs().max() == 0, family
    assert (on - base).abs().max() > 1e-3, family                      # the update is not a no-op


def test_an_engine_without_reader_refuses_a_reader_request():
    model = tiny_model("llama")
    eng = MsaEngine(model, [0], lambda p, x: x)                         # a router layer: its hook must not stay
    with pytest.raises(ConfigError, match="reader"):
        eng.forward(eng.new_state(8, reader=True), [7, 8], [0, 1])
    assert model.config._attn_implementation == "sdpa"                 # nothing of the request is left on the model
    assert not any(l.input_layernorm._forward_hooks for l in model.model.layers)


def _trainer(tiny_memory, seed=0, k=1):
    reader = _random_reader(tiny_memory.model.hf_model, seed=seed)
    with torch.no_grad():                     # B = 0: starts as the base model, as training does
        for name, p in reader.params.items():
            if name.endswith("_b"):
                p.zero_()
    tr = ReaderTrainer(tiny_memory, reader, k=k, lr=1e-2, seed=seed)
    return tr


QUESTIONS = [ReaderQuestion("What is the blue door code?", "4471", ["notes/0.txt"], 0, "train"),
             ReaderQuestion("What is the red door code?", "9302", ["notes/0.txt"], 1, "train")]


def test_the_training_forward_gives_the_logits_of_the_inference_forward(tiny_memory):
    tr = _trainer(tiny_memory)
    try:
        q = QUESTIONS[0]
        mem, eng = tiny_memory, tiny_memory.engine
        prompt = mem.layout.question(q.question)
        pos = list(range(tr.P + tr.k, tr.P + tr.k + len(prompt.ids)))
        prefix = eng.compute_prefix(mem.layout.head_ids(), reader=True)
        routes = tr.routes(q)
        st = eng.new_state(len(prompt.ids), prefix, top_k=tr.k, reader=True)
        st.preset_routes = routes
        want = eng.forward(st, prompt.ids, pos, route_rows=prompt.route_rows)
        st = eng.new_state(len(prompt.ids), prefix, top_k=tr.k, reader=True)
        st.preset_routes = routes
        h = eng.forward(st, prompt.ids, pos, route_rows=prompt.route_rows, grad=True)
        got = lm_logits(mem.model.hf_model, h[-1:])[0].float()
        assert h.requires_grad
        assert (got - want).abs().max() < 1e-5
    finally:
        tr.reader.detach()
        tiny_memory.engine.reader = tiny_memory.reader = None


def test_gold_is_forced_into_every_route_and_training_lowers_the_answer_loss(tiny_memory):
    tr = _trainer(tiny_memory, k=1)
    try:
        for q in QUESTIONS:
            gold = set(tr.gold_docs(q))
            assert len(gold) == 3                              # every passage of notes/0.txt
            for r in tr.routes(q).values():
                assert gold <= set(r.doc_index.tolist())          # all of them, even past k = 1
        import numpy as np

        from msa_memory.routing.index import RouteResult

        g = sorted(tr.gold_docs(QUESTIONS[0]))
        rest = [i for i in range(len(tiny_memory.doc_ids)) if i not in g]
        partial = RouteResult(np.array([g[0], *rest[:3]]), np.array([g[0], *rest[:3]]), np.zeros(4, np.float32), 0)
        saved = tr._routes.get(QUESTIONS[0].question)
        tr._routes[QUESTIONS[0].question] = {0: partial}      # a route holding one gold passage of three
        forced = tr.routes(QUESTIONS[0])[0].doc_index.tolist()
        assert set(g) <= set(forced) and len(forced) == 4 and rest[0] in forced
        tr._routes[QUESTIONS[0].question] = saved
        with torch.no_grad():
            before = sum(float(tr.loss(q)) for q in QUESTIONS)
        for r in tr.routes(QUESTIONS[0], drop_gold=True).values():
            assert not set(r.doc_index.tolist()) & gold
        tr.train(QUESTIONS, steps=12, batch_size=2, warmup=2, log=lambda s: None)
        with torch.no_grad():
            after = sum(float(tr.loss(q)) for q in QUESTIONS)
        assert after < 0.5 * before, (before, after)
        gain = tr.memory_gain(QUESTIONS)
        assert gain["n"] == 2 and gain["loss_gold"] == pytest.approx(after / 2, rel=1e-4)
        with pytest.raises(ConfigError, match="not in the store"):
            tr.gold_docs(ReaderQuestion("?", "x", ["nowhere.txt"], 0, "train"))
    finally:
        tr.reader.detach()
        tiny_memory.engine.reader = tiny_memory.reader = None


def _fp32_bound(x: torch.Tensor, layers: int, width: int) -> float:
    """|a - b| for two fp32 evaluations of the same forward that sum in other orders (other packing): each of
    ``layers`` layers sums at most ``4·width`` products a value (the MLP's up projection is the longest), so
    the relative error stays below γ_n, n = layers·4·width, u = 2^-24 (Higham's bound, doubled for two runs)."""
    return 2 * gamma(layers * 4 * width) * float(x.abs().max())


def test_pooled_kv_gives_the_memory_the_encoder_stored(tiny_memory):
    import numpy as np

    tr = _trainer(tiny_memory)
    try:
        m = tiny_memory.model
        docs = [4, 0, 2]                                   # other packing and order than the encoder's
        ks, vs, n_chunks = pooled_kv(m, [tr.doc_tokens(i) for i in docs])
        assert len(ks) == len(m.router_layers) and sum(n_chunks) == ks[0].shape[0]
        assert ks[0].requires_grad is False                # no adapter with parameters needing grad is active
        for pos in range(len(m.router_layers)):
            want_k, want_v = tiny_memory.engine.content.layer_kv(np.array(docs), pos)          # (H, M, D)
            got_k, got_v = ks[pos].transpose(0, 1), vs[pos].transpose(0, 1)
            assert got_k.shape == want_k.shape
            bound = _fp32_bound(want_k, max(m.router_layers) + 1, m.hidden_size)
            assert (got_k - want_k.float()).abs().max() <= bound
            assert (got_v - want_v.float()).abs().max() <= _fp32_bound(want_v, max(m.router_layers) + 1, m.hidden_size)
        with pytest.raises(ConfigError, match="non-empty"):
            pooled_kv(m, [[]])
    finally:
        tr.reader.detach()
        tiny_memory.engine.reader = tiny_memory.reader = None


def test_a_writer_reaches_the_memory_and_training_with_it_lowers_the_loss(tiny_memory):
    hf = tiny_memory.model.hf_model
    plain = _trainer(tiny_memory, seed=3)
    try:
        with torch.no_grad():
            want = [float(plain.loss(q)) for q in QUESTIONS]
    finally:
        plain.reader.detach()
    writer = _random_reader(hf, seed=4)
    with torch.no_grad():
        for name, p in writer.params.items():
            if name.endswith("_b"):
                p.zero_()
    tr = _trainer(tiny_memory, seed=3)
    tr = ReaderTrainer(tiny_memory, tr.reader, k=1, lr=1e-2, seed=3, writer=writer)
    try:
        with torch.no_grad():
            got = [float(tr.loss(q)) for q in QUESTIONS]
        assert got == pytest.approx(want, rel=1e-4)          # B = 0: the store's memory, re-encoded in fp32
        tr.opt.zero_grad()
        tr.loss(QUESTIONS[0]).backward()
        routed_layers = max(tiny_memory.model.router_layers)
        grads = {k: float(p.grad.abs().sum()) for k, p in writer.params.items() if p.grad is not None}
        assert any(v > 0 for k, v in grads.items() if k.endswith("_b")), grads
        assert all(v == 0 for k, v in grads.items() if int(k.split("_")[0]) > routed_layers)   # past the memory
        before = sum(got)
        w0 = {k: p.detach().clone() for k, p in writer.params.items()}
        tr.train(QUESTIONS, steps=12, batch_size=2, warmup=2, log=lambda s: None)
        with torch.no_grad():
            after = sum(float(tr.loss(q)) for q in QUESTIONS)
        assert after < 0.5 * before, (before, after)
        assert any(not torch.equal(w0[k], p) for k, p in writer.params.items())
        gain = tr.memory_gain(QUESTIONS)
        assert set(gain) == {"loss_gold", "loss_without_gold", "exact_gold", "exact_without_gold", "n"}
        with pytest.raises(ConfigError, match="its own"):
            ReaderTrainer(tiny_memory, tr.reader, writer=tr.reader)
    finally:
        tr.reader.detach()
        writer.detach()
        tiny_memory.engine.reader = tiny_memory.reader = None


def test_files_round_trip_and_errors(tmp_path):
    model = tiny_model("qwen3")
    reader = _random_reader(model)
    reader.config.model_fingerprint = "abc"
    reader.save(tmp_path / "r", dtype=torch.float32)
    back = ReaderAdapter.load(tmp_path / "r")
    assert back.config == reader.config
    for key in reader.keys():
        for x, y in zip(reader.factors(key), back.factors(key)):
            assert torch.equal(x, y)
    with pytest.raises(ModelLoadError, match="trained on model abc"):
        back.attach(model, fingerprint="other")
    with pytest.raises(ModelLoadError, match="not a reader adapter"):
        ReaderAdapter.load(tmp_path)
    wrong = ReaderAdapter.load(tmp_path / "r")
    key = wrong.keys()[0].replace(".", "_") + "_a"
    wrong.params[key] = torch.nn.Parameter(torch.zeros(wrong.config.rank, 3))     # in_features 3: fits no linear
    with pytest.raises(ModelLoadError, match="shapes"):
        wrong.attach(model)
    far = ReaderAdapter(ReaderConfig(rank=2, alpha=2, targets=["q_proj"], layers=[99]))
    with pytest.raises(ModelLoadError, match="does not exist"):
        far.attach(model)
    cfg = json.loads((tmp_path / "r" / "reader_adapter.json").read_text())
    cfg["format"] = "something-else"
    (tmp_path / "r" / "reader_adapter.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="format"):
        ReaderAdapter.load(tmp_path / "r")
    with pytest.raises(ConfigError, match="targets"):
        ReaderConfig(rank=2, alpha=2, targets=["lm_head"], layers=[0])


def test_memory_pooled_answers_with_a_reader_keep_the_routes_of_answers_without(tiny_store, tiny_msa_model, tmp_path):
    from msa_memory.runtime import Memory

    hf = tiny_msa_model.hf_model
    zero = _random_reader(hf, seed=3)
    with torch.no_grad():
        for name, p in zero.params.items():
            if name.endswith("_b"):
                p.zero_()
    zero.save(tmp_path / "zero", dtype=torch.float32)
    mem0 = Memory(tiny_store, model=tiny_msa_model, reader=False)
    memz = Memory(tiny_store, model=tiny_msa_model, reader=str(tmp_path / "zero"))
    rand = _random_reader(hf, seed=4)
    memr = Memory(tiny_store, model=tiny_msa_model, reader=rand)
    try:
        assert mem0.reader is None and memz.reader is not None
        q = "What is the blue door code?"
        base = mem0.ask(q, mode="pooled", k=2, max_new_tokens=6)
        same = memz.ask(q, mode="pooled", k=2, max_new_tokens=6)   # B = 0: routes first, then the same answer
        assert same.tokens == base.tokens
        assert same.rounds[0].per_layer == base.rounds[0].per_layer
        other = memr.ask(q, mode="pooled", k=2, max_new_tokens=6)
        assert other.rounds[0].per_layer == base.rounds[0].per_layer   # a reader never changes routes
        assert memr.ask(q, mode="pooled", k=2, max_new_tokens=6, reader=False).tokens == base.tokens
        with pytest.raises(ConfigError, match="no reader adapter"):
            mem0.ask(q, mode="pooled", reader=True)
        with pytest.raises(ConfigError, match="mode='pooled'"):
            memr.ask(q, mode="text", reader=True)
    finally:
        memz.reader.detach()
        rand.detach()
