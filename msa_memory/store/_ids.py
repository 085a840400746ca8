"""Document-id bookkeeping: the durable id counter and sets of ids as sorted half-open ranges.

Two facts decide whether an id may be written: it was *reserved* (``id < next_id``) and it was never
*used* (every version manifest carries ``used_id_ranges``, the union of all ids ever committed, carried
forward by every commit, restore and compaction). So ids are never handed out twice, even after a
crash, and never reused after a deletion, while a commit touches only O(ranges) state, not
O(documents in the store).

``next_id`` has two forms. On a backend with locks it is ``_ids.json``, a counter only ever increased
under the writer lock, durable before the ids are handed out. On a backend without locks (object
storage) ids are *claimed*: claim ``k`` is the write-once object ``ids/{k:012d}.json``
(``{"seq", "start", "stop", "nonce"}``) published conditionally, and its ``start`` is at least the
``stop`` of claim ``k-1``, which the claimer read before publishing. Claim numbers form a chain with no
gaps, so of two reservers racing for number ``k`` exactly one wins, the other re-reads and claims
``k+1`` after it: ranges never overlap, and no lock server is needed. Claims are never deleted (a
deleted number could be claimed again); each is ~100 bytes, one per ``reserve_ids`` call.
``next_id`` is the largest of the counter and the last claim's ``stop``.
"""

from __future__ import annotations

import json
import random
import time
import uuid

import numpy as np

from msa_memory.errors import ManifestCorruptError, VersionConflictError
from msa_memory.store._layout import IDS_DIR, IDS_FILE, dumps
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


def _read_counter(be: Backend) -> int:
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


def _claim_key(seq: int) -> str:
    return f"{IDS_DIR}/{seq:012d}.json"


def _last_claim(be: Backend) -> tuple[int, int]:
    """(number, stop) of the newest id claim; (-1, 0) when there is none."""
    seqs = sorted(int(n[:-5]) for n in be.list(IDS_DIR) if n.endswith(".json") and n[:-5].isdigit())
    if not seqs:
        return -1, 0
    key = _claim_key(seqs[-1])
    try:
        return seqs[-1], int(json.loads(be.read(key))["stop"])
    except (ValueError, KeyError, TypeError) as e:
        raise ManifestCorruptError(f"Id claim {be}/{key} is corrupt ({e}).",
                                   hint="Rewrite it as {\"stop\": N} with N above every id ever reserved.") from None


def read_next_id(be: Backend) -> int:
    """Ids below this were handed out: the counter's value or the last claim's stop, whichever is larger."""
    return max(_read_counter(be), _last_claim(be)[1])


def bump_next_id(be: Backend, n: int, floor: int = 0) -> tuple[int, int]:
    """Reserve ``n`` ids (caller holds the writer lock); returns [start, stop). Durable on return."""
    start = max(read_next_id(be), floor)
    be.replace(IDS_FILE, dumps({"next_id": start + n}))
    return start, start + n


def claim_ids(be: Backend, n: int, floor: int = 0, attempts: int = 200) -> tuple[int, int]:
    """Reserve ``n`` ids without a lock (conditional publish of the next claim); returns [start, stop).

    Raises VersionConflictError when ``attempts`` claims in a row were taken by other reservers."""
    for attempt in range(attempts):
        seq, stop = _last_claim(be)
        start = max(stop, floor, _read_counter(be))
        claim = {"seq": seq + 1, "start": start, "stop": start + n, "nonce": uuid.uuid4().hex}
        if be.publish(_claim_key(seq + 1), dumps(claim)):
            return start, start + n
        time.sleep(min(0.005 * 2 ** min(attempt, 6), 0.3) * random.random())  # another reserver got k: back off
    raise VersionConflictError(f"Could not reserve ids in store {str(be)!r}: {attempts} claims in a row were taken "
                               "by other writers; nothing was reserved.", hint="Retry; reserve larger batches.")
