"""Test kit for the store: small identities and random encoded documents, no model needed.

Used by the store's own tests and benchmark, and reusable by other parts (jobs, runtime, CLI)
that need a real store with known contents. Random bf16 values are drawn as bit patterns of
finite floats, so round trips can be compared bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from msa_memory.schemas.records import STORAGE_DTYPES, EncodedChunks, Passage, StoreIdentity, shifted_chunk_counts

__all__ = ["tiny_identity", "gemma_like_identity", "random_docs", "add_docs"]


def tiny_identity(*, hidden_size: int = 0, dtype: str = "bfloat16", chunk_tokens: int = 4,
                  shifted_layers: tuple[int, ...] = (), shifted_window: int | None = None) -> StoreIdentity:
    """A 2-layer (1, 3), 2-head, D=8 identity (small enough for property tests); ``shifted_layers``
    (a subset of (1, 3)) adds the shifted router-key grid, ``shifted_window`` makes its windows finer."""
    return StoreIdentity(model_name="tiny-test", model_fingerprint="f" * 64, router_id="r" * 16,
                         router_layers=(1, 3), chunk_tokens=chunk_tokens, n_kv_heads=2, head_dim=8,
                         dtype=dtype, hidden_size=hidden_size, shifted_layers=shifted_layers,  # type: ignore[arg-type]
                         shifted_window=shifted_window)


def gemma_like_identity() -> StoreIdentity:
    """Gemma-3-270M shape: 9 router layers x 1 kv head x 256, bf16, P=64."""
    return StoreIdentity(model_name="gemma-like", model_fingerprint="g" * 64, router_id="gr",
                         router_layers=tuple(range(9, 18)), chunk_tokens=64, n_kv_heads=1, head_dim=256)


def _values(rng: np.random.Generator, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    st = STORAGE_DTYPES[dtype]
    if dtype == "bfloat16":
        # finite bf16: any sign/mantissa, exponent never 0xFF
        bits = rng.integers(0, 1 << 16, size=shape, dtype=np.uint32).astype(np.uint16)
        exp_all_ones = (bits & 0x7F80) == 0x7F80
        bits[exp_all_ones] &= np.uint16(0xBFFF)
        return bits
    return rng.standard_normal(shape).astype(st)


def random_docs(identity: StoreIdentity, doc_ids: np.ndarray, n_tokens: Sequence[int] | np.ndarray,
                rng: np.random.Generator, *, source: str = "doc", texts: Sequence[str] | None = None
                ) -> tuple[list[Passage], EncodedChunks]:
    """Passages + EncodedChunks of random values for ``doc_ids`` with the given token counts."""
    ids = np.asarray(doc_ids, dtype=np.int64)
    tok = np.asarray(n_tokens, dtype=np.int64)
    n_chunks = -(-tok // identity.chunk_tokens)
    C = int(n_chunks.sum())
    L, H, D, E = identity.n_layers, identity.n_kv_heads, identity.head_dim, identity.hidden_size
    kv = _values(rng, (C, L, 2, H, D), identity.dtype)
    k_router = _values(rng, (L, C, H, D), identity.dtype)
    x_router = _values(rng, (L, C, E), identity.dtype) if E > 0 else None
    shifted: dict[str, np.ndarray | None] = {}
    if identity.shifted_layers:
        n_s = shifted_chunk_counts(tok, identity.chunk_tokens, identity.shifted_window)
        Ls, Cs = len(identity.shifted_layers), int(n_s.sum())
        shifted = {"n_chunks_s": n_s, "k_router_s": _values(rng, (Ls, Cs, H, D), identity.dtype),
                   "x_router_s": _values(rng, (Ls, Cs, E), identity.dtype) if E > 0 else None}
    passages = []
    for j, i in enumerate(ids):
        text = texts[j] if texts is not None else f"text of document {int(i)} ({source}) " + "é" * int(i % 5)
        passages.append(Passage(text=text, source_path=f"{source}/{int(i)}.txt", passage_index=j,
                                byte_start=0, byte_end=len(text.encode()), file_sha256="0" * 64))
    enc = EncodedChunks(doc_ids=ids, n_tokens=tok, n_chunks=n_chunks, k_router=k_router, kv=kv,
                        dtype=identity.dtype, x_router=x_router, **shifted)  # type: ignore[arg-type]
    return passages, enc


def add_docs(store, n_tokens: Sequence[int], rng: np.random.Generator, shard_id: str, *,  # type: ignore[no-untyped-def]
             source: str = "doc", commit: bool = True, message: str = "add"):
    """Reserve ids, write one shard of random docs and (optionally) commit it.

    Returns ``(new_store, record, passages, encoded)``.
    """
    from msa_memory.store import write_shard

    ids = store.reserve_ids(len(n_tokens))
    passages, enc = random_docs(store.identity, ids, n_tokens, rng, source=source)
    rec = write_shard(store.backend, shard_id, passages, enc)
    new = store.commit(add=[rec], message=message) if commit else store
    return new, rec, passages, enc
