"""An S3-compatible backend (``s3://BUCKET/PREFIX``) on obstore: object storage without rename, links or locks.

Design note. Keys are objects under ``PREFIX/`` of the bucket. The store's protocol needs only what every
S3-compatible service offers (docs/store-format.md, section 14):

- write-once and the commit point are ``PUT`` with ``If-None-Match: *`` (obstore ``put(mode="create")``):
  of concurrent creators exactly one gets 200, the others 412, and nobody sees a partial object;
- documents are ranged ``GET``s (``get_ranges`` merges nearby ranges into one request), Parquet reads
  go through a buffered file of ranged reads, listings are ``LIST`` with or without a delimiter;
- there is no rename (shards are written in place, ``_record.json`` last), no link and no lock
  (``supports_locks = False``: the conditional publish decides commits, ``reserve_ids`` claims ids by
  conditional puts, see ``_ids.py``).

Why obstore and not s3fs: measured on the same loopback server (``benchmarks/bench_s3_clients.py``,
figures in docs/store-format.md section 14): 15x faster to open a client, lower range-read latency,
no event loop thread of its own; both send ``If-None-Match: *``.

Retries: obstore retries 5xx (503 SlowDown included), 429 and connection errors with exponential
backoff and jitter (``MSA_S3_MAX_RETRIES``, default 10; ``MSA_S3_RETRY_TIMEOUT_S``, default 180 s;
``MSA_S3_INIT_BACKOFF_S``, default 0.1 s). When they are spent the call raises
:class:`StoreUnavailableError` naming the URL, the request and what to do; an absent key is
``FileNotFoundError``, a refused exclusive write ``FileExistsError``. A conditional PUT whose first
attempt succeeded but whose answer was lost comes back 412 on the retry: a refused exclusive write reads
the object back and counts it as its own when the bytes are the ones it sent (callers that might send
equal bytes add a nonce).

Credentials, region and endpoint come from the environment as any AWS client reads them
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION``,
``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``, ``AWS_ALLOW_HTTP=true`` for a plain-http server such as
one on loopback) or from ``options`` (obstore's S3 config keys: ``endpoint``, ``region``...).
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, BinaryIO, ClassVar

from msa_memory.errors import ConfigError, StoreNotWritableError, StoreUnavailableError
from msa_memory.store.backend import Backend, Buffers, KeyInfo, check_key

__all__ = ["S3Backend", "parse_s3_url"]

#: objects above this size go up as a multipart upload (still atomic); smaller ones in one PUT
MULTIPART_BYTES = 256 << 20
_DELETE_BATCH = 1000


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> (bucket, "some/prefix"); ConfigError for anything else."""
    if not url.startswith("s3://"):
        raise ConfigError(f"{url!r} is not an s3:// URL.", hint="Write s3://BUCKET/PREFIX.")
    bucket, _, prefix = url[5:].partition("/")
    prefix = prefix.strip("/")
    if not bucket or any(p in (".", "..") for p in prefix.split("/") if prefix) or "//" in prefix:
        raise ConfigError(f"S3 store URL {url!r} needs a bucket and a clean prefix.",
                          hint="Write s3://BUCKET/PREFIX, e.g. s3://my-bucket/stores/docs.")
    return bucket, prefix


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number.") from None


class S3Backend(Backend):
    """Keys under ``s3://bucket/prefix``; ``root`` is that URL. ``stats`` counts requests and bytes read."""

    supports_atomic_rename = False
    supports_links = False
    supports_locks = False
    shared_across_processes = True
    #: readers may keep a local copy of immutable arrays (router keys) of a store on this medium
    remote: ClassVar[bool] = True

    _cached: ClassVar[dict[tuple[Any, ...], S3Backend]] = {}
    _cached_guard: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, url: str, *, options: dict[str, Any] | None = None, max_retries: int | None = None,
                 retry_timeout_s: float | None = None, init_backoff_s: float | None = None) -> None:
        try:
            from obstore.store import S3Store
        except ImportError:
            raise ConfigError(f"Store {url!r} is on S3, which needs the obstore package.",
                              hint="pip install 'msa-memory[s3]' (or: pip install obstore).") from None
        self.bucket, self.prefix = parse_s3_url(url)
        self.root = f"s3://{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self.max_retries = int(max_retries if max_retries is not None else _env_float("MSA_S3_MAX_RETRIES", 10))
        timeout = retry_timeout_s if retry_timeout_s is not None else _env_float("MSA_S3_RETRY_TIMEOUT_S", 180.0)
        backoff = init_backoff_s if init_backoff_s is not None else _env_float("MSA_S3_INIT_BACKOFF_S", 0.1)
        retry = {"max_retries": self.max_retries, "retry_timeout": timedelta(seconds=timeout),
                 "backoff": {"init_backoff": timedelta(seconds=backoff), "max_backoff": timedelta(seconds=15),
                             "base": 2}}
        self.options: dict[str, Any] = dict(options or {})
        config = dict(self.options)
        client: dict[str, Any] = {}
        endpoint = (config.get("endpoint") or os.environ.get("AWS_ENDPOINT_URL_S3")
                    or os.environ.get("AWS_ENDPOINT_URL"))
        if endpoint:
            config.setdefault("endpoint", endpoint)
            if str(endpoint).startswith("http://") and os.environ.get("AWS_ALLOW_HTTP", "").lower() in (
                    "1", "true", "yes"):
                client["allow_http"] = True
        if "region" not in config and not (os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")):
            config["region"] = "us-east-1"
        elif "region" not in config and os.environ.get("AWS_DEFAULT_REGION") and not os.environ.get("AWS_REGION"):
            config["region"] = os.environ["AWS_DEFAULT_REGION"]
        self._store = S3Store(self.bucket, prefix=self.prefix or None, config=config, client_options=client or None,
                              retry_config=retry)
        self._mutex = threading.Lock()
        self._sizes: dict[str, int] = {}  # sizes learned by stat/write (shard files never change once written)
        self.stats = {"requests": 0, "bytes_read": 0, "bytes_written": 0}

    @classmethod
    def for_url(cls, url: str, options: dict[str, Any] | None = None) -> S3Backend:
        """One backend (one connection pool) per URL, options and endpoint within a process."""
        key = (url.rstrip("/"), tuple(sorted((str(k), str(v)) for k, v in (options or {}).items())),
               os.environ.get("AWS_ENDPOINT_URL_S3"), os.environ.get("AWS_ENDPOINT_URL"),
               os.environ.get("AWS_ACCESS_KEY_ID"), os.getpid())
        with cls._cached_guard:
            be = cls._cached.get(key)
            if be is None:
                be = cls._cached[key] = cls(url, options=options)
            return be

    def __reduce__(self) -> Any:
        # a worker process (a Dask worker of an encode job) reopens the URL with its options and its own
        # connections; credentials not in the options come from that process's AWS_* environment
        return (S3Backend.for_url, (self.root, self.options or None))

    # ---------------------------------------------------------------- errors
    def _count(self, n_read: int = 0, n_written: int = 0) -> None:
        with self._mutex:
            self.stats["requests"] += 1
            self.stats["bytes_read"] += n_read
            self.stats["bytes_written"] += n_written

    def _fail(self, e: BaseException, verb: str, key: str) -> BaseException:
        """Map an obstore error of ``verb`` on ``key`` to the builtin the store catches."""
        from obstore import exceptions as ox

        where = f"{self.root}/{key}" if key else self.root
        if isinstance(e, (ox.NotFoundError, FileNotFoundError)):
            return FileNotFoundError(f"{where} does not exist")
        if isinstance(e, (ox.AlreadyExistsError, ox.PreconditionError, FileExistsError)):
            return FileExistsError(f"{where} exists")
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        if isinstance(e, (ox.PermissionDeniedError, ox.UnauthenticatedError)):
            return StoreNotWritableError(
                f"S3 refused {verb} {where}: {first}.",
                hint="Check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the role) and the bucket policy.")
        return StoreUnavailableError(
            f"S3 request {verb} {where} failed after up to {self.max_retries} retries with exponential backoff: "
            f"{first}.",
            hint="The service is throttling (503 SlowDown / 429) or unreachable: retry later, run fewer workers "
                 "at once, check AWS_ENDPOINT_URL and the network, or raise MSA_S3_MAX_RETRIES / "
                 "MSA_S3_RETRY_TIMEOUT_S. Nothing was published by a call that failed this way.")

    def _call(self, verb: str, key: str, fn: Any, *args: Any, **kw: Any) -> Any:
        try:
            return fn(self._store, *args, **kw)
        except Exception as e:  # noqa: BLE001 - mapped to builtins / StoreUnavailableError
            from obstore import exceptions as ox

            if isinstance(e, ox.BaseError) or isinstance(e, OSError):
                raise self._fail(e, verb, key) from None
            raise

    # ---------------------------------------------------------------- reads
    def read(self, key: str) -> bytes:
        import obstore

        check_key(key)
        data = bytes(self._call("GET", key, lambda s: obstore.get(s, key).bytes()))
        self._count(n_read=len(data))
        return data

    def _size(self, key: str) -> int:
        size = self._sizes.get(key)
        if size is None:
            info = self.stat(key)
            if info is None or info.kind != "file":
                raise FileNotFoundError(f"{self.root}/{key} does not exist")
            size = info.size
        return size

    def read_ranges(self, key: str, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        import obstore

        check_key(key)
        if not ranges:
            self._size(key)  # FileNotFoundError when absent, as the other backends
            return []
        size = self._size(key)
        spans = []
        for off, length in ranges:
            start = max(size + off, 0) if off < 0 else min(off, size)
            spans.append((start, min(start + max(length, 0), size)))
        want = [(s, e) for s, e in spans if e > s]
        got: list[Any] = []
        if want:
            got = self._call("GET", key, obstore.get_ranges, key, starts=[s for s, _ in want],
                             ends=[e for _, e in want])
        it = iter(got)
        out = [bytes(next(it)) if e > s else b"" for s, e in spans]
        self._count(n_read=sum(len(b) for b in out))
        return out

    def open_input(self, key: str) -> BinaryIO:
        check_key(key)
        return io.BufferedReader(_RangeFile(self, key, self._size(key)), buffer_size=1 << 20)  # type: ignore[return-value]

    def stat(self, key: str) -> KeyInfo | None:
        import obstore

        check_key(key)
        try:
            meta = self._call("HEAD", key, obstore.head, key)
        except FileNotFoundError:
            meta = None
        self._count()
        if meta is not None:
            self._sizes[key] = int(meta["size"])
            return KeyInfo(key, "file", int(meta["size"]), meta["last_modified"].timestamp())
        newest = None
        for batch in self._call("LIST", key, obstore.list, key + "/", chunk_size=1000):
            self._count()
            for m in batch:
                t = m["last_modified"].timestamp()
                newest = t if newest is None else max(newest, t)
        return KeyInfo(key, "folder", 0, newest) if newest is not None else None

    def probe(self, key: str) -> bool:
        import obstore

        check_key(key)
        try:
            meta = self._call("HEAD", key, obstore.head, key)
        except FileNotFoundError:
            return False
        finally:
            self._count()
        self._sizes[key] = int(meta["size"])
        return True

    def list(self, prefix: str = "") -> list[str]:
        import obstore

        check_key(prefix, allow_root=True)
        res = self._call("LIST", prefix, obstore.list_with_delimiter, prefix or None)
        self._count()
        start = f"{prefix}/" if prefix else ""
        names = {p.rstrip("/")[len(start):] for p in res["common_prefixes"]}
        names |= {m["path"][len(start):] for m in res["objects"]}
        return sorted(n for n in names if n)

    def walk(self, prefix: str) -> list[KeyInfo]:
        import obstore

        start = check_key(prefix) + "/"
        out: dict[str, KeyInfo] = {}
        for batch in self._call("LIST", prefix, obstore.list, start, chunk_size=1000):
            self._count()
            for m in batch:
                k, mtime = m["path"], m["last_modified"].timestamp()
                out[k] = KeyInfo(k, "file", int(m["size"]), mtime)
                parts = k[len(start):].split("/")[:-1]
                for i in range(len(parts)):  # the prefixes between, as folders
                    sub = start + "/".join(parts[:i + 1])
                    prev = out.get(sub)
                    if prev is None or prev.mtime < mtime:
                        out[sub] = KeyInfo(sub, "folder", 0, mtime)
        return sorted(out.values(), key=lambda i: i.key)

    # ---------------------------------------------------------------- writes
    def write(self, key: str, data: Buffers, *, exclusive: bool = False, durable: bool = True) -> None:
        import obstore

        check_key(key)
        blob = bytes(data) if isinstance(data, (bytes, bytearray, memoryview)) else b"".join(bytes(b) for b in data)
        self._sizes.pop(key, None)
        if exclusive:
            try:
                self._call("PUT", key, obstore.put, key, blob, mode="create")
            except FileExistsError:
                self._count()
                try:  # a retried PUT whose first attempt landed: the object holds exactly our bytes
                    if self.read(key) == blob:
                        self._sizes[key] = len(blob)
                        return
                except FileNotFoundError:
                    pass
                raise FileExistsError(f"{self.root}/{key} exists") from None
        else:
            self._call("PUT", key, obstore.put, key, blob, use_multipart=len(blob) > MULTIPART_BYTES)
        self._count(n_written=len(blob))
        self._sizes[key] = len(blob)

    def delete(self, key: str) -> None:
        import obstore

        check_key(key)
        self._sizes.pop(key, None)
        try:
            self._call("DELETE", key, obstore.delete, key)
        except FileNotFoundError:
            pass
        self._count()

    def delete_prefix(self, prefix: str) -> None:
        import obstore

        check_key(prefix)
        keys = [i.key for i in self.walk(prefix) if i.kind == "file"] + [prefix]  # absent keys delete fine
        for i in range(0, len(keys), _DELETE_BATCH):
            batch = keys[i:i + _DELETE_BATCH]
            for k in batch:
                self._sizes.pop(k, None)
            try:
                self._call("DELETE", prefix, obstore.delete, batch)
            except FileNotFoundError:
                pass
            self._count()


class _RangeFile(io.RawIOBase):
    """A read-only, seekable file over one object: each ``readinto`` is a ranged GET (wrapped in a
    BufferedReader by ``open_input``, so Parquet's small footer reads cost one request each)."""

    def __init__(self, be: S3Backend, key: str, size: int) -> None:
        self.be, self.key, self.size, self.pos = be, key, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(base + offset, 0)
        return self.pos

    def readinto(self, buf: Any) -> int:
        n = min(len(buf), self.size - self.pos)
        if n <= 0:
            return 0
        data = self.be.read_ranges(self.key, [(self.pos, n)])[0]
        buf[:len(data)] = data
        self.pos += len(data)
        return len(data)
