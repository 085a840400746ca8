"""The plan of an encode job: what changed since the store's latest version, and the shard tasks.

What it does, on the client and before any encoding:
1. ``diff_sources``: compares the scanned sources with the documents of the version the job read,
   by source key and file sha256. Unchanged → nothing; changed → its old documents are deleted and
   the new text encoded; vanished (a key inside a scanned folder that is no longer there) → its
   documents are deleted; new → encoded. All of it lands in one new version.
2. ``split_and_count``: splits each source to encode into passages (``encode.split_passages``) and
   counts their tokens (the tokenizer, no model forward).
3. ``make_shard_tasks``: groups passages into shard-sized batches (``shard_tokens`` each, never
   splitting a file across two shards unless the file alone is larger) and gives every batch a
   deterministic shard id derived from the plan, so a resumed job asks the store for the very
   shards it wrote before (``store.find_shard``).

What it does not do: reserve ids (``encode_job`` does, once, through the job journal) or encode.

Key invariant: the same folder, store version, model and settings give the same ``plan_id`` and
the same shard ids and batches, byte for byte; nothing here depends on time or on the machine.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from msa_memory.encode.corpus import CorpusScan, SkippedFile, SourceText
from msa_memory.schemas.records import Passage

if TYPE_CHECKING:
    from msa_memory.store import MemoryStore

__all__ = ["FileDiff", "ShardTask", "diff_sources", "split_and_count", "make_shard_tasks", "plan_id_of"]


@dataclass
class FileDiff:
    """Source-level difference between a scan and a store version."""

    read_version: int
    to_encode: list[SourceText] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    delete_ids: list[int] = field(default_factory=list)
    """Document ids of replaced and deleted sources (removed in the job's one commit)."""
    skipped: list[SkippedFile] = field(default_factory=list)
    n_excluded: int = 0
    stores_excluded: list[str] = field(default_factory=list)
    """Folders the scan left out as msa stores (``CorpusScan.stores_excluded``)."""
    links_not_followed: list[str] = field(default_factory=list)
    """Symlinks out of the scanned folders the scan did not follow (``CorpusScan.links_not_followed``)."""

    @property
    def has_changes(self) -> bool:
        return bool(self.to_encode or self.delete_ids)


@dataclass(frozen=True)
class ShardTask:
    """One encode-and-write-shard task: what a worker needs, and nothing about the manifest."""

    shard_id: str
    passages: tuple[Passage, ...]
    doc_ids: np.ndarray
    """(N,) int64 ids reserved for ``passages``, in order."""
    n_tokens: int
    """Token count of the passages (before wrapping); for progress and sizing."""
    keys: tuple[str, ...]
    """Source keys whose passages this shard holds."""


def diff_sources(scan: CorpusScan, store: MemoryStore) -> FileDiff:
    """Compare ``scan`` with ``store``'s version (sources keyed by ``source_path``, hashed by ``file_sha256``)."""
    diff = FileDiff(read_version=int(store.version), skipped=list(scan.skipped), n_excluded=scan.n_excluded,
                    stores_excluded=list(scan.stores_excluded), links_not_followed=list(scan.links_not_followed))
    table = store.documents(columns=["doc_id", "source_path", "file_sha256"])
    stored: dict[str, tuple[set[str], list[int]]] = {}
    if table.num_rows:
        ids = table.column("doc_id").to_pylist()
        paths = table.column("source_path").to_pylist()
        shas = table.column("file_sha256").to_pylist()
        for doc_id, path, sha in zip(ids, paths, shas):
            entry = stored.setdefault(path, (set(), []))
            entry[0].add(sha)
            entry[1].append(int(doc_id))
    scanned = {s.key for s in scan.sources}
    for src in scan.sources:
        old = stored.get(src.key)
        if old is None:
            diff.added.append(src.key)
            diff.to_encode.append(src)
        elif old[0] == {src.sha256}:
            diff.unchanged.append(src.key)
        else:
            diff.replaced.append(src.key)
            diff.to_encode.append(src)
            diff.delete_ids.extend(old[1])
    # a skipped file keeps its old documents: an unreadable moment must not delete knowledge
    skipped_keys = _skipped_keys(scan)
    for key in sorted(stored):
        if key in scanned or not scan.covers(key) or _protected(key, skipped_keys):
            continue
        diff.deleted.append(key)
        diff.delete_ids.extend(stored[key][1])
    diff.delete_ids.sort()
    return diff


def _protected(key: str, skipped_keys: set[str]) -> bool:
    """Whether ``key`` is a skipped file's key, one of its records' (``<file>#...``) or lies in a skipped folder.

    Checks every prefix that ends before a ``#`` or after a ``/`` (a file name may itself hold a ``#``).
    """
    if key in skipped_keys:
        return True
    for i, ch in enumerate(key):
        if (ch == "#" and key[:i] in skipped_keys) or (ch == "/" and key[:i + 1] in skipped_keys):
            return True
    return False


def _skipped_keys(scan: CorpusScan) -> set[str]:
    return {sk.key for sk in scan.skipped if sk.key}


def split_and_count(
    sources: Sequence[SourceText], tokenizer: Any, *, max_passage_tokens: int,
) -> tuple[list[Passage], list[int]]:
    """Split every source into passages and count each passage's tokens. Deterministic.

    Memory: the passages, plus one tokenizer batch (``encode.iter_passages`` streams each source and
    passages are counted 256 at a time), whatever the size of a source.
    """
    from msa_memory.encode.passages import iter_passages

    passages: list[Passage] = []
    counts: list[int] = []
    step = 256

    def count(batch: list[Passage]) -> None:
        enc = tokenizer([p.text for p in batch], add_special_tokens=False, return_attention_mask=False,
                        return_token_type_ids=False)
        counts.extend(len(ids) for ids in enc["input_ids"])

    for src in sources:
        for p in iter_passages(src.text, src.key, tokenizer, max_tokens=max_passage_tokens, file_sha256=src.sha256):
            passages.append(p)
            if len(passages) - len(counts) == step:
                count(passages[len(counts):])
    if len(passages) > len(counts):
        count(passages[len(counts):])
    return passages, counts


def plan_id_of(fingerprint: dict[str, Any], read_version: int, sources: Sequence[SourceText], settings: dict[str, Any]) -> str:
    """sha256 over what determines the job's batches and tensors (not over time or machine)."""
    h = hashlib.sha256()
    h.update(json.dumps({"identity": fingerprint, "read_version": read_version, "settings": settings},
                        sort_keys=True).encode())
    for s in sources:
        h.update(f"\n{s.key}\t{s.sha256}".encode())
    return h.hexdigest()


def make_shard_tasks(
    passages: Sequence[Passage], n_tokens: Sequence[int], doc_ids: np.ndarray, *,
    plan_id: str, shard_tokens: int,
) -> list[ShardTask]:
    """Group passages (in order) into shards of about ``shard_tokens`` tokens; ids ``<plan>-<nnnnn>``.

    A source's passages stay in one shard unless the source alone exceeds ``shard_tokens``, so an
    edit to one file usually touches one shard's worth of work.
    """
    if len(passages) != len(n_tokens) or len(passages) != len(doc_ids):
        raise ValueError("passages, n_tokens and doc_ids must have the same length")
    # group consecutive passages by source key
    groups: list[list[int]] = []
    for i, p in enumerate(passages):
        if groups and passages[groups[-1][0]].source_path == p.source_path:
            groups[-1].append(i)
        else:
            groups.append([i])
    batches: list[list[int]] = []
    current: list[int] = []
    current_tokens = 0
    for g in groups:
        g_tokens = sum(n_tokens[i] for i in g)
        if current and current_tokens + g_tokens > shard_tokens:
            batches.append(current)
            current, current_tokens = [], 0
        if g_tokens > shard_tokens:  # a large file: cut it into shard-sized runs of passages
            for i in g:
                if current and current_tokens + n_tokens[i] > shard_tokens:
                    batches.append(current)
                    current, current_tokens = [], 0
                current.append(i)
                current_tokens += n_tokens[i]
        else:
            current.extend(g)
            current_tokens += g_tokens
    if current:
        batches.append(current)
    tasks = []
    for b, idx in enumerate(batches):
        keys = tuple(dict.fromkeys(passages[i].source_path for i in idx))
        tasks.append(ShardTask(
            shard_id=f"job-{plan_id[:16]}-{b:05d}",
            passages=tuple(passages[i] for i in idx),
            doc_ids=np.asarray([int(doc_ids[i]) for i in idx], dtype=np.int64),  # (n,) int64
            n_tokens=int(sum(n_tokens[i] for i in idx)),
            keys=keys,
        ))
    return tasks
