"""Same job on one worker vs two worker processes: the same committed content (ids, texts, tensors).

Run: .venv/bin/python -m pytest tests/unit/jobs/test_job_workers.py -q
"""

from __future__ import annotations

from pathlib import Path

from jobkit import store_digest

from msa_memory.jobs import encode_corpus


def test_one_worker_vs_two_workers_same_content(tmp_path: Path, corpus: Path, tiny_model_dir: Path) -> None:
    kw = dict(model=str(tiny_model_dir), shard_tokens=500, max_passage_tokens=256)
    one = encode_corpus([corpus], tmp_path / "one.msa", workers=1, **kw)
    two = encode_corpus([corpus], tmp_path / "two.msa", workers=2, **kw)
    assert one.shards_written == two.shards_written >= 3
    d1, d2 = store_digest(tmp_path / "one.msa"), store_digest(tmp_path / "two.msa")
    assert d1["docs"] == d2["docs"]
    assert d1["kv"] == d2["kv"] and d1["router"] == d2["router"]
