"""bench_msa4b's internals: the checkpoint it writes loads as the reference's MSA-4B routing, its tokenizer keeps
the template and interleave markers whole, its synthetic text is reproducible, and its bf16 step count is exact.

These test a benchmark's internals, not the product: they live beside the benchmarks and run with
``make bench-test`` (not ``make test``).
Run: .venv/bin/python -m pytest benchmarks/tests/test_msa4b.py -q
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))          # benchmarks/

import bench_msa4b as b  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return b.build_tokenizer(b.TextGen(seed=0, n_words=3000), 2048)


def test_text_is_reproducible_and_tokenizer_keeps_markers_whole(tok):
    g = b.TextGen(seed=0, n_words=3000)
    assert g.text(np.random.default_rng(5), 300) == b.TextGen(seed=0, n_words=3000).text(np.random.default_rng(5), 300)
    for s in b.SPECIALS:
        assert len(tok(s, add_special_tokens=False)["input_ids"]) == 1, s
    ids = tok("[12]. some text[12]<|im_end|>", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == "[12]. some text[12]<|im_end|>"
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>" and tok.bos_token is None


def test_checkpoint_loads_with_the_reference_routing(tmp_path, tok):
    from msa_memory.encode import load_model

    info = b.write_msa_checkpoint(tmp_path / "ck", b.SMOKE, tok, torch.device("cpu"))
    raw = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert raw["model_type"] == "msa" and raw["architectures"] == ["MSAForCausalLM"]
    assert raw["sliding_window"] is False and raw["rope_theta"] == 5_000_000.0 and "rope_parameters" not in raw
    assert raw["msa_config"]["router_layer_idx"] == "4,5,6,7" and info["router_layers"] == [4, 5, 6, 7]
    m = load_model(str(tmp_path / "ck"), device="cpu", dtype=torch.float32)
    rc = m.router.config
    assert (rc.router_layers, rc.chunk_tokens, rc.top_k, rc.score) == ((4, 5, 6, 7), 64, 16, "dot")
    assert (rc.head_reduce, rc.query_reduce, rc.chunk_reduce) == ("mean", "max", "max")
    assert m.wrap == "msa" and m.template_prefix_ids() == tok("<|im_start|>user\n", add_special_tokens=False)["input_ids"]
    assert m.hf_model.config.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")


def test_bf16_steps():
    a = torch.tensor([1.0, -3.0, 0.15625, 1000.0])          # bf16 values; the next one up is one step away
    up = torch.nextafter(a.to(torch.bfloat16), torch.full((4,), float("inf"), dtype=torch.bfloat16)).float()
    assert b._bf16_steps(a, a) == 0.0
    assert b._bf16_steps(a, up) == 1.0
    assert b._bf16_steps(a, a + 3 * (up - a)) == 3.0
