"""Two identical `msa-encode` commands at the same moment, as two real processes on one store.

What a user gets: exactly one of them commits the change. The other either exits with code 5
(VersionConflictError, as any other conflict: "another writer committed first; rerun", and the
rerun finds no changes) or, when it planned after the first had committed, exits 0 with "no
changes". Never exit code 1, never zero commits, never two commits; the store verifies after
each race and holds every file once.
Run: .venv/bin/python -m pytest tests/cli/test_concurrent_encode.py -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from jobkit import make_corpus

from msa_memory.store import open_store

BIN = Path(sys.executable).parent


def _race(corpus: Path, store: Path, model: Path) -> list[tuple[int, dict, str]]:
    """Start the same msa-encode twice at once; (rc, last JSON line, stderr) of each."""
    env = {**os.environ, "MSA_DISABLE_PROGRESS_BARS": "1"}
    cmd = [str(BIN / "msa-encode"), str(corpus), "--store", str(store), "--model", str(model),
           "--shard-tokens", "1000", "--torch-threads", "1", "--json"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        out.append((p.returncode, json.loads(stdout.strip().splitlines()[-1]), stderr))
    return out


def _check_one_winner(runs: list[tuple[int, dict, str]], before: int) -> None:
    rcs = sorted(rc for rc, _, _ in runs)
    detail = "\n".join(f"rc={rc} {res}\n{err[-1500:]}" for rc, res, err in runs)
    assert rcs in ([0, 5], [0, 0]), detail
    assert all("Traceback" not in err for _, _, err in runs), detail
    winners = [res for rc, res, _ in runs if rc == 0 and res["committed"]]
    assert len(winners) == 1 and winners[0]["version"] == before + 1, detail
    for rc, res, err in runs:
        if rc == 5:
            assert res["type"] == "VersionConflictError" and res["exit_code"] == 5, detail
            errors = [line for line in err.splitlines() if line.startswith("error: ")]
            assert len(errors) == 1 and "rerun" in errors[0].lower(), detail
        elif not res["committed"]:
            assert res["read_version"] == before + 1 and "no changes" in res["message"], detail


def test_two_identical_encodes_at_once_commit_exactly_once(tmp_path: Path, tiny_model_dir: Path) -> None:
    corpus = make_corpus(tmp_path / "notes", 12, words=(100, 200))
    store = tmp_path / "m.msa"
    n_files = 12
    for round_ in range(2):  # a race that creates the store, then one that adds to it
        if round_:  # new files for the next race on the now existing store
            n_files += 6
            make_corpus(tmp_path / "more", 6, seed=round_, words=(100, 200))
            for f in sorted((tmp_path / "more").rglob("*.md")):
                dst = corpus / f"round{round_}" / f.relative_to(tmp_path / "more")
                dst.parent.mkdir(parents=True, exist_ok=True)
                f.rename(dst)
        before = open_store(store).latest_version() if store.exists() else 0
        runs = _race(corpus, store, tiny_model_dir)
        print(f"race {round_}: exit codes {[rc for rc, _, _ in runs]}")
        _check_one_winner(runs, before)
        s = open_store(store)
        assert s.latest_version() == before + 1
        assert s.verify()["ok"]
        rows = s.documents(columns=["source_path", "passage_index"]).to_pylist()
        keys = {(r["source_path"], r["passage_index"]) for r in rows}
        assert len({r["source_path"] for r in rows}) == n_files and len(keys) == len(rows)  # every passage once
