"""The local-filesystem backend: the only module of the store that calls the operating system.

Durability as the store has always had it: every write is fsynced before it returns; a replace is
temp file + fsync + ``rename`` + fsync of the folder; a conditional publish is temp file + fsync +
``link`` (which fails on an existing name), falling back to an ``O_EXCL`` create where the file system
has no hard links (some network/FUSE mounts); folders are fsynced after entries appear in them
(``sync_prefix``, ``rename_prefix``). Writes never follow a link at the final name (``O_NOFOLLOW``),
removal never enters one, and ``entry_problem``/``link_in_path`` tell the store where one lies.
Locks are ``filelock`` file locks, cached per process (re-entrant within a thread).
"""

from __future__ import annotations

import os
import shutil
import stat
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from msa_memory.store.backend import Backend, Buffers, KeyInfo, check_key

__all__ = ["LocalBackend"]

_IOV_MAX = 512  # buffers per writev call, below IOV_MAX (1024)
_locks: dict[str, Any] = {}
_locks_guard = threading.Lock()


def _fsync_dir(path: Path) -> None:
    """Make a rename/creation inside ``path`` durable (no-op where folders can't be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _kind(mode: int) -> str:
    return ("link" if stat.S_ISLNK(mode) else "folder" if stat.S_ISDIR(mode) else
            "file" if stat.S_ISREG(mode) else "other")


def _write_all(fd: int, data: Buffers) -> None:
    if isinstance(data, (bytes, bytearray, memoryview)):
        view = memoryview(data).cast("B")
        while view:
            view = view[os.write(fd, view):]
        return
    parts = [memoryview(b).cast("B") for b in data]
    for lo in range(0, len(parts), _IOV_MAX):
        batch = parts[lo:lo + _IOV_MAX]
        total = sum(p.nbytes for p in batch)
        n = os.writev(fd, batch)
        if n < total:  # short write: finish the rest the simple way
            rest = memoryview(b"".join(bytes(p) for p in batch)[n:])
            while rest:
                rest = rest[os.write(fd, rest):]


class LocalBackend(Backend):
    """Keys are files under the folder ``root`` (a ``Path``, also what messages quote)."""

    supports_atomic_rename = True
    supports_links = True
    supports_locks = True
    shared_across_processes = True

    def __init__(self, root: str | os.PathLike[str], *, use_links: bool = True) -> None:
        self.root = Path(root)
        #: publish by ``os.link`` (else by ``O_EXCL`` create); tests switch it off to cover the fallback
        self.use_links = use_links

    def path(self, key: str, *, allow_root: bool = False) -> Path:
        """The file of ``key`` ("" = the root folder, with ``allow_root``)."""
        return self.root / check_key(key) if key or not allow_root else self.root

    # ---------------------------------------------------------------- reads
    def read(self, key: str) -> bytes:
        return self.path(key).read_bytes()

    def read_ranges(self, key: str, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        fd = os.open(self.path(key), os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size if any(off < 0 for off, _ in ranges) else 0
            return [os.pread(fd, length, off if off >= 0 else max(size + off, 0)) for off, length in ranges]
        finally:
            os.close(fd)

    def open_input(self, key: str) -> BinaryIO:
        return open(self.path(key), "rb")

    def stat(self, key: str) -> KeyInfo | None:
        try:
            st = os.lstat(self.path(key))
        except (FileNotFoundError, NotADirectoryError):
            return None
        kind = _kind(st.st_mode)
        return KeyInfo(key, kind, st.st_size if kind == "file" else 0, st.st_mtime,  # type: ignore[arg-type]
                       os.readlink(self.path(key)) if kind == "link" else None)

    def list(self, prefix: str = "") -> list[str]:
        try:
            return sorted(os.listdir(self.path(prefix, allow_root=True)))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def walk(self, prefix: str) -> list[KeyInfo]:
        out: list[KeyInfo] = []
        base = self.path(prefix, allow_root=True)
        for dirpath, dirnames, filenames in os.walk(base):  # links are listed, never entered
            for name in dirnames + filenames:
                rel = Path(dirpath, name).relative_to(self.root).as_posix()
                info = self.stat(rel)
                if info is not None:
                    out.append(info)
        return sorted(out, key=lambda i: i.key)

    # ---------------------------------------------------------------- writes
    def _create(self, path: Path, data: Buffers, flags: int, durable: bool = True) -> None:
        """Create/truncate ``path`` with ``flags``, write and fsync; a failed write leaves no file."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | flags, 0o666)
        except OSError as e:  # nothing was created: leave whatever is there alone
            if e.filename is None:
                e.filename = str(path)
            raise
        try:
            try:
                _write_all(fd, data)
                if durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            try:
                os.unlink(path)
            except OSError:
                pass
            if e.filename is None:
                e.filename = str(path)
            raise

    def write(self, key: str, data: Buffers, *, exclusive: bool = False, durable: bool = True) -> None:
        self._create(self.path(check_key(key)), data, os.O_EXCL if exclusive else os.O_TRUNC, durable)

    def _temp(self, path: Path) -> Path:
        return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")

    def replace(self, key: str, data: bytes) -> None:
        path = self.path(check_key(key))
        tmp = self._temp(path)
        self._create(tmp, data, os.O_TRUNC)
        try:
            os.replace(tmp, path)
        except OSError:
            os.unlink(tmp)
            raise
        _fsync_dir(path.parent)

    def publish(self, key: str, data: bytes) -> bool:
        path = self.path(check_key(key))
        if not self.use_links:
            return self._publish_excl(path, data)
        tmp = self._temp(path)
        self._create(tmp, data, os.O_TRUNC)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:  # no hard links here (some network/FUSE file systems): O_EXCL create instead
            return self._publish_excl(path, data)
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        _fsync_dir(path.parent)
        return True

    def _publish_excl(self, path: Path, data: bytes) -> bool:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        except FileExistsError:
            return False
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        _fsync_dir(path.parent)
        return True

    def delete(self, key: str) -> None:
        try:
            os.unlink(self.path(check_key(key)))
        except FileNotFoundError:
            pass

    def delete_prefix(self, prefix: str) -> None:
        path = self.path(check_key(prefix))
        errors: list[str] = []
        try:
            if stat.S_ISDIR(os.lstat(path).st_mode):
                shutil.rmtree(path, onerror=lambda fn, p, exc: errors.append(f"{p}: {exc[1]}"))
            else:
                os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            errors.append(str(e))
        if os.path.lexists(path):
            raise OSError(f"{path}: " + ("; ".join(errors) or "still there after removal"))

    def rename_prefix(self, src: str, dst: str) -> None:
        s, d = self.path(check_key(src)), self.path(check_key(dst))
        d.parent.mkdir(parents=True, exist_ok=True)
        if os.path.lexists(d):
            raise FileExistsError(f"{d} exists")
        try:
            os.rename(s, d)
        except OSError as e:
            if os.path.lexists(d):  # a folder published concurrently under that name
                raise FileExistsError(f"{d} exists") from e
            raise
        _fsync_dir(d.parent)
        if s.parent != d.parent:
            _fsync_dir(s.parent)

    def make_prefix(self, prefix: str) -> None:
        self.path(check_key(prefix)).mkdir(parents=True, exist_ok=True)

    def sync_prefix(self, prefix: str) -> None:
        for dirpath, _, _ in os.walk(self.path(prefix)):
            _fsync_dir(Path(dirpath))

    @contextmanager
    def lock(self, name: str, timeout: float) -> Iterator[None]:
        import filelock

        self.root.mkdir(parents=True, exist_ok=True)
        path = str(self.root.resolve() / check_key(name))
        with _locks_guard:
            lk = _locks.get(path)
            if lk is None:
                lk = _locks[path] = filelock.FileLock(path)
        try:
            lk.acquire(timeout=timeout)
        except filelock.Timeout:
            raise TimeoutError(f"lock {path} not taken within {timeout:g} s") from None
        try:
            yield
        finally:
            lk.release()

    # ---------------------------------------------------------------- links and space
    def entry_problem(self, key: str, want_folder: bool) -> str | None:
        path = self.path(key)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return None
        if stat.S_ISLNK(st.st_mode):
            return f"is a symbolic link (to {os.readlink(path)!r})"
        if want_folder and not stat.S_ISDIR(st.st_mode):
            return "is not a folder"
        if not want_folder and not stat.S_ISREG(st.st_mode):
            return "is not a regular file"
        # not a link and directly under the root (or under a folder checked before it): it resolves inside
        # realpath(root) by construction; the realpath is compared only where a parent could be a link
        if "/" in key:
            real_root = self._real_root()
            if os.path.realpath(path) != os.path.join(real_root, key):
                return f"resolves to {os.path.realpath(path)!r}, outside the store root {real_root!r}"
        return None

    def _real_root(self) -> str:
        return os.path.realpath(self.root)

    def link_in_path(self, key: str) -> str | None:
        cur = self.root
        for part in check_key(key).split("/"):
            cur = cur / part
            try:
                st = os.lstat(cur)
            except (FileNotFoundError, NotADirectoryError):
                return None
            if stat.S_ISLNK(st.st_mode):
                return (f"{cur.relative_to(self.root).as_posix()} is a symbolic link (to {os.readlink(cur)!r}); "
                        "not read through it")
        return None

    def free_bytes(self) -> int | None:
        try:
            return shutil.disk_usage(self.root).free
        except OSError:
            return None
