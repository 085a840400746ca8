"""Encoder API behaviour on tiny models: shapes/dtypes, batching, progress, x_router, errors.

Covers ``msa_memory.encode.encoder.Encoder`` and ``forward.Backbone`` contracts not covered by the
equivalence tests: EncodedChunks layout (C, L, 2, H, D) / (L, C, H, D) / (L, C, E) in each storage
dtype (and ``_to_storage`` of strided tensors == ``records.from_float32``); router keys recomputable from x_router with ``RouterAdapter.keys_from_pooled``; an empty
call; bad ids/passages; Backbone options (stop_after, on_layer_input order, bad shapes).

Run: ``.venv/bin/python -m pytest tests/unit/encode/test_encode_encoder.py -q``
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from msa_memory.encode import Encoder, UntrainedRouterWarning, causal_attention, load_model
from msa_memory.encode.tiny import tiny_model, tiny_tokenizer
from msa_memory.errors import ConfigError, EncodeError
from msa_memory.schemas.records import Passage, to_float32

TEXTS = ["one two three four five six seven", "a b", "The cat sat on the mat. " * 6]


@pytest.fixture(scope="module")
def model():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UntrainedRouterWarning)
        return load_model(tiny_model("qwen3", seed=5), tokenizer=tiny_tokenizer(), dtype=torch.float32,
                          chunk_tokens=8, router_layers=[0, 2])


def _ps(texts=TEXTS):
    return [Passage(t, "f.txt", i) for i, t in enumerate(texts)]


@pytest.mark.parametrize("dtype,np_dtype", [("bfloat16", np.uint16), ("float16", np.float16), ("float32", np.float32)])
def test_encode_shapes_and_dtypes(model, dtype, np_dtype):
    out = Encoder(model, store_dtype=dtype, keep_router_inputs=True).encode(np.array([3, 1, 2]), _ps())
    n_tok = [len(model.wrap_ids(t, 0)) for t in TEXTS]
    assert out.n_tokens.tolist() == n_tok and out.n_chunks.tolist() == [-(-n // 8) for n in n_tok]
    C = int(out.n_chunks.sum())
    assert out.kv.shape == (C, 2, 2, 2, 16) and out.kv.dtype == np_dtype
    assert out.k_router.shape == (2, C, 2, 16) and out.x_router.shape == (2, C, 64)
    assert out.doc_ids.tolist() == [3, 1, 2] and out.dtype == dtype
    assert out.offsets.tolist() == [0, *np.cumsum(out.n_chunks).tolist()]


def test_router_keys_recompute_from_x_router(model):
    out = Encoder(model, store_dtype="float32", keep_router_inputs=True).encode(np.arange(3), _ps())
    for i, layer in enumerate(model.router_layers):
        k = model.router.keys_from_pooled(layer, torch.from_numpy(out.x_router[i]))
        np.testing.assert_allclose(k.detach().numpy(), out.k_router[i], atol=1e-6)
        # cosine score mode (copied q/k): stored keys are unit vectors per head
        np.testing.assert_allclose(np.linalg.norm(out.k_router[i], axis=-1), 1.0, atol=1e-5)


def test_bf16_storage_roundtrips_to_the_fp32_values(model):
    f = Encoder(model, store_dtype="float32").encode(np.arange(3), _ps())
    b = Encoder(model, store_dtype="bfloat16").encode(np.arange(3), _ps())
    np.testing.assert_allclose(to_float32(b.kv, "bfloat16"), f.kv, rtol=2 ** -8, atol=1e-30)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_to_storage_of_strided_tensors_equals_from_float32(dtype, device):
    """_to_storage (cast + transpose in one copy kernel on the device, then to the host) ==
    records.from_float32 of the same values, C-contiguous."""
    from msa_memory.encode.encoder import _to_storage
    from msa_memory.schemas.records import from_float32

    x = torch.randn(3, 5, 2, 4, generator=torch.Generator().manual_seed(0)) * 1e3
    t = x.to(device).transpose(0, 1)  # (5, 3, 2, 4) strided, as the encoder's kv stack
    got = _to_storage(t, dtype)
    want = from_float32(x.transpose(0, 1).numpy(), dtype)
    assert got.dtype == want.dtype and got.flags.c_contiguous
    np.testing.assert_array_equal(got, want)


def test_progress_and_batching(model):
    seen = []
    enc = Encoder(model, max_batch_tokens=30)
    out = enc.encode(np.arange(3), _ps(), progress=lambda done, total: seen.append((done, total)))
    total = int(out.n_tokens.sum())
    assert seen[-1] == (total, total) and len(seen) == len(enc._batches(out.n_tokens.tolist())) >= 2


def test_empty_call_gives_empty_arrays(model):
    out = Encoder(model, keep_router_inputs=True).encode(np.array([], dtype=np.int64), [])
    assert out.kv.shape == (0, 2, 2, 2, 16) and out.k_router.shape == (2, 0, 2, 16)
    assert out.x_router.shape == (2, 0, 64) and out.n_docs == 0


def test_encode_errors(model):
    enc = Encoder(model)
    with pytest.raises(EncodeError, match="doc_ids"):
        enc.encode(np.array([1]), _ps())
    with pytest.raises(ConfigError, match="max_batch_tokens"):
        Encoder(model, max_batch_tokens=0)
    with pytest.raises(ConfigError, match="store_dtype"):
        Encoder(model, store_dtype="int8")
    with pytest.raises(ConfigError, match="attention_strategy"):
        Encoder(model, attention_strategy="magic")
    with pytest.raises(EncodeError, match="non-empty"):
        enc.encode_tokens([[5, 6], []])


def test_backbone_observes_layer_inputs_before_attention_and_stops(model):
    bb = model.backbone
    order = []

    def attn(call):
        order.append(("attn", call.layer))
        assert call.k.shape[1] == 2 and call.q.shape[1] == 4  # pre-GQA keys
        return causal_attention(call)

    ids = torch.tensor([[7, 8, 9, 10]])
    h = bb.run(ids, torch.arange(4)[None], attn, stop_after=3,
               on_layer_input=lambda i, x: order.append(("x", i)), observe_layers=[0, 2])
    assert order == [("x", 0), ("attn", 0), ("attn", 1), ("x", 2), ("attn", 2)]
    assert h.shape == (1, 4, 64)
    with pytest.raises(ConfigError, match="stop_after"):
        bb.run(ids, torch.arange(4)[None], attn, stop_after=9)
    with pytest.raises(ConfigError, match="position_ids"):
        bb.run(ids, torch.arange(3)[None], attn)
    # outside Backbone.run the model is plain SDPA again
    assert model.hf_model.config._attn_implementation == "sdpa"
    model.hf_model(input_ids=ids)


def test_sdpa_backends_exclude_cudnn_on_cuda_and_restore():
    from msa_memory.encode import forward

    flags = lambda: (torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled(),  # noqa: E731
                     torch.backends.cuda.mem_efficient_sdp_enabled(), torch.backends.cuda.math_sdp_enabled())
    before = flags()
    with forward.sdpa_backends("cpu"):   # CPU: PyTorch's own choice, untouched
        assert flags() == before
    with forward.sdpa_backends(torch.device("cuda")):
        assert flags() == (False, True, True, True)
    assert flags() == before
    old, forward.CUDA_SDPA_BACKENDS = forward.CUDA_SDPA_BACKENDS, None
    try:
        with forward.sdpa_backends("cuda"):  # None: PyTorch's choice on CUDA too
            assert flags() == before
    finally:
        forward.CUDA_SDPA_BACKENDS = old


def test_backbone_run_attends_inside_sdpa_backends_of_its_device(model, monkeypatch):
    from contextlib import contextmanager

    from msa_memory.encode import forward

    seen, inside = [], []

    @contextmanager
    def spy(device):
        seen.append(torch.device(device))
        inside.append(True)
        try:
            yield
        finally:
            inside.pop()

    monkeypatch.setattr(forward, "sdpa_backends", spy)

    def attn(call):
        assert inside, "attention ran outside sdpa_backends"
        return causal_attention(call)

    model.backbone.run(torch.tensor([[7, 8, 9]]), torch.arange(3)[None], attn, stop_after=2)
    assert seen == [torch.device("cpu")] and not inside
