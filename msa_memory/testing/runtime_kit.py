"""Test kit for the runtime: six short passages and a real store of them, encoded by a given (tiny) model.

The store is built with the real store API (create_store → reserve_ids → write_shard → commit) and the real
encoder. Tests import it from here (``conftest`` is not an importable name when the whole suite runs: every
test folder has one, and which is imported under that name depends on the order pytest meets them).
"""

from __future__ import annotations

__all__ = ["PASSAGES", "build_store"]

PASSAGES = [
    "The blue door code is 4471. Nobody else knows it.",
    "Apples grow on trees in the northern orchard every autumn season.",
    "The red door code is 9302, written on the back of the map.",
    "Rivers flow downhill to the sea; the delta is wide and green.",
    "Our meeting moved to Thursday at noon in the east building lobby.",
    "Cats sleep most of the day and hunt mice at night in the barn.",
]


def build_store(root, loaded, passages=PASSAGES, dtype="float32"):
    """A committed store at ``root`` of ``passages`` (3 a source file: ``notes/0.txt``, ``notes/1.txt``, …)
    encoded by ``loaded`` (a :class:`~msa_memory.encode.model.LoadedModel`) in storage dtype ``dtype``."""
    from msa_memory.encode import Encoder
    from msa_memory.schemas.records import Passage
    from msa_memory.store import create_store, write_shard

    store = create_store(root, loaded.identity(store_dtype=dtype))
    ids = store.reserve_ids(len(passages))
    ps = [Passage(text=t, source_path=f"notes/{i // 3}.txt", passage_index=i % 3) for i, t in enumerate(passages)]
    enc = Encoder(loaded, store_dtype=dtype).encode(ids, ps)
    if enc.dtype != dtype:
        raise AssertionError(f"encoder produced {enc.dtype}, wanted {dtype}")
    rec = write_shard(root, "s0", ps, enc)
    return store.commit(add=[rec], message="test")
