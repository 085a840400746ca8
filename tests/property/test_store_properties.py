"""Property tests of the store pieces: bit-exact round trips over varied identities, and the
id-range helpers vs plain Python sets. Run: .venv/bin/python -m pytest tests/property/test_store_properties.py -q
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from msa_memory.schemas.records import shifted_chunk_counts
from msa_memory.store import _ids, create_store, write_shard
from msa_memory.store.shards import tensor_bytes
from msa_memory.testing.faults import validate_store_manifests
from msa_memory.testing.store_kit import random_docs
from msa_memory.testing.strategies import doc_id_sets, identities, token_counts


@settings(max_examples=max(10, settings.default.max_examples // 3), deadline=None)
@given(identity=identities(), counts=token_counts(), seed=st.integers(0, 2**31 - 1))
def test_roundtrip_any_identity(identity, counts, seed):
    d = Path(tempfile.mkdtemp())
    try:
        store = create_store(d / "s", identity)
        ids = store.reserve_ids(len(counts))
        passages, enc = random_docs(identity, ids, counts, np.random.default_rng(seed))
        store = store.commit(add=[write_shard(store.root, "s", passages, enc)])
        offs = enc.offsets
        for i, got in enumerate(store.load_kv(ids)):
            assert got.dtype == enc.kv.dtype and got.tobytes() == enc.kv[offs[i]:offs[i + 1]].tobytes()
        for layer in range(identity.n_layers):
            keys, chunk_doc = store.router_keys(layer)
            assert keys.tobytes() == enc.k_router[layer].tobytes()
            assert chunk_doc.tolist() == np.repeat(ids, enc.n_chunks).tolist()
            if identity.hidden_size:
                assert store.router_inputs(layer)[0].tobytes() == enc.x_router[layer].tobytes()
        for j in range(len(identity.shifted_layers)):
            keys, chunk_doc = store.router_keys_shifted(j)
            assert keys.tobytes() == enc.k_router_s[j].tobytes()
            assert chunk_doc.tolist() == np.repeat(ids, shifted_chunk_counts(counts, identity.chunk_tokens,
                                                                               identity.shifted_window)).tolist()
            if identity.hidden_size:
                assert store.router_inputs_shifted(j)[0].tobytes() == enc.x_router_s[j].tobytes()
        assert store.stats()["n_bytes"] == tensor_bytes(identity, counts)
        assert store.texts(ids) == [p.text for p in passages]
        assert validate_store_manifests(store.root) == 2
    finally:
        shutil.rmtree(d, ignore_errors=True)


@given(a=doc_id_sets(), b=doc_id_sets(), probe=doc_id_sets())
def test_id_ranges_match_sets(a, b, probe):
    ra, rb = _ids.ids_to_ranges(np.array(sorted(a), dtype=np.int64)), _ids.ids_to_ranges(np.array(sorted(b), dtype=np.int64))
    expand = lambda r: {x for s, e in r for x in range(s, e)}  # noqa: E731
    assert expand(ra) == a
    u = _ids.union_ranges(ra, rb)
    assert expand(u) == a | b
    assert all(u[i][1] < u[i + 1][0] for i in range(len(u) - 1))  # disjoint, non-adjacent, sorted
    p = np.array(sorted(probe), dtype=np.int64)
    assert _ids.in_ranges(p, u).tolist() == [x in (a | b) for x in sorted(probe)]
