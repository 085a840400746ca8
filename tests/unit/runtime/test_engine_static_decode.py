"""The fixed-shape decoding step (``MsaEngine.decode(path="static")``, what CUDA graphs replay) equals
the dynamic path.

The static step attends the whole preallocated buffer under a mask built on the device from a
token counter; here it runs eagerly on CPU. Checked per family (Gemma 3 and Mistral with sliding
windows shorter than the sequence): greedy tokens equal the dynamic path's and HF's own argmax over
the full sequence; a dynamic forward after static steps equals HF's logits (the k/v the static steps
wrote are right and the host counters follow); seeded sampling is identical; closing the generator
early leaves the state consistent. The graph path itself needs CUDA (``bench_runtime.py --gpu-check``).
Run: .venv/bin/python -m pytest tests/unit/runtime/test_engine_static_decode.py -q
"""

from __future__ import annotations

import pytest
import torch

from msa_memory.encode.tiny import FAMILIES, tiny_model
from msa_memory.errors import ConfigError, RuntimeMemoryError
from msa_memory.runtime.engine import MsaEngine


def _ref_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def _prefill(eng, ids, cap=64):
    st = eng.new_state(cap, eng.compute_prefix(ids[:3]))
    return st, eng.forward(st, ids[3:], list(range(3, len(ids))))


@pytest.mark.parametrize("family", FAMILIES)
def test_static_step_equals_dynamic_decoding_and_hf(family):
    model = tiny_model(family)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(6, 262, (22,), generator=g).tolist()
    eng = MsaEngine(model, [], lambda p, x: x)
    n_new = 14                                                   # 22 + 14 > the 16/24-token windows
    st_d, lg_d = _prefill(eng, ids)
    dyn = list(eng.decode(st_d, lg_d, len(ids), max_new_tokens=n_new, path="dynamic"))
    st_s, lg_s = _prefill(eng, ids)
    stat = list(eng.decode(st_s, lg_s, len(ids), max_new_tokens=n_new, path="static"))
    assert stat == dyn, family
    full = ids + stat
    ref = _ref_logits(model, full)
    assert stat == ref[len(ids) - 1:-1].argmax(-1).tolist()
    # the static steps wrote k/v for all but the last token; counters follow; a dynamic forward continues
    assert st_s.n_written == len(full) - 1 - 3 and all(b.n_local == st_s.n_written for b in st_s.layers.values())
    got = eng.forward(st_s, [full[-1]], [len(full) - 1])
    assert (got - ref[-1]).abs().max() < 1e-4, family


def test_static_decoding_resumes_after_injected_text():
    """decode → a dynamic forward of injected text (interleave) → decode again on the same request: the
    second static run (a graph would be reused here) continues from the host's counters."""
    model = tiny_model("gemma3")
    eng = MsaEngine(model, [], lambda p, x: x)
    ids = list(range(30, 52))
    st, lg = _prefill(eng, ids)
    a = list(eng.decode(st, lg, len(ids), max_new_tokens=5, path="static"))
    seq = ids + a
    inject = [7, 8, 9]
    lg = eng.forward(st, [a[-1]] + inject, list(range(len(seq) - 1, len(seq) + 3)))
    seq += inject
    b = list(eng.decode(st, lg, len(seq), max_new_tokens=6, path="static"))
    ref = _ref_logits(model, seq + b)
    assert b == ref[len(seq) - 1:-1].argmax(-1).tolist()


def test_static_sampling_is_the_dynamic_sampling():
    model = tiny_model("gemma3")
    eng = MsaEngine(model, [], lambda p, x: x)
    ids = list(range(10, 30))

    def run(path):
        st, lg = _prefill(eng, ids)
        return list(eng.decode(st, lg, len(ids), max_new_tokens=10, temperature=1.0, top_p=0.9,
                               generator=torch.Generator().manual_seed(5), path=path))

    assert run("static") == run("dynamic")


def test_closing_a_static_decode_early_keeps_the_state_consistent():
    model = tiny_model("mistral")
    eng = MsaEngine(model, [], lambda p, x: x)
    ids = list(range(40, 60))
    st, lg = _prefill(eng, ids)
    gen = eng.decode(st, lg, len(ids), max_new_tokens=20, path="static")
    toks = [next(gen) for _ in range(4)]                         # 4 tokens yielded, 3 steps run
    gen.close()
    assert st.n_written == len(ids) - 3 + 3 and st.static is None
    full = ids + toks
    got = eng.forward(st, [full[-1]], [len(full) - 1])
    assert (got - _ref_logits(model, full)[-1]).abs().max() < 1e-4


def test_static_decode_past_the_capacity_is_the_clear_error():
    model = tiny_model("qwen3")
    eng = MsaEngine(model, [], lambda p, x: x)
    for cap in (7, 9):                        # the prompt fills the buffer; room for 2 of the 6 tokens
        st = eng.new_state(cap)
        lg = eng.forward(st, list(range(10, 17)), list(range(7)))
        gen = eng.decode(st, lg, 7, max_new_tokens=6, path="static")
        got = [next(gen) for _ in range(cap - 7 + 1)]
        with pytest.raises(RuntimeMemoryError, match="local-token slots"):
            next(gen)
        assert len(got) == cap - 7 + 1 and st.n_written == cap


def test_decode_path_errors_name_the_option():
    model = tiny_model("qwen3")
    eng = MsaEngine(model, [], lambda p, x: x)
    st, lg = _prefill(eng, list(range(10, 20)))
    with pytest.raises(ConfigError, match="needs a CUDA model"):
        list(eng.decode(st, lg, 10, max_new_tokens=4, path="graph"))
    with pytest.raises(ConfigError, match="'auto', 'dynamic', 'static', 'graph'"):
        list(eng.decode(st, lg, 10, max_new_tokens=4, path="fast"))
