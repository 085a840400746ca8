"""Same job on one worker vs two worker processes: the same committed content.

One in-process worker runs torch on every core; two worker processes run one torch thread each.
Documents, ids, texts, content K̄/V̄ and router keys must be bit-identical (router keys are
computed with an fp64 GEMM so the BLAS blocking of a worker layout cannot change them).
Run: .venv/bin/python -m pytest tests/unit/jobs/test_job_workers.py -q
"""

from __future__ import annotations

from pathlib import Path

from jobkit import assert_same_content

from msa_memory.jobs import encode_corpus


def test_one_worker_vs_two_workers_same_content(tmp_path: Path, corpus: Path, tiny_model_dir: Path) -> None:
    kw = dict(model=str(tiny_model_dir), shard_tokens=500, max_passage_tokens=256, torch_threads=1)
    one = encode_corpus([corpus], tmp_path / "one.msa", workers=1, **kw)
    two = encode_corpus([corpus], tmp_path / "two.msa", workers=2, **kw)
    assert one.shards_written == two.shards_written >= 3
    assert_same_content(tmp_path / "one.msa", tmp_path / "two.msa", router_ulps=0)
