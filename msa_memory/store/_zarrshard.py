"""Zarr v3 arrays of one store shard, written and read without going through zarr-python.

Each array is a standard Zarr v3 array whose whole extent is ONE shard file (codec
``sharding_indexed``, inner codecs ``bytes`` + ``crc32c``, index codecs ``bytes`` + ``crc32c``,
index at the end), so zarr-python (or any v3 reader) opens it as usual. We encode and decode that
format with numpy because zarr-python 3.1 handles every inner chunk as a separate task and a
separate byte-range request (about 15 MB/s here, and one read per chunk).

Inner chunks are laid out in C order, back to back, so the inner chunks ``a..b`` of the first
axis are one contiguous byte range: one ``pread`` fetches a document's chunks across all layers
and K/V (one ranged read on a backend). Every inner chunk carries its own crc32c, checked on every read (a flipped byte raises
:class:`ShardCorruptError`, never returns wrong numbers). Tests check zarr-python reads these files
bit-identically (the general path) against this fast path.
"""

from __future__ import annotations

import json
from typing import Any

import crc32c
import numpy as np

from msa_memory.errors import ShardCorruptError, ShardMissingError
from msa_memory.store.backend import Backend

MAX_U64 = np.uint64(2**64 - 1)
_CRC = 4  # bytes of the crc32c trailer of every inner chunk and of the index

_CODEC_PAIR = [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]


def array_metadata(shape: tuple[int, ...], chunk_shape: tuple[int, ...], dtype: np.dtype[Any],
                   attributes: dict[str, Any]) -> dict[str, Any]:
    """The ``zarr.json`` of a one-shard array with inner chunks ``chunk_shape``."""
    return {
        "shape": list(shape),
        "data_type": np.dtype(dtype).name,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(shape)}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "."}},
        "fill_value": 0,
        "codecs": [{
            "name": "sharding_indexed",
            "configuration": {
                "chunk_shape": list(chunk_shape),
                "codecs": _CODEC_PAIR,
                "index_codecs": _CODEC_PAIR,
                "index_location": "end",
            },
        }],
        "attributes": attributes,
        "zarr_format": 3,
        "node_type": "array",
        "storage_transformers": [],
    }


def shard_file(array_dir: str, ndim: int) -> str:
    """Key of the single shard file of an array (chunk key ``c.0.0...``: no nested directories,
    so a shard has few directories to fsync)."""
    return f"{array_dir}/" + ".".join(["c"] + ["0"] * ndim)


def write_array(be: Backend, array_dir: str, data: np.ndarray, chunk_shape: tuple[int, ...],
                attributes: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """Write ``data`` as a one-shard Zarr v3 array; returns {array-relative path: (size, crc32c)}.

    Only the first axis may be split into inner chunks (``chunk_shape[1:] == data.shape[1:]``).
    """
    assert chunk_shape[1:] == data.shape[1:] and data.shape[0] % chunk_shape[0] == 0
    data = np.ascontiguousarray(data, dtype=data.dtype.newbyteorder("<"))
    n_inner = data.shape[0] // chunk_shape[0]
    raw = data.view(np.uint8).reshape(n_inner, -1)  # (n_inner, inner_bytes), no copy
    inner_bytes = raw.shape[1]
    stride = inner_bytes + _CRC
    crcs = np.fromiter((crc32c.crc32c(row) for row in raw), dtype="<u4", count=n_inner)  # type: ignore[arg-type]
    crc_bytes = crcs.view(np.uint8).reshape(n_inner, _CRC)
    index = np.empty((n_inner, 2), dtype="<u8")
    index[:, 0] = np.arange(n_inner, dtype=np.uint64) * np.uint64(stride)
    index[:, 1] = stride
    index_full = index.reshape((n_inner,) + (1,) * (data.ndim - 1) + (2,))
    index_bytes = index_full.tobytes()
    index_bytes += np.uint32(crc32c.crc32c(index_bytes)).astype("<u4").tobytes()

    meta = json.dumps(array_metadata(data.shape, chunk_shape, data.dtype, attributes), indent=2).encode()
    be.write(f"{array_dir}/zarr.json", meta, exclusive=True)
    key = shard_file(array_dir, data.ndim)
    # chunk rows and their crc32c trailers go straight from `data` to the medium (writev, no copy)
    iov: list[Any] = []
    file_crc = 0
    for i in range(n_inner):
        iov += (raw[i], crc_bytes[i])
        file_crc = crc32c.crc32c(crc_bytes[i], crc32c.crc32c(raw[i], file_crc))
    iov.append(index_bytes)
    be.write(key, iov, exclusive=True)
    # whole-file checksum computed from the bytes written (no second read of the file)
    file_crc = crc32c.crc32c(index_bytes, file_crc)
    rel = key[len(array_dir) + 1:]
    return {"zarr.json": (len(meta), crc32c.crc32c(meta)), rel: (n_inner * stride + len(index_bytes), file_crc)}


class ArrayReader:
    """Reads inner-chunk ranges of one shard file written by :func:`write_array`, checking crc32c.

    ``shape``/``chunk_shape``/``dtype`` come from the caller (the store knows them from the
    identity and the shard record); the index is read and checked once, on first use.
    """

    def __init__(self, be: Backend, key: str, shape: tuple[int, ...], chunk_shape: tuple[int, ...],
                 dtype: np.dtype[Any], label: str) -> None:
        self.be, self.key, self.shape, self.chunk_shape = be, key, shape, chunk_shape
        self.path = f"{be}/{key}"  # for messages
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.label = label
        self.n_inner = shape[0] // chunk_shape[0] if chunk_shape[0] else 0
        self.inner_bytes = int(np.prod(chunk_shape)) * self.dtype.itemsize
        self._index: np.ndarray | None = None
        self._c_order = False  # set when the index says chunks are stored back to back in C order
        self._native = self.dtype.newbyteorder("=")

    def _corrupt(self, what: str) -> ShardCorruptError:
        return ShardCorruptError(
            f"{self.label}: {what} in {self.path}; its numbers must not be used.",
            hint="Run `msa store verify` to list corrupt files and affected documents; re-encode those documents.",
        )

    def _missing(self) -> ShardMissingError:
        return ShardMissingError(
            f"{self.label}: shard file {self.path} is missing.",
            hint="The store was damaged (files removed by hand?); restore the directory or re-encode the documents.")

    def _ranges(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        try:
            return self.be.read_ranges(self.key, ranges)
        except (FileNotFoundError, NotADirectoryError):
            raise self._missing() from None

    def index(self) -> np.ndarray:
        """(n_inner, 2) uint64 (offset, nbytes) of each inner chunk, checksum-verified."""
        if self._index is None:
            size = self.n_inner * 16 + _CRC
            info = self.be.stat(self.key)
            if info is None:
                raise self._missing()
            end = info.size
            raw = self._ranges([(end - size, size)])[0] if end >= size else b""
            if len(raw) != size:
                raise self._corrupt(f"truncated shard file ({end} bytes)")
            if crc32c.crc32c(raw[:-_CRC]) != int(np.frombuffer(raw[-_CRC:], "<u4")[0]):
                raise self._corrupt("shard index checksum mismatch")
            idx = np.frombuffer(raw[:-_CRC], dtype="<u8").reshape(self.n_inner, 2)
            if self.n_inner and (np.any(idx[:, 1] != self.inner_bytes + _CRC) or np.any(idx[:, 0] == MAX_U64)
                                 or int(idx[:, 0].max()) + self.inner_bytes + _CRC > end - size):
                raise self._corrupt("shard index does not match the array layout")
            self._index = idx
            stride = self.inner_bytes + _CRC
            self._c_order = bool(np.array_equal(idx[:, 0], np.arange(self.n_inner, dtype=np.uint64) * np.uint64(stride)))
        return self._index

    def read(self, start: int, stop: int) -> np.ndarray:
        """Inner chunks ``start:stop`` of the first axis as one array (one pread when contiguous)."""
        return self.read_many([(start, stop)])[0]

    def read_many(self, ranges: list[tuple[int, int]]) -> list[np.ndarray]:
        """:meth:`read` of several ranges with one batch of ranged reads (one open of a local file)."""
        idx = self.index()
        stride = self.inner_bytes + _CRC
        want: list[tuple[int, int]] = []   # byte ranges of all requests, in order
        spans: list[tuple[int, int, int]] = []  # (start, stop, number of byte ranges) per request
        for a, b in ranges:
            start, stop = int(a), int(b)
            if stop > start and not 0 <= start <= stop <= self.n_inner:
                raise IndexError(f"inner chunks {start}:{stop} out of range 0:{self.n_inner} of {self.path}")
            if stop <= start:
                parts: list[tuple[int, int]] = []
            elif self._c_order:  # write_array's layout: the chunks are one contiguous range, one read
                parts = [(start * stride, (stop - start) * stride)]
            else:  # written by another v3 writer: one read per inner chunk, in index order
                parts = [(int(off), stride) for off in idx[start:stop, 0]]
            spans.append((start, stop, len(parts)))
            want += parts
        got = self._ranges(want) if want else []
        out, i = [], 0
        for start, stop, k in spans:
            out.append(self._decode(start, stop, got[i:i + k]))
            i += k
        return out

    def _decode(self, start: int, stop: int, parts: list[bytes]) -> np.ndarray:
        n = stop - start
        out_shape = (max(n, 0) * self.chunk_shape[0],) + tuple(self.chunk_shape[1:])
        if n <= 0:
            return np.empty(out_shape, dtype=self._native)
        ib = self.inner_bytes
        stride = ib + _CRC
        if sum(len(p) for p in parts) != n * stride:
            raise self._corrupt("truncated shard file")
        raw = parts[0] if len(parts) == 1 else b"".join(parts)
        mv = memoryview(raw)
        stored = np.ndarray((n,), dtype="<u4", buffer=raw, offset=ib, strides=(stride,)).tolist()
        computed = [crc32c.crc32c(mv[o:o + ib]) for o in range(0, n * stride, stride)]
        if computed != stored:
            bad = next(i for i in range(n) if computed[i] != stored[i])
            raise self._corrupt(f"checksum mismatch in inner chunk {start + bad}")
        rows = np.ndarray((n, ib), dtype=np.uint8, buffer=raw, strides=(stride, 1))  # (n, ib) view, crc skipped
        return np.array(rows).view(self._native).reshape(out_shape)  # one copy into a writable array
