"""Which S3 client the store's S3 backend uses: obstore vs fsspec/s3fs, measured on the same server.

Regime: moto's S3 server on loopback (``msa_memory.testing.s3_server``, a child process), one client
process, CPU only. Loopback moto is a functional stand-in, not S3's latency: a request costs moto's
Python request handling (~1 ms) instead of S3's 10-30 ms first-byte latency, so the figures rank the
clients' own overhead (request building, signing, buffering, the event loop), which is what differs
between them. Measured per client, in the same run, on the same bucket:

1. write MB/s: ``--n-objects`` objects of ``--object-mb`` MB each, one PUT per object (the size of
   a shard's K/V file), sequentially;
2. open time: a new client + HEAD + GET of a 1 KB object (what opening a store costs before it
   reads the manifest): median of 5;
3. range-read p50/p95: 200 reads of 64 KB at random offsets of one 16 MB object (a document's K/V
   is one such range);
4. conditional put: a second ``If-None-Match: *`` PUT of an existing key must fail with 412 and
   leave the object unchanged (obstore ``put(mode="create")``, s3fs ``pipe_file(mode="create")``).

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time

import numpy as np

from msa_memory.testing.s3_server import S3Server


def _obstore(bucket: str, endpoint: str):  # -> dict of callables
    import obstore
    from obstore.exceptions import AlreadyExistsError, PreconditionError
    from obstore.store import S3Store

    def new():
        return S3Store(bucket, config={"endpoint": endpoint, "region": "us-east-1", "access_key_id": "testing",
                                       "secret_access_key": "testing"}, client_options={"allow_http": True})

    st = new()

    def put(key, data):  # one PUT, as s3fs does below its 50 MB block size (the store's exclusive writes too)
        obstore.put(st, key, data, use_multipart=False)

    def open_small(key):
        s = new()
        obstore.head(s, key)
        return bytes(obstore.get(s, key).bytes())

    def get_range(key, off, n):
        return bytes(obstore.get_range(st, key, start=off, length=n))

    def put_create(key, data):
        try:
            obstore.put(st, key, data, mode="create")
            return True
        except (AlreadyExistsError, PreconditionError):
            return False

    return {"put": put, "open": open_small, "range": get_range, "create": put_create,
            "read": lambda k: bytes(obstore.get(st, k).bytes())}


def _s3fs(bucket: str, endpoint: str):
    import s3fs

    def new():
        return s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=endpoint,
                                 client_kwargs={"region_name": "us-east-1"}, skip_instance_cache=True)

    fs = new()

    def put(key, data):
        fs.pipe_file(f"{bucket}/{key}", data)

    def open_small(key):
        f = new()
        f.info(f"{bucket}/{key}")
        return f.cat_file(f"{bucket}/{key}")

    def get_range(key, off, n):
        return fs.cat_file(f"{bucket}/{key}", start=off, end=off + n)

    def put_create(key, data):
        try:
            fs.pipe_file(f"{bucket}/{key}", data, mode="create")
            return True
        except (FileExistsError, OSError):
            return False

    return {"put": put, "open": open_small, "range": get_range, "create": put_create,
            "read": lambda k: fs.cat_file(f"{bucket}/{k}")}


def measure(name: str, ops, n_objects: int, object_mb: float, rng: np.random.Generator) -> dict:
    blob = rng.integers(0, 255, int(object_mb * 2**20), dtype=np.uint8).tobytes()
    ops["put"]("warm", b"x" * 1024)
    t = time.perf_counter()
    for i in range(n_objects):
        ops["put"](f"w/{i}", blob)
    write_s = time.perf_counter() - t
    opens = []
    for _ in range(5):
        t = time.perf_counter()
        ops["open"]("warm")
        opens.append(time.perf_counter() - t)
    big = rng.integers(0, 255, 16 * 2**20, dtype=np.uint8).tobytes()
    ops["put"]("big", big)
    lat = []
    for _ in range(200):
        off = int(rng.integers(0, len(big) - 65536))
        t = time.perf_counter()
        got = ops["range"]("big", off, 65536)
        lat.append(time.perf_counter() - t)
        assert got == big[off:off + 65536]
    first = ops["create"]("cond", b"first")
    second = ops["create"]("cond", b"second")
    cond_ok = first and not second and ops["read"]("cond") == b"first"
    return {"client": name, "write_MBps": round(n_objects * object_mb / write_s, 1),
            "open_ms": round(float(np.median(opens)) * 1e3, 2),
            "range_p50_ms": round(float(np.percentile(lat, 50)) * 1e3, 2),
            "range_p95_ms": round(float(np.percentile(lat, 95)) * 1e3, 2),
            "conditional_put": bool(cond_ok)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-objects", type=int, default=16)
    ap.add_argument("--object-mb", type=float, default=8.0)
    ap.add_argument("--rounds", type=int, default=3, help="rounds per client, interleaved; medians reported")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    rows: dict[str, list[dict]] = {"obstore": [], "s3fs": []}
    with S3Server() as srv:
        for r in range(args.rounds):
            for name, make in (("obstore", _obstore), ("s3fs", _s3fs)):
                bucket = srv.create_bucket()
                rows[name].append(measure(name, make(bucket, srv.endpoint), args.n_objects, args.object_mb, rng))
    out = []
    for name, rs in rows.items():
        med = {k: float(np.median([x[k] for x in rs])) for k in ("write_MBps", "open_ms", "range_p50_ms",
                                                                 "range_p95_ms")}
        out.append({"client": name, **med, "conditional_put": all(x["conditional_put"] for x in rs)})
    print(f"{'client':<8} {'write MB/s':>10} {'open ms':>8} {'range p50 ms':>12} {'range p95 ms':>12}  If-None-Match")
    for o in out:
        print(f"{o['client']:<8} {o['write_MBps']:>10.1f} {o['open_ms']:>8.2f} {o['range_p50_ms']:>12.2f} "
              f"{o['range_p95_ms']:>12.2f}  {o['conditional_put']}")
    import obstore
    import s3fs
    print(json.dumps({"bench": "s3_clients", "machine": platform.processor() or platform.machine(),
                      "cpus": os.cpu_count(), "server": "moto 5.2.5 on loopback (child process)",
                      "versions": {"obstore": obstore.__version__, "s3fs": s3fs.__version__},
                      "config": vars(args), "results": out}))


if __name__ == "__main__":
    asyncio.set_event_loop_policy(None)
    main()
