"""The on-disk memory store: immutable Zarr v3 shards + Parquet document rows + JSON version manifests.

Public API (docs/design.md, section store; format in docs/store-format.md)::

    store = create_store(root, identity)          # version 0, empty
    ids = store.reserve_ids(n)                    # durable, never handed out twice
    rec = write_shard(root, "job1-000", passages, encoded)   # workers; touches no manifest
    store = store.commit(add=[rec], delete_ids=[...], message="...")  # version N+1, atomic
    store = open_store(root, version=None | 3 | "tag")
    keys, chunk_doc = store.router_keys(layer); kv = store.load_kv(ids); store.texts(ids)

Where the bytes live is a backend (``store.backend``: local folder, ``memory://NAME``; the interface
and its contract in ``backend.py``). numpy only: this package never imports torch.
"""

from __future__ import annotations

from msa_memory.schemas.records import ShardRecord
from msa_memory.store.api import MemoryStore, create_store, open_store
from msa_memory.store.backend import Backend
from msa_memory.store.reader import Snapshot
from msa_memory.store.shards import write_shard

__all__ = ["Backend", "MemoryStore", "ShardRecord", "Snapshot", "create_store", "open_store", "write_shard"]
