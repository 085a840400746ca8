"""Fixtures of the runtime tests: a tiny random MSA checkpoint, and a small store built for it.

The store is built with the real store API (create_store → reserve_ids → write_shard → commit)
from the real encoder when ``msa_memory.encode.Encoder`` is available; the passages are short
byte-tokenized texts, so each document has 1-3 chunks at chunk_tokens=16.
"""

from __future__ import annotations

import numpy as np
import pytest

PASSAGES = [
    "The blue door code is 4471. Nobody else knows it.",
    "Apples grow on trees in the northern orchard every autumn season.",
    "The red door code is 9302, written on the back of the map.",
    "Rivers flow downhill to the sea; the delta is wide and green.",
    "Our meeting moved to Thursday at noon in the east building lobby.",
    "Cats sleep most of the day and hunt mice at night in the barn.",
]


@pytest.fixture(scope="session")
def tiny_msa_model(tmp_path_factory):
    from msa_memory.encode.model import load_model
    from msa_memory.encode.tiny import write_tiny_msa_checkpoint

    import torch

    path = write_tiny_msa_checkpoint(tmp_path_factory.mktemp("ckpt") / "msa", pooling_kernel_size=16,
                                     extra_msa_config={"top_k_docs": 2})
    return load_model(str(path), dtype=torch.float32)


def build_store(root, loaded, passages=PASSAGES, dtype="float32"):
    """A store of ``passages`` encoded by ``loaded`` (real encoder when available)."""
    from msa_memory.schemas.records import EncodedChunks, Passage, from_float32
    from msa_memory.store import create_store, write_shard

    ident = loaded.identity(store_dtype=dtype)
    store = create_store(root, ident)
    ids = store.reserve_ids(len(passages))
    ps = [Passage(text=t, source_path=f"notes/{i // 3}.txt", passage_index=i % 3) for i, t in enumerate(passages)]
    try:
        from msa_memory.encode import Encoder
    except ImportError:
        Encoder = None
    if Encoder is not None:
        enc = Encoder(loaded, store_dtype=dtype).encode(ids, ps)
        if enc.dtype != dtype:
            raise AssertionError(f"encoder produced {enc.dtype}, wanted {dtype}")
    else:  # random numbers of the right shape: the runtime plumbing does not care where they came from
        rng = np.random.default_rng(0)
        n_tok = np.array([len(loaded.wrap_ids(p.text, int(i))) for p, i in zip(ps, ids)])
        n_ch = -(-n_tok // ident.chunk_tokens)
        C, L, H, D = int(n_ch.sum()), ident.n_layers, ident.n_kv_heads, ident.head_dim
        enc = EncodedChunks(doc_ids=np.asarray(ids), n_tokens=n_tok, n_chunks=n_ch,
                            k_router=from_float32(rng.standard_normal((L, C, H, D)), dtype),
                            kv=from_float32(rng.standard_normal((C, L, 2, H, D)), dtype), dtype=dtype)
    rec = write_shard(root, "s0", ps, enc)
    return store.commit(add=[rec], message="test")


@pytest.fixture(scope="session")
def store_builder():
    """``build_store`` and the passages, for tests that build a store of their own (``conftest`` is not an
    importable name when the whole suite runs: every folder has one)."""
    return build_store, PASSAGES


@pytest.fixture(scope="session")
def tiny_store(tiny_msa_model, tmp_path_factory):
    return build_store(tmp_path_factory.mktemp("store") / "mem.msa", tiny_msa_model)


@pytest.fixture(scope="session")
def tiny_memory(tiny_store, tiny_msa_model):
    from msa_memory.runtime import Memory

    return Memory(tiny_store, model=tiny_msa_model)
