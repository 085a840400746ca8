"""Hypothesis properties of chunk pooling and passage splitting (msa_memory.encode.pooling / .passages).

Pooling: constant in -> constant out; n_chunks == ceil(T / P) per document; pooling is linear;
the fast ``chunk_mean_pool`` equals the Python-loop ``pool_naive`` on both of its paths (reshape for
regular layouts, gather otherwise) for any dtype, feature shape and strided input; bf16 sums in fp32. Splitting: every passage's byte
offsets reproduce its text; passages are ordered, disjoint, stripped, and only whitespace lies
outside them; each has at most ``max_tokens`` tokens (the byte-level tokenizer can always cut).

Run: ``.venv/bin/python -m pytest tests/unit/encode/test_encode_properties.py -q``
(``HYPOTHESIS_PROFILE=ci`` for the derandomised CI profile).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from msa_memory.encode import chunk_layout, chunk_mean_pool, pool_naive, split_passages
from msa_memory.encode.tiny import tiny_tokenizer
from msa_memory.errors import ConfigError

TOK = tiny_tokenizer()
lens_st = st.lists(st.integers(1, 90), min_size=1, max_size=6)
chunk_st = st.integers(1, 40)


@given(lens=lens_st, p=chunk_st, value=st.floats(-100, 100, allow_nan=False))
def test_pool_constant_in_constant_out(lens, p, value):
    x = torch.full((sum(lens), 3), value)
    out = chunk_mean_pool(x, chunk_layout(lens, p))
    torch.testing.assert_close(out, torch.full_like(out, value))


@given(lens=lens_st, p=chunk_st)
def test_pool_n_chunks_is_ceil(lens, p):
    lay = chunk_layout(lens, p)
    assert lay.n_chunks == [-(-n // p) for n in lens]
    assert lay.n_total == sum(lay.n_chunks)
    assert float(lay.counts.sum()) == sum(lens)
    assert float(lay.counts.max()) <= p


@given(lens=lens_st, p=chunk_st, a=st.floats(-3, 3), b=st.floats(-3, 3), seed=st.integers(0, 2**16))
def test_pool_is_linear_and_equals_naive(lens, p, a, b, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(lens), 2, 4, generator=g)
    y = torch.randn(sum(lens), 2, 4, generator=g)
    lay = chunk_layout(lens, p)
    lhs = chunk_mean_pool(a * x + b * y, lay)
    rhs = a * chunk_mean_pool(x, lay) + b * chunk_mean_pool(y, lay)
    torch.testing.assert_close(lhs, rhs, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(chunk_mean_pool(x, lay).numpy(), pool_naive(x.double().numpy(), lens, p), atol=1e-6)


_DTYPES = {"float32": (torch.float32, 1e-5), "float64": (torch.float64, 1e-5), "bfloat16": (torch.bfloat16, 1e-5),
           "float16": (torch.float16, 1e-5)}


@given(lens=st.lists(st.integers(0, 150), min_size=1, max_size=7), p=st.integers(1, 70),
       feat=st.lists(st.integers(1, 5), min_size=0, max_size=3), dtype=st.sampled_from(sorted(_DTYPES)),
       regular=st.booleans(), strided=st.booleans(), seed=st.integers(0, 2**16))
def test_pool_equals_naive_any_layout_dtype_and_strides(lens, p, feat, dtype, regular, strided, seed):
    """The fast pooling (reshape path for multiples of P, gather path otherwise) == pool_naive, for
    random lengths (zeros too), P, feature shapes, input dtypes, and transposed (strided) inputs."""
    if regular:
        lens = [p * (n % 4) for n in lens]
    td, tol = _DTYPES[dtype]
    g = torch.Generator().manual_seed(seed)
    t = sum(lens)
    if strided and feat:  # a (T, F0, ...) view of an (F0, T, ...) tensor, as the encoder passes k[0].transpose(0, 1)
        x = torch.randn(feat[0], t, *feat[1:], generator=g).to(td).transpose(0, 1)
    else:
        x = torch.randn(t, *feat, generator=g).to(td)
    lay = chunk_layout(lens, p)
    assert lay.regular == all(n % p == 0 for n in lens)
    out = chunk_mean_pool(x, lay)
    assert out.dtype == torch.float32 and out.shape == (sum(lay.n_chunks), *feat)
    want = pool_naive(x.double().numpy(), lens, p)  # the exact mean of the (rounded) inputs
    np.testing.assert_allclose(out.numpy(), want, atol=tol, rtol=0)


def test_pool_layout_paths_and_bf16_sums_in_fp32():
    assert chunk_layout([8, 4, 0], 4).regular and not chunk_layout([8, 5], 4).regular
    # 64 bf16 values whose bf16 running sum would round: 1 + 63 * 2^-8 needs fp32 accumulation
    x = torch.tensor([1.0] + [2.0 ** -8] * 63, dtype=torch.bfloat16)[:, None]
    for lens in ([64], [64, 3]):
        xx = torch.cat([x, torch.ones(sum(lens) - 64, 1, dtype=torch.bfloat16)])
        out = chunk_mean_pool(xx, chunk_layout(lens, 64))
        assert out[0, 0].item() == (1 + 63 * 2.0 ** -8) / 64


def test_pool_last_partial_chunk_divides_by_its_real_length():
    x = torch.arange(10, dtype=torch.float32)[:, None]  # one document of 10 tokens, P = 4
    out = chunk_mean_pool(x, chunk_layout([10], 4))
    assert out[:, 0].tolist() == [1.5, 5.5, 8.5]  # (8 + 9) / 2, not / 4


def test_pool_rejects_bad_input():
    with pytest.raises(ConfigError, match="chunk_tokens"):
        chunk_layout([3], 0)
    with pytest.raises(ConfigError, match="tokens"):
        chunk_mean_pool(torch.zeros(5, 2), chunk_layout([4], 2))


text_st = st.lists(st.sampled_from(list("ab cdé.!\n\t") + ["\n\n", "漢", "🙂", "word ", "? "]), max_size=150).map("".join)


@given(text=text_st, max_tokens=st.integers(1, 60))
def test_split_offsets_reproduce_text_and_limits_hold(text, max_tokens):
    ps = split_passages(text, "src.txt", TOK, max_tokens=max_tokens)
    raw = text.encode("utf-8")
    prev_end = 0
    covered = []
    for i, p in enumerate(ps):
        assert p.passage_index == i and p.source_path == "src.txt"
        assert raw[p.byte_start:p.byte_end].decode("utf-8") == p.text
        assert p.text and p.text == p.text.strip()
        assert p.byte_start >= prev_end
        covered.append(raw[prev_end:p.byte_start])
        prev_end = p.byte_end
        n = len(TOK(p.text, add_special_tokens=False)["input_ids"])
        # one character may be several byte tokens: only a single such character may exceed the limit
        assert n <= max_tokens or len(p.text) == 1, (p.text, n, max_tokens)
    covered.append(raw[prev_end:])
    assert all(not c.strip() for c in covered), "only whitespace may lie outside passages"


def test_split_prefers_paragraphs_then_lines():
    text = "Alpha beta.\n\nGamma delta epsilon.\nZeta eta."
    ps = split_passages(text, "a", TOK, max_tokens=30)
    assert [p.text for p in ps] == ["Alpha beta.", "Gamma delta epsilon.\nZeta eta."]
    ps = split_passages(text, "a", TOK, max_tokens=21)
    assert [p.text for p in ps] == ["Alpha beta.", "Gamma delta epsilon.", "Zeta eta."]
    assert split_passages(" \n\n \t", "a", TOK) == []
    big = split_passages(text, "a", TOK, max_tokens=10_000)
    assert len(big) == 1 and big[0].text == text and big[0].file_sha256
    with pytest.raises(ConfigError, match="max_tokens"):
        split_passages(text, "a", TOK, max_tokens=0)


@given(lens=st.lists(st.integers(1, 150), min_size=1, max_size=7), p=st.integers(1, 70),
       feat=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_shifted_pool_equals_naive(lens, p, feat, seed):
    """The shifted router-key grid (windows of P from token P // 2; one whole-text window for documents
    of at most P // 2 tokens): the fast layout + keep rows == a plain loop, and its chunk counts are
    ``shifted_chunk_counts`` (what the store derives from token counts alone)."""
    from msa_memory.encode.pooling import pool_shifted_naive, shifted_layout
    from msa_memory.schemas.records import shifted_chunk_counts

    x = torch.randn(sum(lens), feat, generator=torch.Generator().manual_seed(seed))
    lay, keep = shifted_layout(lens, p)
    out = chunk_mean_pool(x, lay)[keep]
    want = pool_shifted_naive(x.double().numpy(), lens, p)
    assert out.shape[0] == want.shape[0] == int(shifted_chunk_counts(lens, p).sum())
    np.testing.assert_allclose(out.numpy(), want, atol=1e-5, rtol=0)


@given(lens=st.lists(st.integers(1, 150), min_size=1, max_size=7), p=st.integers(3, 70),
       feat=st.integers(1, 4), seed=st.integers(0, 2**16), data=st.data())
def test_fine_shifted_pool_equals_naive(lens, p, feat, seed, data):
    """The shifted grid with windows finer than the chunks (an even W < P at a stride of W/2: each document's
    W-token chunks from token 0, then its W-token windows from W/2): ``shifted_pool`` == a plain loop over
    the windows written out by hand, document by document, with ``shifted_chunk_counts`` rows each; W = P is
    the default grid."""
    from msa_memory.encode.pooling import pool_shifted_naive, shifted_pool
    from msa_memory.schemas.records import check_shifted_window, shifted_chunk_counts

    w = data.draw(st.sampled_from([v for v in range(2, p, 2)] or [None]))
    x = torch.randn(sum(lens), feat, generator=torch.Generator().manual_seed(seed))
    out = shifted_pool(lens, p, w)(x)
    want, start = [], 0
    for n in lens:              # the windows of the spec, spelled out
        if w is None:
            spans = [(0, n)] if n <= p // 2 else [(a, min(a + p, n)) for a in range(p // 2, n, p)]
        else:
            spans = [(a, min(a + w, n)) for a in range(0, n, w)]
            spans += [(0, n)] if n <= w // 2 else [(a, min(a + w, n)) for a in range(w // 2, n, w)]
        want += [x[start + a:start + b].double().mean(0).numpy() for a, b in spans]
        start += n
    assert out.shape[0] == len(want) == int(shifted_chunk_counts(lens, p, w).sum())
    np.testing.assert_allclose(out.numpy(), np.stack(want), atol=1e-5, rtol=0)
    np.testing.assert_allclose(pool_shifted_naive(x.double().numpy(), lens, p, w), np.stack(want), atol=1e-12)
    assert check_shifted_window(w, p) == w and check_shifted_window(p, p) is None
    np.testing.assert_array_equal(shifted_chunk_counts(lens, p, p), shifted_chunk_counts(lens, p))


@pytest.mark.parametrize("bad", [1, 3, 0, -2, 64, 66, 2.5, "x", True])
def test_shifted_window_must_be_even_and_finer(bad):
    from msa_memory.errors import ConfigError
    from msa_memory.schemas.records import check_shifted_window

    if bad == 64:
        assert check_shifted_window(bad, 64) is None          # P itself: the default grid
        return
    with pytest.raises(ConfigError, match="shifted_window must be an even number of tokens from 2 to 62"):
        check_shifted_window(bad, 64)
