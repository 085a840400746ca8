"""ContentMemory: fetch returns exactly the requested documents in order (host and store sources),
per-layer K̄/V̄ views, LRU eviction under the cache budget, and clear errors.
Run: .venv/bin/python -m pytest tests/unit/runtime/test_memory_tier.py -q
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from msa_memory.errors import ConfigError, RuntimeMemoryError
from msa_memory.runtime.memory_tier import ContentMemory

L, H, D = 3, 2, 4


def _data(counts, seed=0):
    rng = np.random.default_rng(seed)
    kv = torch.from_numpy(rng.standard_normal((int(sum(counts)), L, 2, H, D)).astype(np.float32)).to(torch.bfloat16)
    off = np.concatenate([[0], np.cumsum(counts)])
    return kv, [kv[off[i]:off[i + 1]] for i in range(len(counts))]


@pytest.mark.parametrize("source", ["host", "store"])
def test_fetch_returns_requested_docs_in_order(source):
    counts = [2, 1, 3, 1]
    kv, per_doc = _data(counts)
    calls = []

    def loader(idx):
        calls.append(list(idx))
        return [per_doc[i].view(torch.int16).numpy().view(np.uint16) for i in idx]   # bf16 bit patterns, as stored

    cm = ContentMemory(counts, (L, H, D), torch.bfloat16, host_kv=kv if source == "host" else None,
                       loader=None if source == "host" else loader)
    got = cm.fetch([2, 0, 2, 3])
    for g, i in zip(got, [2, 0, 2, 3]):
        assert torch.equal(g, per_doc[i])
    k, v = cm.layer_kv([3, 1], layer=1)
    assert k.shape == (H, 2, D) and v.shape == (H, 2, D)
    assert torch.equal(k[:, 0], per_doc[3][0, 1, 0]) and torch.equal(v[:, 1], per_doc[1][0, 1, 1])
    if source == "store":
        assert calls == [[2, 0, 3], [1]]       # one loader call per fetch, for the misses only


def test_lru_evicts_least_recent_under_budget():
    counts = [1, 1, 1]
    kv, _ = _data(counts)
    row = L * 2 * H * D * 2
    cm = ContentMemory(counts, (L, H, D), torch.bfloat16, host_kv=kv, cache_bytes=2 * row)
    cm.fetch([0]); cm.fetch([1]); cm.fetch([0]); cm.fetch([2])      # 1 is least recent → evicted
    assert set(cm._cache) == {0, 2}
    before = cm.stats["docs_fetched"]
    cm.fetch([1])
    assert cm.stats["docs_fetched"] == before + 1


def test_content_memory_errors_name_the_problem():
    kv, per_doc = _data([1, 2])
    with pytest.raises(ConfigError, match="exactly one"):
        ContentMemory([1, 2], (L, H, D), torch.bfloat16)
    with pytest.raises(ConfigError, match="host_kv must be"):
        ContentMemory([1, 1], (L, H, D), torch.bfloat16, host_kv=kv)
    cm = ContentMemory([1, 2], (L, H, D), torch.bfloat16, host_kv=kv)
    with pytest.raises(ConfigError, match="0..1"):
        cm.fetch([5])
    bad = ContentMemory([1, 2], (L, H, D), torch.bfloat16, loader=lambda idx: [per_doc[0].view(torch.int16).numpy() for _ in idx])
    with pytest.raises(RuntimeMemoryError, match="inconsistent"):
        bad.fetch([1])
