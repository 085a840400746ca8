"""An S3-compatible server on loopback for tests and benchmarks: moto's server mode in a child process,
and a tiny fault-injecting HTTP proxy in front of it.

Design note. Tests of the S3 backend talk HTTP to a real server, never to mocks inside the client:
``S3Server`` starts ``python -m msa_memory.testing.s3_server`` (moto's ``ThreadedMotoServer`` on
127.0.0.1, a free port), waits for its ``PORT n`` line, and creates buckets on demand. A child process
keeps moto's Python work off the caller's GIL, so a benchmark measures the client, and writer processes
the tests kill never take the server with them.

moto 5.2.5 honours ``If-None-Match: *`` on PutObject (412 PreconditionFailed on an existing key), but
checks for the key and stores the object without a lock between the two steps; two conditional PUTs
landing together could both succeed, which S3 itself never allows. The child serialises conditional
PUTs (one lock around ``put_object`` when the header is set), so a test measures the store's
protocol, not moto's race. Unconditional PUTs run in parallel as before.

``FaultProxy`` forwards every request to the server and answers the first ``fail_next`` of them with
``status`` (503 SlowDown by default, or 429) without forwarding: throttling as S3 sends it.

This module needs ``moto[server]`` (the ``test`` extra); importing it without moto works, starting a
server does not.
"""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["S3Server", "FaultProxy", "s3_env"]

ACCESS_KEY = "testing"
SECRET_KEY = "testing"
REGION = "us-east-1"


def s3_env(endpoint: str) -> dict[str, str]:
    """The environment variables that point an S3 client at ``endpoint`` (loopback http) with test keys."""
    return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": REGION,
            "AWS_DEFAULT_REGION": REGION, "AWS_ENDPOINT_URL": endpoint, "AWS_ALLOW_HTTP": "true"}


class S3Server:
    """moto in a child process on 127.0.0.1; ``endpoint`` is ``http://127.0.0.1:PORT``."""

    def __init__(self, timeout_s: float = 60.0) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "msa_memory.testing.s3_server"],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        deadline = time.monotonic() + timeout_s
        line = ""
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline() if self.proc.stdout else ""
            if line.startswith("PORT ") or not line:
                break
        if not line.startswith("PORT "):
            self.stop()
            raise RuntimeError("the moto S3 server did not start (is moto[server] installed? pip install "
                               "'msa-memory[test]')")
        self.port = int(line.split()[1])
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return s3_env(self.endpoint)

    @contextmanager
    def environment(self) -> Iterator[S3Server]:
        """The AWS_* variables of :meth:`env` set in ``os.environ`` meanwhile (clients and child processes
        reach this server), restored as they were on exit."""
        env = self.env()
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            yield self
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def create_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh random name by default); returns its name."""
        name = name or f"msa-{uuid.uuid4().hex[:12]}"
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        conn.request("PUT", f"/{name}")
        resp = conn.getresponse()
        resp.read()
        conn.close()
        if resp.status not in (200, 409):
            raise RuntimeError(f"creating bucket {name!r} on {self.endpoint} failed: HTTP {resp.status}")
        return name

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> S3Server:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class _ProxyHandler(BaseHTTPRequestHandler):
    """One request to a :class:`FaultProxy`: counted, then failed (an S3 throttling answer) or forwarded."""

    protocol_version = "HTTP/1.1"
    proxy: FaultProxy   # set on the per-proxy subclass

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def _handle(self) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else b""
        if self.proxy._arrived():
            self._send_fault()
        else:
            self._forward(body)

    def _send_fault(self) -> None:
        """The S3 error a throttled request gets (503 SlowDown or 429 TooManyRequests)."""
        status = self.proxy.status
        code = "SlowDown" if status == 503 else "TooManyRequests"
        msg = (f"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code>"
               "<Message>Please reduce your request rate.</Message></Error>").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(msg)))
        self.end_headers()
        self.wfile.write(msg)

    def _forward(self, body: bytes) -> None:
        """The request sent on to the target, its answer copied back."""
        conn = http.client.HTTPConnection("127.0.0.1", self.proxy.target_port, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection",)}
        conn.request(self.command, self.path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                self.send_header(k, v)
        # a HEAD answer has no body but the object's length
        self.send_header("Content-Length", resp.getheader("Content-Length", "0") if self.command == "HEAD"
                         else str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        conn.close()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle


class FaultProxy:
    """A loopback HTTP proxy to ``target_port`` that fails the next ``fail_next`` requests with ``status``."""

    def __init__(self, target_port: int, status: int = 503) -> None:
        self.target_port = target_port
        self.status = status
        self.fail_next = 0
        self.n_requests = 0
        self.n_failed = 0
        self.times: list[float] = []  # arrival time of each request (monotonic), to see the backoff
        self._mutex = threading.Lock()
        handler = type("Handler", (_ProxyHandler,), {"proxy": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _arrived(self) -> bool:
        """Count one request; True when it is to fail."""
        with self._mutex:
            self.n_requests += 1
            self.times.append(time.monotonic())
            fail = self.fail_next > 0
            if fail:
                self.fail_next -= 1
                self.n_failed += 1
        return fail

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _serve() -> None:
    """Child process: moto's threaded server on a free loopback port, conditional PUTs serialised."""
    from moto.moto_server.threaded_moto_server import ThreadedMotoServer
    from moto.s3.responses import S3Response

    put_object = S3Response.put_object
    guard = threading.Lock()

    def put_object_serialised(self: Any) -> Any:
        if self.headers.get("If-None-Match") or self.headers.get("If-Match"):
            with guard:
                return put_object(self)
        return put_object(self)

    S3Response.put_object = put_object_serialised  # type: ignore[method-assign]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    print(f"PORT {port}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    os.environ.setdefault("MOTO_ALLOW_NONEXISTENT_REGION", "true")
    _serve()
