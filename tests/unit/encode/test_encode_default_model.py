"""The real default model (Gemma 3 270M from the PyPI package) loads and encodes passages on CPU.

Slow (marked ``slow``): the first load parses and de-quantises the GGUF file (minutes on 2 cores;
later loads read the cached de-quantised copy). One test: identity facts, a passage longer than
Gemma's 512-token sliding window encoded in a packed batch with short ones, pooled K̄ of that
passage equal to a reference computed from the unmodified HF forward's hidden states, and a
stable fingerprint across loads.

Run: ``.venv/bin/python -m pytest tests/unit/encode/test_encode_default_model.py -q -m slow``
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from msa_memory.encode import Encoder, RouterAdapter, UntrainedRouterWarning, load_model, pool_naive
from msa_memory.schemas.records import Passage, to_float32

pytestmark = pytest.mark.slow


def test_default_model_loads_and_encodes_passages():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UntrainedRouterWarning)
        m = load_model("default")
        again = load_model("default")
    assert m.model_fingerprint == again.model_fingerprint
    ident = m.identity()
    from msa_memory.routing.files import default_router_adapter

    shipped = default_router_adapter()  # the trained adapter shipped with the package, if any
    want_layers = RouterAdapter.load(shipped).config.router_layers if shipped else tuple(range(9, 18))
    assert ident.router_layers == want_layers and (ident.n_kv_heads, ident.head_dim) == (1, 256)
    assert ident.chunk_tokens == 64 and ident.wrap == "plain" and m.source["model_type"] == "gemma3_text"
    long_text = " ".join(f"Sentence {i} says the lighthouse keeper logged wind at {i % 40} knots." for i in range(60))
    ps = [Passage("The capital of France is Paris.", "a.txt"), Passage(long_text, "b.txt"),
          Passage("Gemma is a small open model.", "c.txt")]
    enc = Encoder(m)
    out = enc.encode(np.array([1, 2, 3]), ps)
    seqs = enc.tokenize(np.array([1, 2, 3]), ps)
    assert len(seqs[1]) > 600 and seqs[1][0] == m.tokenizer.bos_token_id
    assert out.n_chunks.tolist() == [-(-len(s) // 64) for s in seqs]
    n_l, last = len(m.router_layers), m.router_layers[-1]
    assert out.kv.shape == (int(out.n_chunks.sum()), n_l, 2, 1, 256) and out.kv.dtype == np.uint16
    kv = to_float32(out.kv, "bfloat16")
    assert np.isfinite(kv).all() and np.isfinite(to_float32(out.k_router, "bfloat16")).all()
    # reference for the long passage: unmodified HF forward, V recomputed at the last router layer
    bb, hf = m.backbone, m.hf_model
    with torch.no_grad():
        hs = hf(input_ids=torch.tensor([seqs[1]]), output_hidden_states=True).hidden_states
        x = bb.layers[last].input_layernorm(hs[last][0])
        v = bb.layers[last].self_attn.v_proj(x).view(len(seqs[1]), 1, 256).float().numpy()
    want = pool_naive(v, [len(seqs[1])], 64)
    f32 = Encoder(m, store_dtype="float32").encode(np.array([1, 2, 3]), ps)
    got = f32.kv[f32.offsets[1]:f32.offsets[2], n_l - 1, 1]
    scale = np.abs(want).max()
    err = np.abs(got - want).max() / scale
    tol = 2e-2 if m.dtype == torch.bfloat16 else 1e-4  # bf16 compute vs fp32 compute
    assert err <= tol, f"relative max error {err:.3g}"
    # bf16 storage is the RNE rounding of the fp32 numbers
    assert np.abs(to_float32(out.kv, "bfloat16") - f32.kv).max() <= np.abs(f32.kv).max() * 2 ** -8
    tp = enc.template_prefix()
    assert tp.token_ids == [m.tokenizer.bos_token_id] and len(tp.keys) == 18 and tp.keys[0].shape == (1, 1, 256)
