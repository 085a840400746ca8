"""The on-disk memory store: immutable Zarr v3 shards + Parquet document rows + JSON version manifests.

Public API (docs/design.md, section store; format in docs/store-format.md)::

    store = create_store(root, identity)          # version 0, empty
    ids = store.reserve_ids(n)                    # durable, never handed out twice
    rec = write_shard(root, "job1-000", passages, encoded)   # workers; touches no manifest
    store = store.commit(add=[rec], delete_ids=[...], message="...")  # version N+1, atomic
    store = open_store(root, version=None | 3 | "tag")
    keys, chunk_doc = store.router_keys(layer); kv = store.load_kv(ids); store.texts(ids)

numpy only: this package never imports torch.
"""

from __future__ import annotations

from msa_memory.schemas.records import ShardRecord
from msa_memory.store.commit import create_store, open_store
from msa_memory.store.reader import MemoryStore
from msa_memory.store.shards import write_shard

__all__ = ["MemoryStore", "ShardRecord", "create_store", "open_store", "write_shard"]
