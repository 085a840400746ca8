"""Document-id bookkeeping: the durable id counter and sets of ids as sorted half-open ranges.

Two facts decide whether an id may be written: it was *reserved* (``id < next_id`` in
``_ids.json``, a counter only ever increased under the writer lock, fsynced before the ids are
handed out) and it was never *used* (every version manifest carries ``used_id_ranges``, the
union of all ids ever committed, carried forward by every commit, restore and compaction). So
ids are never handed out twice, even after a crash, and never reused after a deletion, while a
commit touches only O(ranges) state, not O(documents in the store).
"""

from __future__ import annotations

import json

import numpy as np

from msa_memory.errors import ManifestCorruptError
from msa_memory.store._layout import IDS_FILE, dumps
from msa_memory.store.backend import Backend

Ranges = list[list[int]]  # sorted, disjoint, non-adjacent [start, stop) pairs


def ids_to_ranges(ids: np.ndarray) -> Ranges:
    """Sorted distinct ids -> maximal runs as [start, stop) ranges."""
    ids = np.unique(np.asarray(ids, dtype=np.int64))
    if ids.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(ids) != 1)
    starts = np.concatenate([[0], breaks + 1])
    stops = np.concatenate([breaks + 1, [ids.size]])
    return [[int(ids[a]), int(ids[b - 1]) + 1] for a, b in zip(starts, stops)]


def union_ranges(a: Ranges, b: Ranges) -> Ranges:
    out: Ranges = []
    for s, e in sorted([list(r) for r in a] + [list(r) for r in b]):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return out


def in_ranges(ids: np.ndarray, ranges: Ranges) -> np.ndarray:
    """(N,) bool: which ids fall in any range."""
    ids = np.asarray(ids, dtype=np.int64)
    if not ranges:
        return np.zeros(ids.shape, dtype=bool)
    r = np.asarray(ranges, dtype=np.int64)
    pos = np.searchsorted(r[:, 0], ids, side="right") - 1
    ok = pos >= 0
    res = np.zeros(ids.shape, dtype=bool)
    res[ok] = ids[ok] < r[pos[ok], 1]
    return res


def read_next_id(be: Backend) -> int:
    path = f"{be}/{IDS_FILE}"
    try:
        d = json.loads(be.read(IDS_FILE))
        return int(d["next_id"])
    except FileNotFoundError:
        return 0
    except (ValueError, KeyError, TypeError) as e:
        raise ManifestCorruptError(
            f"Id counter {path} is corrupt ({e}).",
            hint="Restore it from a backup, or rewrite it as {\"next_id\": N} with N above every id ever reserved.",
        ) from None


def bump_next_id(be: Backend, n: int, floor: int = 0) -> tuple[int, int]:
    """Reserve ``n`` ids (caller holds the writer lock); returns [start, stop). Durable on return."""
    start = max(read_next_id(be), floor)
    be.replace(IDS_FILE, dumps({"next_id": start + n}))
    return start, start + n
