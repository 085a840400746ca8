"""MsaEngine without memory equals the unmodified HF model, for every supported family.

Prefill + token-by-token decoding through the preallocated [prefix | local] buffers must give the
same logits as HF's own forward over the whole sequence (Gemma 3 and Mistral with sliding windows
shorter than the sequence, so the window mask is exercised). Also: a computed template prefix
equals running the prefix tokens inline; capacity overflow is a clear error.
Run: .venv/bin/python -m pytest tests/unit/runtime/test_engine.py -q
"""

from __future__ import annotations

import pytest
import torch

from msa_memory.encode.tiny import FAMILIES, tiny_model
from msa_memory.errors import RuntimeMemoryError
from msa_memory.runtime.engine import MsaEngine


def _ref_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


@pytest.mark.parametrize("family", FAMILIES)
def test_engine_matches_hf_forward_with_prefix_and_decoding(family):
    model = tiny_model(family)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(6, 262, (40,), generator=g).tolist()     # longer than the 16/24-token windows
    ref = _ref_logits(model, ids)
    eng = MsaEngine(model, [], lambda p, x: x)
    prefix = eng.compute_prefix(ids[:3])                          # template prefix at positions 0..2
    st = eng.new_state(64, prefix)
    got = eng.forward(st, ids[3:30], list(range(3, 30)))
    assert (got - ref[29]).abs().max() < 1e-4, family
    for t in range(30, 40):                                       # decoding, one token per forward
        got = eng.forward(st, [ids[t]], [t])
        assert (got - ref[t]).abs().max() < 1e-4, (family, t)
    assert model.config._attn_implementation == "sdpa"           # the switch is undone after each forward


def test_engine_capacity_overflow_is_a_clear_error():
    model = tiny_model("qwen3")
    eng = MsaEngine(model, [], lambda p, x: x)
    st = eng.new_state(4)
    with pytest.raises(RuntimeMemoryError, match="local-token slots"):
        eng.forward(st, [7, 8, 9, 10, 11], list(range(5)))


def test_engine_sampling_is_seeded_and_greedy_is_argmax():
    model = tiny_model("llama")
    eng = MsaEngine(model, [], lambda p, x: x)

    def run(**kw):
        st = eng.new_state(32)
        lg = eng.forward(st, [7, 8, 9], [0, 1, 2])
        return list(eng.decode(st, lg, 3, max_new_tokens=6, **kw))

    assert run() == run()
    a = run(temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(3))
    b = run(temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(3))
    assert a == b and len(a) == 6
    ids = [7, 8, 9] + run()[:1]
    assert ids[-1] == int(_ref_logits(model, ids[:3])[-1].argmax())


def test_engine_builds_each_attention_mask_once_per_forward():
    class Recorder(dict):
        def __init__(self):
            super().__init__()
            self.built = []

        def __setitem__(self, key, value):
            self.built.append(key)
            super().__setitem__(key, value)

    model = tiny_model("gemma3")                 # sliding and full layers: two windows, one mask each
    windows = {getattr(l.self_attn, "sliding_window", None) for l in model.model.layers}
    eng = MsaEngine(model, [], lambda p, x: x)
    st = eng.new_state(48)
    st.masks = Recorder()
    eng.forward(st, list(range(7, 37)), list(range(30)))
    assert len(st.masks.built) == len(windows) and {k[1:] for k in st.masks.built} == {(0, 30, w) for w in windows}
    assert len(windows) < model.config.num_hidden_layers and not st.masks   # freed when the forward ends
    st.masks.built.clear()
    eng.forward(st, [40], [30])                  # a decoding step: only windowed layers need a mask
    assert [k[1:] for k in st.masks.built] == [(30, 1, w) for w in windows if w is not None]
