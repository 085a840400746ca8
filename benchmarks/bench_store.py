"""Store benchmark: write throughput, open time vs store size, K̄V̄ fetch latency, commit latency.

Regime: local disk, warm page cache (no cache drop unless MSA_BENCH_DROP_CACHES=1 and root), one
process, CPU only. Every figure has its baseline measured in the same run:

1. write MB/s of ``write_shard`` (Zarr v3 sharded arrays + crc32c + Parquet + record, fsynced)
   vs numpy writing the same tensor bytes to one flat file (also fsynced). Ceiling: the disk.
2. open time of stores of 10k / 100k / 1M chunks (``open_store`` = identity + one manifest), and
   separately the time to read all router keys of one layer (which must grow with the store).
   Built with head_dim 16 by default to keep the 1M-chunk store under 1 GB (--open-full-shape
   for the Gemma shape); opening reads no tensor so the shape does not matter to it.
3. p50/p95 latency to fetch the content K̄V̄ of 16 random documents via ``store.load_kv`` vs
   slicing the same bytes out of one flat ``.npy`` memory map (np.load(mmap_mode="r")).
4. commit latency of adding one document (``commit``; ``write_shard`` of the doc reported apart)
   to stores of 1k and 100k documents (1k-doc shards); the target is a ratio within 2x.

5. object store: the same three figures (write MB/s of ``write_shard``, ``open_store`` time, p50/p95
   ``load_kv`` of 16 random documents) for a store on S3 (``s3://``, the obstore backend) against a
   local folder in the same run. The S3 server is moto on loopback (``msa_memory.testing.s3_server``,
   a child process): a functional stand-in, not S3's latency. A request costs ~1 ms of moto's Python
   handling instead of S3's 10-30 ms to first byte, and bandwidth is loopback's, so these rows show the
   backend's own overhead (requests per operation, buffering), not what a bucket in a region gives.
   moto also reads and copies the whole object for every ranged GET, so its fetch latency grows with
   the shard file's size (44 MB here), which S3's does not. A 16-document fetch is ~10 HTTP requests
   (obstore's ``get_ranges`` merges neighbouring ranges and runs up to 10 at once); an open is 5
   (identity, hint, HEAD of the version and of the next, manifest).
   Skipped (with the reason) when moto[server] or obstore is not installed; ``--no-object-store`` too.

Shapes default to Gemma-3-270M: 9 router layers x 1 kv head x 256, bf16, 64-token chunks.
Prints a table, then one JSON line. ``--quick`` shrinks everything for a smoke run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from msa_memory.store import create_store, open_store, write_shard
from msa_memory.testing.store_kit import gemma_like_identity, random_docs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import git_commit  # noqa: E402


def _fsync_write(path: Path, arrays: list[np.ndarray]) -> None:
    with open(path, "wb") as f:
        for a in arrays:
            f.write(memoryview(np.ascontiguousarray(a)).cast("B"))
        f.flush()
        os.fsync(f.fileno())


def _median(xs: list[float]) -> float:
    return float(np.median(np.asarray(xs)))


def _zarr_write(path: Path, kv: np.ndarray, k_router: np.ndarray) -> None:
    """The same two arrays, same codecs and inner chunks, written by zarr-python itself."""
    import zarr
    from zarr.codecs import BytesCodec, Crc32cCodec

    g = zarr.open_group(path, mode="w", zarr_format=3)
    for name, a, chunk in (("kv", kv, (1, *kv.shape[1:])), ("k_router", k_router, (1, *k_router.shape[1:]))):
        arr = g.create_array(name, shape=a.shape, dtype=a.dtype, chunks=chunk, shards=a.shape,
                             serializer=BytesCodec(), compressors=[Crc32cCodec()], filters=None, fill_value=0)
        arr[...] = a


def bench_write(work: Path, n_docs: int, chunks_per_doc: int, rounds: int) -> dict:
    identity = gemma_like_identity()
    rng = np.random.default_rng(0)
    ours, base, zarr_t = [], [], []
    nbytes = 0
    for r in range(rounds):
        store = create_store(work / f"w{r}", identity)
        ids = store.reserve_ids(n_docs)
        passages, enc = random_docs(identity, ids, [chunks_per_doc * 64] * n_docs, rng)
        nbytes = enc.kv.nbytes + enc.k_router.nbytes
        t = time.perf_counter()
        write_shard(store.root, "s", passages, enc)
        t_ours = time.perf_counter() - t
        t = time.perf_counter()
        _fsync_write(work / f"flat{r}.bin", [enc.kv, enc.k_router])
        t_base = time.perf_counter() - t
        if r or rounds == 1:  # round 0 is a warm-up (imports, page cache) unless it is the only one
            ours.append(t_ours)
            base.append(t_base)
        if r == 0:  # zarr-python is slow: one round is enough to place it
            t = time.perf_counter()
            _zarr_write(work / "zarr_py", enc.kv, enc.k_router)
            zarr_t.append(time.perf_counter() - t)
            shutil.rmtree(work / "zarr_py")
        shutil.rmtree(work / f"w{r}")
        os.unlink(work / f"flat{r}.bin")
    mb = nbytes / 1e6
    return {"tensor_mb": round(mb, 1), "store_mb_s": round(mb / _median(ours), 1),
            "numpy_flat_mb_s": round(mb / _median(base), 1), "zarr_python_mb_s": round(mb / zarr_t[0], 1),
            "ratio": round(_median(base) / _median(ours), 3)}


def _build(root: Path, identity, n_docs: int, chunks_per_doc: int, docs_per_shard: int) -> object:
    store = create_store(root, identity)
    rng = np.random.default_rng(1)
    ids = store.reserve_ids(n_docs)
    recs = []
    for k, start in enumerate(range(0, n_docs, docs_per_shard)):
        part = ids[start:start + docs_per_shard]
        passages, enc = random_docs(identity, part, [chunks_per_doc * 64] * part.size, rng)
        recs.append(write_shard(root, f"s{k:05d}", passages, enc))
    return store.commit(add=recs, message="build")


def bench_open(work: Path, sizes: list[int], full_shape: bool, chunks_per_shard: int, rounds: int) -> list[dict]:
    identity = gemma_like_identity()
    if not full_shape:
        identity = dataclasses.replace(identity, head_dim=16)
    out = []
    for n_chunks in sizes:
        root = work / f"open{n_chunks}"
        chunks_per_doc = 8
        n_docs = n_chunks // chunks_per_doc
        _build(root, identity, n_docs, chunks_per_doc, max(1, chunks_per_shard // chunks_per_doc))
        opens, keys = [], []
        for _ in range(rounds + 1):
            t = time.perf_counter()
            s = open_store(root)
            opens.append(time.perf_counter() - t)
            t = time.perf_counter()
            k, _ = s.router_keys(0)
            keys.append(time.perf_counter() - t)
        assert k.shape[0] == n_chunks
        out.append({"chunks": n_chunks, "shards": s.stats()["n_shards"], "open_ms": round(1e3 * _median(opens[1:]), 2),
                    "router_keys_ms": round(1e3 * _median(keys[1:]), 2)})
        shutil.rmtree(root)
    return out


def bench_fetch(work: Path, n_docs: int, chunks_per_doc: int, trials: int) -> dict:
    identity = gemma_like_identity()
    store = _build(work / "fetch", identity, n_docs, chunks_per_doc, n_docs)
    rng = np.random.default_rng(2)
    kv_all = np.concatenate(store.load_kv(np.arange(n_docs)))  # (C, L, 2, H, D)
    np.save(work / "flat.npy", kv_all)
    mm = np.load(work / "flat.npy", mmap_mode="r")
    offs = np.arange(n_docs + 1) * chunks_per_doc
    ours, base = [], []
    for t_i in range(trials + 5):
        ids = rng.choice(n_docs, size=16, replace=False)
        t = time.perf_counter()
        got = store.load_kv(ids)
        d1 = time.perf_counter() - t
        t = time.perf_counter()
        ref = [np.array(mm[offs[i]:offs[i + 1]]) for i in ids]
        d2 = time.perf_counter() - t
        if t_i >= 5:  # warm-up excluded
            ours.append(d1)
            base.append(d2)
        assert all(a.tobytes() == b.tobytes() for a, b in zip(got, ref))
    mb = sum(a.nbytes for a in got) / 1e6
    q = lambda xs, p: round(1e3 * float(np.percentile(xs, p)), 3)  # noqa: E731
    return {"docs": n_docs, "mb_per_fetch": round(mb, 2), "store_p50_ms": q(ours, 50), "store_p95_ms": q(ours, 95),
            "mmap_p50_ms": q(base, 50), "mmap_p95_ms": q(base, 95),
            "ratio_p50": round(float(np.percentile(ours, 50) / np.percentile(base, 50)), 2)}


def bench_commit(work: Path, sizes: list[int], rounds: int) -> list[dict]:
    identity = dataclasses.replace(gemma_like_identity(), head_dim=16)
    out = []
    rng = np.random.default_rng(3)
    for n_docs in sizes:
        root = work / f"commit{n_docs}"
        store = _build(root, identity, n_docs, 1, 1000)
        commits, writes = [], []
        for r in range(rounds + 1):
            ids = store.reserve_ids(1)
            passages, enc = random_docs(identity, ids, [64], rng)
            t = time.perf_counter()
            rec = write_shard(root, f"one{r}", passages, enc)
            t1 = time.perf_counter()
            store = store.commit(add=[rec], message="one doc")
            t2 = time.perf_counter()
            if r:
                writes.append(t1 - t)
                commits.append(t2 - t1)
        out.append({"docs": n_docs, "shards": store.stats()["n_shards"], "commit_ms": round(1e3 * _median(commits), 2),
                    "write_shard_ms": round(1e3 * _median(writes), 2)})
        shutil.rmtree(root)
    return out


def bench_object_store(work: Path, n_docs: int, chunks_per_doc: int, rounds: int, trials: int) -> dict:
    """Section 5: local folder vs s3:// on moto (loopback), same shapes, same documents, same fetch order."""
    try:
        import moto  # noqa: F401
        import obstore  # noqa: F401

        from msa_memory.testing.s3_server import S3Server
    except ImportError as e:
        return {"skipped": f"needs moto[server] and obstore (pip install 'msa-memory[test]'): {e}"}
    identity = gemma_like_identity()
    out: dict = {"docs": n_docs, "server": "moto on loopback (functional stand-in, not S3 latency)"}
    with S3Server() as srv, srv.environment():
        for kind in ("local", "s3"):
            rng = np.random.default_rng(5)
            writes, nbytes, root, rec, store = [], 0, "", None, None
            for r in range(rounds + 1):  # round 0: warm-up
                root = str(work / f"obj-{kind}-{r}") if kind == "local" else f"s3://{srv.create_bucket()}/store"
                store = create_store(root, identity)
                ids = store.reserve_ids(n_docs)
                passages, enc = random_docs(identity, ids, [chunks_per_doc * 64] * n_docs, rng)
                nbytes = enc.kv.nbytes + enc.k_router.nbytes
                t = time.perf_counter()
                rec = write_shard(root, "s", passages, enc)
                if r:
                    writes.append(time.perf_counter() - t)
            store = store.commit(add=[rec], message="bench")
            opens = []
            for r in range(rounds + 5):
                t = time.perf_counter()
                s = open_store(root)
                if r >= 2:
                    opens.append(time.perf_counter() - t)
            pick = np.random.default_rng(6)
            fetches = []
            for t_i in range(trials + 3):
                ids16 = pick.choice(n_docs, size=16, replace=False) + int(s.documents(["doc_id"]).column(
                    "doc_id")[0].as_py())
                t = time.perf_counter()
                s.load_kv(ids16)
                if t_i >= 3:
                    fetches.append(time.perf_counter() - t)
            q = lambda xs, p: round(1e3 * float(np.percentile(xs, p)), 2)  # noqa: E731
            out[kind] = {"write_mb_s": round(nbytes / 1e6 / _median(writes), 1),
                         "open_ms": round(1e3 * _median(opens), 2),
                         "fetch16_p50_ms": q(fetches, 50), "fetch16_p95_ms": q(fetches, 95)}
            if kind == "s3":
                before = dict(s.backend.stats)
                s.load_kv(pick.choice(n_docs, size=16, replace=False) + int(s.documents(["doc_id"]).column(
                    "doc_id")[0].as_py()))
                out[kind]["mb_read_per_fetch16"] = round((s.backend.stats["bytes_read"] - before["bytes_read"])
                                                         / 1e6, 2)
        out["tensor_mb"] = round(nbytes / 1e6, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes for a smoke run (~10 s)")
    ap.add_argument("--open-full-shape", action="store_true", help="build open-time stores with head_dim 256")
    ap.add_argument("--workdir", default=None, help="where to build stores (default: a temp dir)")
    ap.add_argument("--no-object-store", action="store_true", help="leave out section 5 (s3:// on moto, loopback)")
    ap.add_argument("--only-object-store", action="store_true", help="run section 5 alone")
    args = ap.parse_args()
    q = args.quick
    work = Path(tempfile.mkdtemp(prefix="bench_store_", dir=args.workdir))
    try:
        if os.environ.get("MSA_BENCH_DROP_CACHES") == "1":
            subprocess.run(["sh", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches"], check=False)
        objstore = ({"skipped": "--no-object-store"} if args.no_object_store else
                    bench_object_store(work, 100 if q else 400, 8, 2 if q else 3, 20 if q else 60))
        if args.only_object_store:
            _print_object_store(objstore)
            print(json.dumps({"bench": "store", "quick": q, "device": platform.machine(), "cpus": os.cpu_count(),
                              "object_store": objstore}))
            return
        write = bench_write(work, 100 if q else 1000, 8, 3 if q else 4)
        opens = bench_open(work, [10_000, 100_000] if q else [10_000, 100_000, 1_000_000], args.open_full_shape,
                           10_000, 10 if q else 20)
        fetch = bench_fetch(work, 200 if q else 2000, 8, 50 if q else 300)
        commit = bench_commit(work, [1000, 10_000] if q else [1000, 100_000], 3 if q else 5)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nmsa-memory store benchmark ({'quick' if q else 'full'}), L=9 H=1 D=256 bf16, P=64; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus")
    print(f"\n1. write {write['tensor_mb']} MB of K̄V̄ + router keys (fsynced)")
    print(f"   {'write_shard':<22}{write['store_mb_s']:>10.1f} MB/s")
    print(f"   {'numpy flat file':<22}{write['numpy_flat_mb_s']:>10.1f} MB/s   (store/numpy = {write['ratio']:.2f})")
    print(f"   {'zarr-python, same layout':<22}{write['zarr_python_mb_s']:>8.1f} MB/s   (what write_shard avoids)")
    print("\n2. open time (identity + manifest) vs store size; router keys of one layer apart")
    print(f"   {'chunks':>10}{'shards':>8}{'open ms':>10}{'router_keys ms':>16}")
    for o in opens:
        print(f"   {o['chunks']:>10}{o['shards']:>8}{o['open_ms']:>10.2f}{o['router_keys_ms']:>16.2f}")
    print(f"\n3. fetch K̄V̄ of 16 random docs ({fetch['mb_per_fetch']} MB) from {fetch['docs']} docs")
    print(f"   {'':<22}{'p50 ms':>10}{'p95 ms':>10}")
    print(f"   {'store.load_kv':<22}{fetch['store_p50_ms']:>10.3f}{fetch['store_p95_ms']:>10.3f}")
    print(f"   {'np.load mmap slices':<22}{fetch['mmap_p50_ms']:>10.3f}{fetch['mmap_p95_ms']:>10.3f}")
    print("\n4. commit latency of adding one document")
    print(f"   {'docs':>10}{'shards':>8}{'commit ms':>12}{'write_shard ms':>16}")
    for c in commit:
        print(f"   {c['docs']:>10}{c['shards']:>8}{c['commit_ms']:>12.2f}{c['write_shard_ms']:>16.2f}")
    ratio = commit[-1]["commit_ms"] / commit[0]["commit_ms"]
    print(f"   large/small commit latency = {ratio:.2f} (target <= 2)")
    _print_object_store(objstore)
    commit_id = git_commit()
    print(json.dumps({"bench": "store", "quick": q, "commit": commit_id, "device": platform.machine(),
                      "cpus": os.cpu_count(), "python": sys.version.split()[0], "write": write, "open": opens,
                      "fetch16": fetch, "commit_latency": commit, "commit_ratio": round(ratio, 2),
                      "object_store": objstore}))


def _print_object_store(o: dict) -> None:
    if "skipped" in o:
        print(f"\n5. object store: skipped ({o['skipped']})")
        return
    print(f"\n5. object store vs local folder, {o['docs']} docs ({o['tensor_mb']} MB); S3 = {o['server']}")
    print(f"   {'':<14}{'write MB/s':>12}{'open ms':>10}{'fetch16 p50 ms':>16}{'fetch16 p95 ms':>16}")
    for kind in ("local", "s3"):
        r = o[kind]
        print(f"   {kind:<14}{r['write_mb_s']:>12.1f}{r['open_ms']:>10.2f}{r['fetch16_p50_ms']:>16.2f}"
              f"{r['fetch16_p95_ms']:>16.2f}")
    print(f"   MB read from s3 per 16-doc fetch: {o['s3']['mb_read_per_fetch16']} (the documents' K̄V̄, nothing more)")


if __name__ == "__main__":
    main()
