"""The backend contract: every storage backend of the store passes this one suite (zarr's StoreTests idea).

``TestBackendContract`` is parametrised over the backends: the local folder (publish by hard link), the
local folder with links off (publish by O_EXCL create, as on file systems without hard links) and the
in-process memory backend (object-storage semantics: no rename, no links) and the S3 backend against
moto's S3 server on loopback (started by the ``s3_server`` fixture in tests/conftest.py; skipped with
the reason when moto[server] or obstore is not installed). A new backend adds one entry to ``BACKENDS``. Oracles: write-once refuses an existing key and leaves it intact; of
concurrent publishers of one key exactly one wins and the key holds its bytes (real processes where
the backend is shared across processes, threads otherwise); ranged reads equal slices of the whole;
listing names direct children only; delete is idempotent; errors are the builtins the store catches.
Then the store itself runs on each backend (create, write_shard, commit, compact, gc, verify).
Run: .venv/bin/python -m pytest tests/unit/store/test_store_backends.py -q
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from msa_memory.errors import StoreLayoutError
from msa_memory.store._local import LocalBackend
from msa_memory.store._memory import MemoryBackend
from msa_memory.store.backend import Backend

BACKENDS = ["local", "local-nolink", "memory", "s3"]

_PUBLISH_CHILD = """
import os, sys, time
from msa_memory.store._layout import open_backend
from msa_memory.store._local import LocalBackend
root, key, go, me, links = sys.argv[1:6]
be = open_backend(root) if root.startswith("s3://") else LocalBackend(root, use_links=links == "1")
while not os.path.exists(go):
    time.sleep(0.001)
print("WON" if be.publish(key, me.encode() * 1000) else "LOST", flush=True)
"""

_LOCK_CHILD = """
import sys, time
from pathlib import Path
from msa_memory.store._local import LocalBackend
be = LocalBackend(sys.argv[1])
with be.lock("_writer.lock", 10):
    Path(sys.argv[2]).touch()
    time.sleep(float(sys.argv[3]))
"""


def _make(kind: str, tmp_path: Path, request: pytest.FixtureRequest | None = None) -> Backend:
    if kind == "s3":
        from msa_memory.store._s3 import S3Backend

        assert request is not None
        return S3Backend(request.getfixturevalue("s3_url"))
    if kind == "memory":
        return MemoryBackend(f"memory://contract-{uuid.uuid4().hex}")
    return LocalBackend(tmp_path / "store", use_links=kind == "local")


@pytest.fixture(params=BACKENDS)
def be(request, tmp_path) -> Backend:
    return _make(request.param, tmp_path, request)


class TestBackendContract:
    def test_write_read_whole_and_in_pieces(self, be):
        be.write("a/b/c.bin", b"hello world")
        be.write("a/parts.bin", [b"ab", memoryview(b"cd"), np.arange(3, dtype=np.uint8)])
        assert be.read("a/b/c.bin") == b"hello world"
        assert be.read("a/parts.bin") == b"abcd\x00\x01\x02"
        with be.open_input("a/b/c.bin") as f:
            f.seek(6)
            assert f.read(5) == b"world"

    def test_missing_key_raises_file_not_found(self, be):
        for call in (lambda: be.read("nope"), lambda: be.read_ranges("x/nope", [(0, 1)]),
                     lambda: be.open_input("nope")):
            with pytest.raises(FileNotFoundError):
                call()
        assert be.stat("nope") is None and not be.exists("nope") and be.list("nope") == []

    def test_write_once_refuses_an_existing_key(self, be):
        be.write("k", b"first", exclusive=True)
        with pytest.raises(FileExistsError):
            be.write("k", b"second", exclusive=True)
        assert be.read("k") == b"first"
        be.write("k", b"third")  # a plain write overwrites
        assert be.read("k") == b"third"

    def test_replace_is_whole(self, be):
        be.replace("h.json", b"1" * 100)
        be.replace("h.json", b"2")
        assert be.read("h.json") == b"2"

    def test_publish_creates_only_if_absent(self, be):
        assert be.publish("versions/00000001.json", b"{}") is True
        assert be.publish("versions/00000001.json", b"[]") is False
        assert be.read("versions/00000001.json") == b"{}"

    def test_concurrent_publishers_exactly_one_wins(self, be, tmp_path):
        n, key = 6, "versions/00000007.json"
        if be.shared_across_processes:  # real processes racing on one key
            go = tmp_path / "go"
            links = "1" if getattr(be, "use_links", False) else "0"
            procs = [subprocess.Popen([sys.executable, "-c", _PUBLISH_CHILD, str(be.root), key, str(go), str(i), links],
                                      stdout=subprocess.PIPE, text=True) for i in range(n)]
            time.sleep(1.0)  # let every child reach its wait
            go.touch()
            results = [p.communicate(timeout=60)[0].strip() for p in procs]
            assert all(p.returncode == 0 for p in procs)
            winners = [i for i, r in enumerate(results) if r == "WON"]
        else:
            barrier, out = threading.Barrier(n), [False] * n

            def run(i: int) -> None:
                barrier.wait()
                out[i] = be.publish(key, str(i).encode() * 1000)

            threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            winners = [i for i, won in enumerate(out) if won]
        assert len(winners) == 1, winners
        assert be.read(key) == str(winners[0]).encode() * 1000  # complete, and the winner's

    def test_ranged_reads_equal_slices(self, be):
        data = bytes(range(256)) * 4
        be.write("f", data)
        ranges = [(0, 10), (100, 1), (1000, 100), (-24, 24), (-2000, 5), (5000, 3)]
        assert be.read_ranges("f", ranges) == [data[0:10], data[100:101], data[1000:], data[-24:], data[:5], b""]
        assert be.read_range("f", 7, 3) == data[7:10]

    def test_listing_names_direct_children(self, be):
        for key in ("shards/a/x", "shards/a/y/z", "shards/b", "tags/t.json", "top.json"):
            be.write(key, b"1")
        assert be.list("shards") == ["a", "b"]
        assert be.list("shards/a") == ["x", "y"]
        assert {"shards", "tags", "top.json"} <= set(be.list(""))
        walked = {i.key: i.kind for i in be.walk("shards/a")}
        assert walked == {"shards/a/x": "file", "shards/a/y": "folder", "shards/a/y/z": "file"}
        info = be.stat("shards/a/y/z")
        assert info is not None and info.kind == "file" and info.size == 1 and abs(info.mtime - time.time()) < 60
        assert be.stat("shards/a").kind == "folder"

    def test_delete_is_idempotent(self, be):
        be.write("d/one", b"1")
        be.write("d/sub/two", b"2")
        be.delete("d/one")
        be.delete("d/one")
        assert not be.exists("d/one") and be.exists("d/sub/two")
        be.delete_prefix("d")
        be.delete_prefix("d")
        assert be.list("d") == [] and not be.exists("d/sub/two")

    @pytest.mark.parametrize("key", ["../x", "/etc/passwd", "a//b", "a/./b", "a/../../b", ""])
    def test_keys_outside_the_store_are_refused(self, be, key):
        for call in (lambda: be.read(key), lambda: be.write(key, b"1"), lambda: be.publish(key, b"1"),
                     lambda: be.delete(key)):
            with pytest.raises(StoreLayoutError):
                call()

    def test_lock_excludes_another_holder(self, be, tmp_path):
        if not be.supports_locks:
            pytest.skip("no locks: the conditional publish alone decides")
        if be.shared_across_processes:
            marker = tmp_path / "held"
            be.make_prefix("versions")  # the store folder exists
            proc = subprocess.Popen([sys.executable, "-c", _LOCK_CHILD, str(be.root), str(marker), "3"])
            while not marker.exists():
                assert proc.poll() is None
                time.sleep(0.01)
            with pytest.raises(TimeoutError), be.lock("_writer.lock", 0.2):
                pass
            proc.wait(timeout=30)
        else:
            held, release = threading.Event(), threading.Event()

            def hold() -> None:
                with be.lock("_writer.lock", 5):
                    held.set()
                    release.wait(5)

            t = threading.Thread(target=hold)
            t.start()
            held.wait(5)
            with pytest.raises(TimeoutError), be.lock("_writer.lock", 0.2):
                pass
            release.set()
            t.join()
        with be.lock("_writer.lock", 5), be.lock("_writer.lock", 5):  # free again, and re-entrant in a thread
            pass

    def test_rename_prefix_moves_a_folder_in_one_step(self, be):
        if not be.supports_atomic_rename:
            pytest.skip("no atomic rename: shards are written in place, their record last")
        be.write("staging/s.1/a", b"1")
        be.write("staging/s.1/b/c", b"2")
        be.rename_prefix("staging/s.1", "shards/s")
        assert be.read("shards/s/b/c") == b"2" and be.list("staging") == []
        be.write("staging/s.2/a", b"3")
        with pytest.raises(FileExistsError):
            be.rename_prefix("staging/s.2", "shards/s")
        assert be.read("shards/s/a") == b"1"


# ----------------------------------------------------------------------------- the store on every backend


@pytest.mark.parametrize("kind", BACKENDS)
def test_store_lifecycle_on_each_backend(kind, tmp_path, request):
    from msa_memory.store import create_store, open_store
    from msa_memory.testing.store_kit import add_docs, tiny_identity

    be = _make(kind, tmp_path, request)
    rng = np.random.default_rng(3)
    s = create_store(be, tiny_identity(hidden_size=2))
    s, rec, _, enc = add_docs(s, [5, 9, 3], rng, "a")
    s, _, _, enc2 = add_docs(s, [4], rng, "b")
    kv = s.load_kv([int(enc.doc_ids[1])])[0]
    assert kv.shape[0] == 3 and s.find_shard("a") is None
    s = s.commit(delete_ids=[int(enc.doc_ids[0])])
    s = s.compact()
    assert open_store(be).version == s.version == 4 and s.manifest["operation"] == "compact"
    assert s.load_kv([int(enc.doc_ids[1])])[0].tobytes() == kv.tobytes()
    assert s.verify()["ok"]
    rep = s.gc(dry_run=False, keep_last=1, grace_s=0)
    assert rep["kept_versions"] == [4] and "shards/a" in {o["path"] for o in rep["orphans"]}
    assert s.verify()["ok"] and sorted(s.documents(["doc_id"]).column("doc_id").to_pylist()) == \
        sorted([int(enc.doc_ids[1]), int(enc.doc_ids[2]), int(enc2.doc_ids[0])])


def test_memory_backend_shard_without_record_is_not_a_shard():
    """Without rename a shard is written in place and exists once its record does: a crashed writer's
    leftover is overwritten by the next write of that shard id, and gc lists it as debris."""
    from msa_memory.store import create_store, shards
    from msa_memory.testing.store_kit import add_docs, tiny_identity

    be = MemoryBackend(f"memory://x-{uuid.uuid4().hex}")
    s = create_store(be, tiny_identity())
    rng = np.random.default_rng(1)
    real = shards.fault_hook

    def crash(point: str) -> None:
        if point == "shard:docs":
            raise KeyboardInterrupt("killed")

    shards.fault_hook = crash
    try:
        with pytest.raises(KeyboardInterrupt):
            add_docs(s, [3], rng, "a")
    finally:
        shards.fault_hook = real
    assert be.exists("shards/a/zarr.json") and not be.exists("shards/a/_record.json")
    assert s.find_shard("a") is None
    assert "shards/a" in {o["path"] for o in s.gc(dry_run=True, grace_s=0)["orphans"]}
    s2, *_ = add_docs(s, [3], rng, "a")
    assert s2.version == 1 and s2.verify()["ok"]
