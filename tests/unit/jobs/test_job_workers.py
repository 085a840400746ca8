"""Same job on one worker vs two worker processes: the same committed content.

One in-process worker runs torch on every core; two worker processes run one torch thread each.
Documents, ids and texts must be identical and the content K̄/V̄ bit-identical. Router keys come
from a small GEMM whose reduction order may depend on the thread count, so they are allowed to
differ by at most one bf16 ulp (the measured worst case); anything more is a bug.
Run: .venv/bin/python -m pytest tests/unit/jobs/test_job_workers.py -q
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from jobkit import store_digest

from msa_memory.jobs import encode_corpus
from msa_memory.store import open_store


def test_one_worker_vs_two_workers_same_content(tmp_path: Path, corpus: Path, tiny_model_dir: Path) -> None:
    kw = dict(model=str(tiny_model_dir), shard_tokens=500, max_passage_tokens=256)
    one = encode_corpus([corpus], tmp_path / "one.msa", workers=1, **kw)
    two = encode_corpus([corpus], tmp_path / "two.msa", workers=2, **kw)
    assert one.shards_written == two.shards_written >= 3
    d1, d2 = store_digest(tmp_path / "one.msa"), store_digest(tmp_path / "two.msa")
    assert d1["docs"] == d2["docs"]
    assert d1["kv"] == d2["kv"]
    s1, s2 = open_store(tmp_path / "one.msa"), open_store(tmp_path / "two.msa")
    for layer in range(s1.identity.n_layers):
        (k1, c1), (k2, c2) = s1.router_keys(layer), s2.router_keys(layer)
        assert np.array_equal(c1, c2)
        ulps = np.abs(k1.astype(np.int32) - k2.astype(np.int32))  # bf16 bit patterns, same sign
        assert ulps.max() <= 1, f"layer {layer}: router keys differ by up to {ulps.max()} bf16 ulps"
