"""Batch jobs that wire ``encode`` and ``store`` together on Dask (see docs/design.md).

``encode_corpus(paths, store, ...)``: plan → encode-and-write-shard tasks → one commit;
incremental (by file sha256) and resumable (journaled ids, deterministic shard ids).
``encode_token_ids(docs, store, ...)``: the same job for documents given as token ids.
"""

from __future__ import annotations

from msa_memory.jobs.encode_job import (
    JobResult,
    ModelSpec,
    ShardResult,
    default_shard_tokens,
    encode_and_write_shard,
    encode_corpus,
    get_encoder,
)
from msa_memory.jobs.token_ids import encode_token_ids, token_ids_sha256

__all__ = ["encode_corpus", "encode_token_ids", "token_ids_sha256", "default_shard_tokens", "JobResult", "ModelSpec",
           "ShardResult", "encode_and_write_shard", "get_encoder"]
