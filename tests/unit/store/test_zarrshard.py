"""The shard-file codec of store/_zarrshard.py vs zarr-python, including a shard whose inner
chunks are NOT in C order (another v3 writer): the reader must fall back to one read per chunk
and still agree with zarr. Run: .venv/bin/python -m pytest tests/unit/store/test_zarrshard.py -q
"""

from __future__ import annotations

import crc32c
import numpy as np
import pytest

from msa_memory.errors import ShardCorruptError
from msa_memory.store._local import LocalBackend
from msa_memory.store._zarrshard import ArrayReader, shard_file, write_array


def _permute_shard(path, n_inner, stride, order):
    """Rewrite a shard file with its inner chunks stored in ``order`` (index updated)."""
    data = path.read_bytes()
    body, idx_size = data[: n_inner * stride], n_inner * 16 + 4
    chunks = [body[i * stride:(i + 1) * stride] for i in range(n_inner)]
    index = np.zeros((n_inner, 2), dtype="<u8")
    out = b""
    for pos, i in enumerate(order):
        index[i] = (pos * stride, stride)
        out += chunks[i]
    ib = index.reshape((n_inner, 1, 1, 2)).tobytes()
    path.write_bytes(out + ib + np.uint32(crc32c.crc32c(ib)).astype("<u4").tobytes())
    assert len(data) == n_inner * stride + idx_size


@pytest.mark.parametrize("permute", [None, [3, 0, 6, 1, 5, 2, 4], [0, 2, 1, 3, 4, 5, 6]])
def test_reader_agrees_with_zarr(tmp_path, permute):
    zarr = pytest.importorskip("zarr")
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2**16, size=(7, 3, 5), dtype=np.uint16)  # (C, x, y)
    be = LocalBackend(tmp_path)
    write_array(be, "arr", a, (1, 3, 5), {"msa_logical_dtype": "bfloat16"})
    key = shard_file("arr", 3)
    path = tmp_path / key
    stride = 3 * 5 * 2 + 4
    if permute:
        _permute_shard(path, 7, stride, permute)
    z = zarr.open_array(tmp_path / "arr", mode="r")
    assert np.array_equal(z[:], a)
    r = ArrayReader(be, key, a.shape, (1, 3, 5), np.uint16, "test")
    for lo, hi in [(0, 7), (2, 5), (6, 7), (4, 4)]:
        assert np.array_equal(r.read(lo, hi), a[lo:hi])
        assert np.array_equal(r.read(lo, hi), z[lo:hi])
    with pytest.raises(IndexError):
        r.read(5, 9)


def test_truncated_file_raises(tmp_path):
    a = np.arange(40, dtype=np.uint16).reshape(4, 10)
    be = LocalBackend(tmp_path)
    write_array(be, "arr", a, (1, 10), {})
    key = shard_file("arr", 2)
    path = tmp_path / key
    path.write_bytes(path.read_bytes()[:30])
    with pytest.raises(ShardCorruptError):
        ArrayReader(be, key, a.shape, (1, 10), np.uint16, "t").read(0, 1)
