"""The plan of an encode job: what changed since the store's latest version, and the shard tasks.

What it does, on the client and before any encoding:
1. ``diff_sources``: compares the scanned sources with the documents of the version the job read,
   by source key and file sha256. Unchanged → nothing; changed → its old documents are deleted and
   the new text encoded; vanished (a key inside a scanned folder that is no longer there) → its
   documents are deleted; new → encoded. All of it lands in one new version.
2. ``plan_passages``: splits each source to encode into passages (``encode.iter_passages``) and
   counts their tokens (the tokenizer, no model forward). A plain-text file scanned without its
   text (``SourceText.index``) is read a block at a time and only each passage's byte range and
   token count are kept (:class:`PlannedSource`); a source read whole keeps its passages.
3. ``shard_tasks``: groups passages into shard-sized batches (``shard_tokens`` each, never
   splitting a file across two shards unless the file alone is larger) and gives every batch a
   deterministic shard id derived from the plan, so a resumed job asks the store for the very
   shards it wrote before (``store.find_shard``). A task carries references (key, byte ranges,
   the index of the blocks they lie in), not texts, for a streamed file: the worker reads the
   passages back (``ShardTask.load_passages``) and checks every block it reads against the digest
   the scan took, so a file changed since the scan fails the task, naming the file.

Memory of a plan: 32 bytes a passage of a streamed file (byte range, token count, id) and 24 more
in its shard task (range, id), ~1 KB a task, the passages of sources read whole, and one tokenizer
batch; not the size of the files.

What it does not do: reserve ids (``encode_job`` does, once, through the job journal) or encode.

Key invariant: the same folder, store version, model and settings give the same ``plan_id`` and
the same shard ids and batches, byte for byte; nothing here depends on time or on the machine.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from msa_memory.encode._textfile import TextIndex
from msa_memory.encode.sources import CorpusScan, SkippedFile, SourceText
from msa_memory.schemas.records import Passage

if TYPE_CHECKING:
    from msa_memory.store import MemoryStore

__all__ = ["FileDiff", "PlannedSource", "ShardPart", "ShardTask", "diff_sources", "plan_passages", "split_and_count",
           "shard_tasks", "make_shard_tasks", "plan_id_of"]


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


@dataclass(frozen=True, slots=True)
class PlannedSource:
    """The passages planned for one source: token counts, and either the passages or where they lie."""

    key: str
    n_tokens: np.ndarray
    """(n,) int64 text tokens of each passage (before wrapping)."""
    passages: tuple[Passage, ...] | None = None
    """The passages of a source read whole (HTML, PDF, JSON Lines, token ids); None for a streamed file."""
    spans: np.ndarray | None = None
    """(n, 2) int64 ``[byte_start, byte_end)`` of each passage in the text of a streamed file."""
    index: TextIndex | None = None
    """The streamed file's block index (its path, sha256 and block digests)."""

    def __len__(self) -> int:
        return len(self.n_tokens)


@dataclass(frozen=True, slots=True)
class ShardPart:
    """Passages ``first:first + n`` of one source, as a shard task carries them."""

    key: str
    first: int
    """``passage_index`` of the part's first passage."""
    passages: tuple[Passage, ...] | None = None
    """Held passages (a source read whole)."""
    spans: np.ndarray | None = None
    """(n, 2) int64 byte ranges in the file's text (a streamed file)."""
    index: TextIndex | None = None
    """The blocks of the file that hold ``spans`` (``TextIndex.part``)."""

    def load(self) -> list[Passage]:
        """The part's passages; a streamed file's are read back, every block checked (JobError if changed)."""
        if self.passages is not None:
            return list(self.passages)
        assert self.spans is not None and self.index is not None
        lo, hi = int(self.spans[0, 0]), int(self.spans[-1, 1])
        data = self.index.read(lo, hi, key=self.key)
        sha = self.index.sha256
        return [Passage(text=data[bs - lo:be - lo].decode("utf-8"), source_path=self.key, passage_index=self.first + j,
                        byte_start=int(bs), byte_end=int(be), file_sha256=sha)
                for j, (bs, be) in enumerate(self.spans.tolist())]


@dataclass(frozen=True, slots=True)
class ShardTask:
    """One encode-and-write-shard task: what a worker needs, and nothing about the manifest."""

    shard_id: str
    parts: tuple[ShardPart, ...]
    """The passages, by source, in order (references into streamed files; small and picklable)."""
    doc_ids: np.ndarray
    """(N,) int64 ids reserved for the passages, in order."""
    n_tokens: int
    """Token count of the passages (before wrapping); for progress and sizing."""
    keys: tuple[str, ...]
    """Source keys whose passages this shard holds."""

    @property
    def n_docs(self) -> int:
        return len(self.doc_ids)

    def load_passages(self) -> list[Passage]:
        """The passages, in order: held ones as planned, streamed ones read back from their files."""
        return [p for part in self.parts for p in part.load()]

    @property
    def passages(self) -> tuple[Passage, ...]:
        """``tuple(load_passages())`` (reads streamed parts from their files)."""
        return tuple(self.load_passages())

    def with_text(self) -> ShardTask:
        """This task with its streamed parts read now (blocks checked) and their passages held: for workers
        on other hosts, which cannot read the client's files. The same passages, so the same shard."""
        if all(p.passages is not None for p in self.parts):
            return self
        return replace(self, parts=tuple(p if p.passages is not None else ShardPart(p.key, p.first,
                                                                                    passages=tuple(p.load()))
                                         for p in self.parts))


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


class _Counts:
    """Token counts of passages, 256 per tokenizer call."""

    step = 256

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.pending, self.counts = tokenizer, [], array("q")

    def add(self, text: str) -> None:
        self.pending.append(text)
        if len(self.pending) == self.step:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            enc = self.tokenizer(self.pending, add_special_tokens=False, return_attention_mask=False,
                                 return_token_type_ids=False)
            self.counts.extend(len(ids) for ids in enc["input_ids"])
            self.pending = []


def plan_passages(sources: Sequence[SourceText], tokenizer: Any, *, max_passage_tokens: int) -> list[PlannedSource]:
    """Split every source into passages and count each passage's tokens. Deterministic.

    A source with a block index and no text (``SourceText.index``) is read a block at a time and keeps
    its passages' byte ranges only; a source with text keeps its passages. Memory: those, plus one
    tokenizer batch, whatever the size of a file. Raises JobError when a file changed since the scan.
    """
    from msa_memory.encode.passages import iter_passages

    out: list[PlannedSource] = []
    for src in sources:
        counter = _Counts(tokenizer)
        streamed = src.text is None
        held: list[Passage] = []
        spans = array("q")
        for p in iter_passages(src.open_text(), src.key, tokenizer, max_tokens=max_passage_tokens,
                               file_sha256=src.sha256):
            counter.add(p.text)
            if streamed:
                spans.extend((p.byte_start, p.byte_end))
            else:
                held.append(p)
        counter.flush()
        n_tokens = np.frombuffer(counter.counts, dtype=np.int64).copy() if counter.counts else np.zeros(0, np.int64)
        if streamed:
            out.append(PlannedSource(src.key, n_tokens, spans=np.frombuffer(spans, dtype=np.int64).reshape(-1, 2).copy()
                                     if spans else np.zeros((0, 2), np.int64), index=src.index))
        else:
            out.append(PlannedSource(src.key, n_tokens, passages=tuple(held)))
    return out


def split_and_count(
    sources: Sequence[SourceText], tokenizer: Any, *, max_passage_tokens: int,
) -> tuple[list[Passage], list[int]]:
    """Every source's passages and their token counts, in memory (:func:`plan_passages` keeps less).

    Streamed sources (``SourceText.index``) are read back from their files.
    """
    passages: list[Passage] = []
    counts: list[int] = []
    for planned in plan_passages(sources, tokenizer, max_passage_tokens=max_passage_tokens):
        passages.extend(_part_of(planned, 0, len(planned)).load())
        counts.extend(int(n) for n in planned.n_tokens)
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
    """:func:`shard_tasks` of passages held in memory (consecutive passages of one source path form a source)."""
    if len(passages) != len(n_tokens) or len(passages) != len(doc_ids):
        raise ValueError("passages, n_tokens and doc_ids must have the same length")
    planned: list[PlannedSource] = []
    start = 0
    for i in range(1, len(passages) + 1):
        if i == len(passages) or passages[i].source_path != passages[start].source_path:
            planned.append(PlannedSource(passages[start].source_path,
                                         np.asarray([int(n) for n in n_tokens[start:i]], dtype=np.int64),
                                         passages=tuple(passages[start:i])))
            start = i
    return shard_tasks(planned, doc_ids, plan_id=plan_id, shard_tokens=shard_tokens)


def shard_tasks(planned: Sequence[PlannedSource], doc_ids: np.ndarray, *, plan_id: str,
                shard_tokens: int) -> list[ShardTask]:
    """Group passages (in order) into shards of about ``shard_tokens`` tokens; ids ``<plan>-<nnnnn>``.

    A source's passages stay in one shard unless the source alone exceeds ``shard_tokens``, so an
    edit to one file usually touches one shard's worth of work. ``doc_ids`` (N,) int64, one per
    passage in order.
    """
    n_total = sum(len(p) for p in planned)
    if n_total != len(doc_ids):
        raise ValueError(f"{n_total} passages planned but {len(doc_ids)} doc_ids given")
    batches: list[list[tuple[int, int, int]]] = []   # each: (source, first passage, end passage) runs
    current: list[tuple[int, int, int]] = []
    current_tokens = 0
    for si, ps in enumerate(planned):
        if not len(ps):
            continue
        g_tokens = int(ps.n_tokens.sum())
        if current and current_tokens + g_tokens > shard_tokens:
            batches.append(current)
            current, current_tokens = [], 0
        if g_tokens > shard_tokens:  # a large file: cut it into shard-sized runs of passages
            j0 = 0
            for j, n in enumerate(ps.n_tokens.tolist()):
                if (current or j > j0) and current_tokens + n > shard_tokens:
                    batches.append(current + ([(si, j0, j)] if j > j0 else []))
                    current, current_tokens, j0 = [], 0, j
                current_tokens += n
            current.append((si, j0, len(ps)))
        else:
            current.append((si, 0, len(ps)))
            current_tokens += g_tokens
    if current:
        batches.append(current)
    offsets = np.cumsum([0] + [len(p) for p in planned])
    tasks = []
    for b, runs in enumerate(batches):
        parts = tuple(_part_of(planned[si], j0, j1) for si, j0, j1 in runs)
        ids = np.concatenate([np.asarray(doc_ids[offsets[si] + j0:offsets[si] + j1], dtype=np.int64)
                              for si, j0, j1 in runs])
        tasks.append(ShardTask(
            shard_id=f"job-{plan_id[:16]}-{b:05d}",
            parts=parts,
            doc_ids=ids,  # (n,) int64
            n_tokens=int(sum(int(planned[si].n_tokens[j0:j1].sum()) for si, j0, j1 in runs)),
            keys=tuple(dict.fromkeys(planned[si].key for si, _, _ in runs)),
        ))
    return tasks


def _part_of(ps: PlannedSource, j0: int, j1: int) -> ShardPart:
    """Passages ``j0:j1`` of ``ps`` as a task carries them: held passages, or byte ranges and their blocks."""
    if ps.passages is not None:
        return ShardPart(ps.key, j0, passages=ps.passages[j0:j1])
    assert ps.spans is not None and ps.index is not None
    spans = ps.spans[j0:j1].copy()
    index = ps.index.part(int(spans[0, 0]), int(spans[-1, 1])) if len(spans) else ps.index
    return ShardPart(ps.key, j0, spans=spans, index=index)
