"""Encoder equivalence: packed, pooled K̄/V̄/K̄ᵣ == a slow per-passage reference through unmodified HF.

Covers, for each family (Qwen3, Qwen2, Llama, Mistral with a 24-token window, Gemma 3 with a
16-token window and passages several windows long): the encoder's pooled keys, values and router
keys vs an independent reference -- each passage alone through ``hf_model(...)`` (HF's own masks
and attention) with positions from 0, K/V recomputed from the returned hidden states (input
layernorm -> k_proj/v_proj -> k_norm -> RoPE written out here), pooled in a Python loop in
float64 -- at fp32 max abs error <= 1e-5; packing many == one at a time; the "bucket" attention
strategy == "loop"; Backbone + causal_attention == HF logits; the template prefix K/V == HF's.

Run: ``.venv/bin/python -m pytest tests/equivalence/test_encode_equivalence.py -q``
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from msa_memory.encode import Backbone, Encoder, causal_attention, load_model, pool_naive
from msa_memory.routing.adapter import UntrainedRouterWarning
from msa_memory.encode.tiny import FAMILIES, tiny_model, tiny_tokenizer
from msa_memory.schemas.records import Passage

P = 16  # chunk tokens: short byte-tokenised passages still get several chunks
TEXTS = [
    "Short one.",
    "The quick brown fox jumps over the lazy dog; the dog sleeps on.",
    "Memory sparse attention routes a question to the top documents and reads only their pooled "
    "keys and values, chunk by chunk, at the upper layers of the model. " * 2,
    "x",
    "Forty-two is the answer, said the machine, after a very long time of thinking about it.",
]


def assert_close(a, b, tol, what):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, f"{what}: shapes {a.shape} vs {b.shape}"
    err = np.abs(a - b)
    assert err.max() <= tol, f"{what}: max abs err {err.max():.3g} (mean {err.mean():.3g}) > {tol}"


def _rope_ref(bb: Backbone, x: torch.Tensor, layer: int, n: int) -> torch.Tensor:
    """Apply rotate-half RoPE (written out) to x (T, H, D) at positions 0..n-1."""
    pos = torch.arange(n)[None]
    cos, sin = bb.rope(x[None].transpose(1, 2), pos, layer)  # (1, T, D)
    cos, sin = cos[0][:, None, :], sin[0][:, None, :]
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rot * sin


@torch.no_grad()
def slow_reference(model, seqs):
    """Per passage, unmodified HF forward; returns fp64 numpy (L, C, H, D) k, v, k_router."""
    hf, bb, router = model.hf_model, model.backbone, model.router
    ks, vs, krs = [], [], []
    for ids in seqs:
        n = len(ids)
        with torch.no_grad():
            out = hf(input_ids=torch.tensor([ids]), position_ids=torch.arange(n)[None], output_hidden_states=True)
        per_k, per_v, per_r = [], [], []
        for layer in model.router_layers:
            mod = bb.layers[layer]
            x = mod.input_layernorm(out.hidden_states[layer][0])  # (T, E): the input of layer l, normed
            att = mod.self_attn
            k = att.k_proj(x).view(n, -1, bb.head_dim)
            if hasattr(att, "k_norm"):
                k = att.k_norm(k)
            k = _rope_ref(bb, k, layer, n)
            v = att.v_proj(x).view(n, -1, bb.head_dim)
            w = router.k_proj[str(layer)].weight
            r = (x.double() @ w.double().T).view(n, -1, bb.head_dim)
            per_k.append(pool_naive(k.double().numpy(), [n], model.chunk_tokens))
            per_v.append(pool_naive(v.double().numpy(), [n], model.chunk_tokens))
            rr = pool_naive(r.numpy(), [n], model.chunk_tokens)
            if router.config.score == "cosine":
                rr = rr / np.linalg.norm(rr, axis=-1, keepdims=True)
            per_r.append(rr)
        ks.append(np.stack(per_k))
        vs.append(np.stack(per_v))
        krs.append(np.stack(per_r))
    return np.concatenate(ks, 1), np.concatenate(vs, 1), np.concatenate(krs, 1)


@pytest.fixture(scope="module", params=FAMILIES)
def fam_model(request):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UntrainedRouterWarning)
        return load_model(tiny_model(request.param, seed=3), tokenizer=tiny_tokenizer(), dtype=torch.float32,
                          chunk_tokens=P, router_layers=[1, 3])


def _passages(texts=TEXTS):
    return [Passage(text=t, source_path="doc.txt", passage_index=i) for i, t in enumerate(texts)]


def test_encoder_pooled_equals_slow_hf_reference(fam_model):
    enc = Encoder(fam_model, store_dtype="float32", max_batch_tokens=4096)
    ids = np.arange(10, 10 + len(TEXTS))
    out = enc.encode(ids, _passages())
    seqs = enc.tokenize(ids, _passages())
    assert max(len(s) for s in seqs) > 2 * 24  # longer than 2 windows of Gemma (16) and Mistral (24)
    k, v, kr = slow_reference(fam_model, seqs)
    assert_close(out.kv[:, :, 0].transpose(1, 0, 2, 3), k, 1e-5, "K̄")
    assert_close(out.kv[:, :, 1].transpose(1, 0, 2, 3), v, 1e-5, "V̄")
    assert_close(out.k_router, kr, 1e-5, "K̄ᵣ")
    assert out.n_chunks.tolist() == [-(-len(s) // P) for s in seqs]


def test_encoder_packing_many_equals_one_at_a_time(fam_model):
    ids = np.arange(len(TEXTS))
    ps = _passages()
    packed = Encoder(fam_model, store_dtype="float32", keep_router_inputs=True).encode(ids, ps)
    singles = [Encoder(fam_model, store_dtype="float32", keep_router_inputs=True).encode(ids[i:i + 1], ps[i:i + 1])
               for i in range(len(ps))]
    assert_close(packed.kv, np.concatenate([s.kv for s in singles]), 1e-5, "kv")
    assert_close(packed.k_router, np.concatenate([s.k_router for s in singles], 1), 1e-5, "k_router")
    assert_close(packed.x_router, np.concatenate([s.x_router for s in singles], 1), 1e-5, "x_router")
    # several forwards (tiny max_batch_tokens) give the same result too
    small = Encoder(fam_model, store_dtype="float32", max_batch_tokens=40).encode(ids, ps)
    assert_close(small.kv, packed.kv, 1e-5, "kv (small batches)")


def test_bucket_attention_strategy_equals_loop(fam_model):
    if fam_model.source["model_type"] not in ("gemma3_text", "mistral"):
        pytest.skip("the windowed families cover the bucket path (padding + window masks)")
    ids = np.arange(len(TEXTS))
    loop = Encoder(fam_model, store_dtype="float32", attention_strategy="loop").encode(ids, _passages())
    bucket = Encoder(fam_model, store_dtype="float32", attention_strategy="bucket").encode(ids, _passages())
    assert_close(bucket.kv, loop.kv, 1e-5, "kv bucket vs loop")
    assert_close(bucket.k_router, loop.k_router, 1e-5, "k_router bucket vs loop")
    # equal lengths take the no-gather view path
    same = _passages(["abcdefghij" * 5, "0123456789" * 5, "klmnopqrst" * 5])
    loop = Encoder(fam_model, store_dtype="float32", attention_strategy="loop").encode(np.arange(3), same)
    bucket = Encoder(fam_model, store_dtype="float32", attention_strategy="bucket").encode(np.arange(3), same)
    assert len(set(loop.n_tokens.tolist())) == 1
    assert_close(bucket.kv, loop.kv, 1e-5, "kv equal-length bucket vs loop")


def test_backbone_causal_attention_equals_hf_logits(fam_model):
    hf, bb = fam_model.hf_model, fam_model.backbone
    ids = torch.randint(6, 262, (2, 70), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(70)[None].expand(2, -1)
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        ours = bb.logits(bb.run(ids, pos, causal_attention))
        last = bb.logits(bb.run(ids, pos, causal_attention), positions=[-1, 5])
    scale = ref.abs().max().item()
    assert_close(ours.numpy() / scale, ref.numpy() / scale, 1e-5, "logits")
    assert_close(last.numpy() / scale, ref[:, [69, 5]].numpy() / scale, 1e-5, "logits at positions")
    assert hf.config._attn_implementation == "sdpa"  # restored after run


def test_template_prefix_equals_hf_keys(fam_model):
    enc = Encoder(fam_model)
    tp = enc.template_prefix()
    assert enc.template_prefix() is tp  # cached
    toks = tp.token_ids
    assert toks == [2]  # plain wrapping: BOS
    hf, bb = fam_model.hf_model, fam_model.backbone
    with torch.no_grad():
        out = hf(input_ids=torch.tensor([toks]), output_hidden_states=True)
        for layer in range(bb.n_layers):
            mod = bb.layers[layer]
            x = mod.input_layernorm(out.hidden_states[layer][0])
            k = mod.self_attn.k_proj(x).view(len(toks), -1, bb.head_dim)
            if hasattr(mod.self_attn, "k_norm"):
                k = mod.self_attn.k_norm(k)
            k = _rope_ref(bb, k, layer, len(toks))
            v = mod.self_attn.v_proj(x).view(len(toks), -1, bb.head_dim)
            assert_close(tp.keys[layer].transpose(0, 1).numpy(), k.numpy(), 1e-5, f"prefix K layer {layer}")
            assert_close(tp.values[layer].transpose(0, 1).numpy(), v.numpy(), 1e-5, f"prefix V layer {layer}")
    assert len(tp.pairs()) == bb.n_layers


def test_encoder_never_runs_layers_above_the_last_router_layer(fam_model):
    calls = []
    hooks = [layer.register_forward_pre_hook(lambda m, a, i=i: calls.append(i))
             for i, layer in enumerate(fam_model.backbone.layers)]
    lm = fam_model.hf_model.lm_head.register_forward_pre_hook(lambda m, a: calls.append("lm_head"))
    try:
        Encoder(fam_model).encode(np.array([1]), _passages(TEXTS[:1]))
    finally:
        for h in hooks + [lm]:
            h.remove()
    assert calls == [0, 1, 2, 3]  # router layers (1, 3): layers 0..3, never the LM head


def test_kv_only_last_skips_the_last_layers_output_and_nothing_else(fam_model):
    """kv_only_last: the last layer gets its q/k/v (output_needed=False) but no o_proj / MLP; the
    layers before it are untouched, so the returned states equal a run that stops one layer earlier."""
    bb = fam_model.backbone
    ids = torch.randint(6, 262, (1, 40), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(40)[None]
    seen, mlp = [], []
    hook = bb.layers[3].mlp.register_forward_pre_hook(lambda m, a: mlp.append(1))

    def attn(call):
        seen.append((call.layer, call.output_needed, call.k.shape))
        return causal_attention(call)

    try:
        with torch.no_grad():
            h = bb.run(ids, pos, attn, stop_after=4, kv_only_last=True)
            ref = bb.run(ids, pos, causal_attention, stop_after=3)
    finally:
        hook.remove()
    assert [(l, need) for l, need, _ in seen] == [(0, True), (1, True), (2, True), (3, False)]
    assert not mlp
    assert torch.equal(h, ref)
    assert fam_model.hf_model.config._attn_implementation == "sdpa"  # restored after the early stop


def test_encoder_bf16_compute_is_close_to_fp32(fam_model):
    """bf16 storage of an fp32 compute == rounding of the fp32 values (bit patterns, RNE)."""
    from msa_memory.schemas.records import from_float32

    ids = np.arange(3)
    f32 = Encoder(fam_model, store_dtype="float32").encode(ids, _passages(TEXTS[:3]))
    b16 = Encoder(fam_model, store_dtype="bfloat16").encode(ids, _passages(TEXTS[:3]))
    assert b16.kv.dtype == np.uint16 and b16.dtype == "bfloat16"
    np.testing.assert_array_equal(b16.kv, from_float32(f32.kv, "bfloat16"))
    np.testing.assert_array_equal(b16.k_router, from_float32(f32.k_router, "bfloat16"))


@pytest.mark.parametrize("window", [None, 4])
def test_shifted_grid_keys_equal_slow_reference_and_packing(fam_model, window):
    """Router keys over the shifted grid (an adapter's ``shifted_layers``) == the router-key projection of
    each passage's own HF forward, pooled over windows from token P/2 (``window`` 4: 4-token windows at a
    stride of 2) in a Python loop; packing many passages == one at a time; the aligned arrays are those of
    the same adapter without the grid."""
    from msa_memory.encode.pooling import pool_shifted_naive
    from msa_memory.schemas.records import shifted_chunk_counts

    shifted = fam_model.router.with_shifted_layers([3], window)
    m = load_model(fam_model.hf_model, tokenizer=fam_model.tokenizer, adapter=shifted, dtype=torch.float32)
    ids = np.arange(len(TEXTS))
    ps = _passages()
    out = Encoder(m, store_dtype="float32", keep_router_inputs=True).encode(ids, ps)
    seqs = Encoder(m).tokenize(ids, ps)
    assert out.n_chunks_s.tolist() == shifted_chunk_counts([len(s) for s in seqs], P, window).tolist()
    hf, bb = m.hf_model, m.backbone
    want_k, want_x = [], []
    with torch.no_grad():
        for s in seqs:
            hs = hf(input_ids=torch.tensor([s]), position_ids=torch.arange(len(s))[None],
                    output_hidden_states=True).hidden_states
            x = bb.layers[3].input_layernorm(hs[3][0]).double()                       # (T, E)
            r = (x @ shifted.k_proj["3"].weight.double().T).view(len(s), -1, bb.head_dim)
            rr = pool_shifted_naive(r.numpy(), [len(s)], P, window)
            if shifted.config.score == "cosine":
                rr = rr / np.linalg.norm(rr, axis=-1, keepdims=True)
            want_k.append(rr)
            want_x.append(pool_shifted_naive(x.numpy(), [len(s)], P, window))
    assert_close(out.k_router_s[0], np.concatenate(want_k), 1e-5, "K̄ᵣ shifted")
    assert_close(out.x_router_s[0], np.concatenate(want_x), 1e-5, "x̄ shifted")
    plain = Encoder(fam_model, store_dtype="float32", keep_router_inputs=True).encode(ids, ps)
    assert plain.k_router_s is None and plain.n_chunks_s is None
    np.testing.assert_array_equal(out.kv, plain.kv)
    np.testing.assert_array_equal(out.k_router, plain.k_router)
    small = Encoder(m, store_dtype="float32", keep_router_inputs=True, max_batch_tokens=40).encode(ids, ps)
    assert_close(small.k_router_s, out.k_router_s, 1e-5, "K̄ᵣ shifted (small batches)")
    assert m.identity().shifted_layers == (3,) and m.identity().router_id != fam_model.identity().router_id
    assert m.identity().shifted_window == window
