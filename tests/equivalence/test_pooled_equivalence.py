"""Pooled-mode prefill and greedy decoding equal the slow explicit reference (msa_reference.py).

A tiny random MSA checkpoint (Qwen3 backbone, router_q/k_proj in layers 2-3, written as
config.json + safetensors with the reference key names) is run through ``MsaEngine`` (fast path:
attention-core swap, preallocated buffers, per-layer routing hook) and through ``SlowMsa`` (float64,
explicit concatenation and full masks, one layer at a time). Last-position logits must agree
within 1e-4, the chosen documents per router layer must match, and greedy tokens must be identical
(dynamic decoding and the fixed-shape step that CUDA graphs replay).
Run: .venv/bin/python -m pytest tests/equivalence/test_pooled_equivalence.py -q
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from msa_memory.runtime.engine import MsaEngine
from msa_memory.runtime.memory_tier import ContentMemory
from msa_memory.routing import RouterIndex, RoutingConfig

from msa_reference import ROUTER_LAYERS, TINY, SlowMsa, build_tiny_msa_checkpoint, load_weights


def _hf_model(path):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    sd, cfg = load_weights(path)
    model = Qwen3ForCausalLM(Qwen3Config(**TINY)).eval()
    missing, _ = model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    assert set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    return model, sd, cfg


def _memory(n_docs, seed, H=TINY["num_key_value_heads"], D=TINY["head_dim"]):
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 4, n_docs)
    chunk_doc = np.repeat(np.arange(n_docs), counts)
    C = int(counts.sum())
    keys = [torch.from_numpy(rng.standard_normal((C, H, D)).astype(np.float32)) for _ in ROUTER_LAYERS]
    kv = torch.from_numpy(rng.standard_normal((C, len(ROUTER_LAYERS), 2, H, D)).astype(np.float32))
    return counts, chunk_doc, keys, kv


@pytest.fixture(scope="module", params=["INFONCE_DECOUPLE", "INFONCE"], ids=["dot", "cosine"])
def tiny(request, tmp_path_factory):
    path = build_tiny_msa_checkpoint(tmp_path_factory.mktemp("msa") / "ckpt", score=request.param)
    return (*_hf_model(path), request.param)


def _engine(model, sd, counts, chunk_doc, keys, kv, score, top_k):
    cfg = RoutingConfig(score="cosine" if score == "INFONCE" else "dot", top_k=top_k, tile_chunks=5)
    index = RouterIndex(keys, chunk_doc, np.arange(len(counts)) + 100, cfg)
    content = ContentMemory(counts, (len(ROUTER_LAYERS), kv.shape[3], kv.shape[4]), torch.float32, host_kv=kv)
    wq = [sd[f"model.layers.{li}.self_attn.router_q_proj.0.weight"].float() for li in ROUTER_LAYERS]
    return MsaEngine(model, ROUTER_LAYERS, lambda p, x: x.float() @ wq[p].T, index, content)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pooled_prefill_matches_slow_reference(tiny, seed):
    model, sd, cfg, score = tiny
    counts, chunk_doc, keys, kv = _memory(7, seed)
    eng = _engine(model, sd, counts, chunk_doc, keys, kv, score, top_k=cfg["msa_config"]["top_k_docs"])
    rng = np.random.default_rng(seed + 10)
    prefix = rng.integers(0, TINY["vocab_size"], 3).tolist()
    query = rng.integers(0, TINY["vocab_size"], 9).tolist()
    rows = [True] * 6 + [False] * 3                       # question tokens route; template tail does not
    slow = SlowMsa(sd, cfg)
    ref_logits, ref_chosen = slow.logits(prefix, query, rows, keys, chunk_doc, kv, len(counts))

    k = cfg["msa_config"]["top_k_docs"]
    st = eng.new_state(32, eng.compute_prefix(prefix), top_k=k)
    pos = list(range(3 + k, 3 + k + len(query)))
    got = eng.forward(st, query, pos, route_rows=rows)
    diff = (got.double() - ref_logits).abs()
    assert diff.max() < 1e-4, f"max |Δlogit| {diff.max():.3g}, mean {diff.mean():.3g}"
    for r in range(len(ROUTER_LAYERS)):
        assert sorted(st.routes[r].doc_index.tolist()) == sorted(ref_chosen[r])
        assert st.routes[r].doc_ids.tolist() == (st.routes[r].doc_index + 100).tolist()

    # greedy decoding with the preallocated cache == reference re-running the full sequence, on the
    # dynamic path and on the fixed-shape step (whole-buffer attention, device-built mask; what CUDA graphs replay)
    toks = list(eng.decode(st, got, pos[-1] + 1, max_new_tokens=4, path="dynamic"))
    ref_toks = slow.greedy(prefix, query, rows, keys, chunk_doc, kv, len(counts), 4)
    assert toks == ref_toks
    st2 = eng.new_state(32, eng.compute_prefix(prefix), top_k=k)
    got2 = eng.forward(st2, query, pos, route_rows=rows)
    assert list(eng.decode(st2, got2, pos[-1] + 1, max_new_tokens=4, path="static")) == ref_toks


def test_pooled_changes_with_memory_and_lower_layers_see_none(tiny):
    """Sanity that the comparison can fail: other memory → other logits; no-route forward ignores memory."""
    model, sd, cfg, score = tiny
    counts, chunk_doc, keys, kv = _memory(5, 3)
    eng = _engine(model, sd, counts, chunk_doc, keys, kv, score, top_k=2)
    prefix, query = [1, 2, 3], [5, 6, 7, 8]
    pos = list(range(5, 9))
    a = eng.forward(eng.new_state(8, eng.compute_prefix(prefix), 2), query, pos, route_rows=[True] * 4)
    eng.content = ContentMemory(counts, (2, kv.shape[3], kv.shape[4]), torch.float32, host_kv=kv * 2)
    b = eng.forward(eng.new_state(8, eng.compute_prefix(prefix), 2), query, pos, route_rows=[True] * 4)
    c = eng.forward(eng.new_state(8, eng.compute_prefix(prefix), 2), query, pos)           # no routing → no memory
    assert (a - b).abs().max() > 1e-3
    assert (a - c).abs().max() > 1e-3
