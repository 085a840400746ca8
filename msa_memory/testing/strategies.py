"""Hypothesis strategies for store tests (shipped so other parts and backends can reuse them)."""

from __future__ import annotations

from hypothesis import strategies as st

from msa_memory.schemas.records import StoreIdentity

__all__ = ["identities", "token_counts", "doc_id_sets"]


@st.composite
def identities(draw: st.DrawFn) -> StoreIdentity:
    """Small but varied store identities (layers, heads, head dim, dtype, optional router inputs, an
    optional shifted router-key grid at some of the layers, its windows P-token or finer)."""
    n_layers = draw(st.integers(1, 3))
    layers = tuple(sorted(draw(st.sets(st.integers(0, 11), min_size=n_layers, max_size=n_layers))))
    shifted = tuple(sorted(draw(st.sets(st.sampled_from(layers), max_size=n_layers)))) if draw(st.booleans()) else ()
    p = draw(st.sampled_from([1, 2, 4, 64]))
    # a finer shifted grid: an even window below P (P = 4: 2; P = 64: 2 .. 32)
    fine = [w for w in (2, 16, 32) if w < p] if shifted else []
    window = draw(st.sampled_from([None, *fine])) if fine else None
    return StoreIdentity(
        model_name="hyp", model_fingerprint=draw(st.text("0123456789abcdef", min_size=8, max_size=8)),
        router_id="r", router_layers=layers, chunk_tokens=p, shifted_window=window,
        n_kv_heads=draw(st.integers(1, 3)), head_dim=draw(st.integers(1, 12)),
        dtype=draw(st.sampled_from(["bfloat16", "float16", "float32"])),
        hidden_size=draw(st.sampled_from([0, 0, 3])), shifted_layers=shifted,
    )


def token_counts(max_docs: int = 4, max_tokens: int = 20) -> st.SearchStrategy[list[int]]:
    """Token counts of 1..max_docs documents (each >= 1)."""
    return st.lists(st.integers(1, max_tokens), min_size=1, max_size=max_docs)


def doc_id_sets(max_id: int = 200) -> st.SearchStrategy[set[int]]:
    return st.sets(st.integers(0, max_id), max_size=60)
