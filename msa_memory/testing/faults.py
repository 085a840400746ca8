"""Fault helpers for store tests: flip bytes, validate every manifest, run a writer to be killed.

``run_writer_child`` starts a Python subprocess that performs a store operation with
``shards.fault_hook`` set to pause at a named point (it writes a marker file, then sleeps); the
parent SIGKILLs it there. That is a real kill of a real writer, at a known step.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["flip_byte", "validate_store_manifests", "spawn_paused_writer", "kill_when_paused"]


def flip_byte(path: str | os.PathLike[str], offset: int, mask: int = 0x01) -> None:
    """XOR one byte of a file in place (negative offsets count from the end)."""
    with open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        pos = offset if offset >= 0 else size + offset
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ mask]))


def validate_store_manifests(root: str | os.PathLike[str]) -> int:
    """Validate every versions/*.json of a store against manifest.schema.json; returns how many."""
    import jsonschema

    from msa_memory.store._manifest import manifest_validator

    n = 0
    for p in sorted(Path(root, "versions").glob("[0-9]*.json")):
        jsonschema.validate(json.loads(p.read_text()), manifest_validator().schema)
        n += 1
    return n


def spawn_paused_writer(script: str, pause_at: str, marker: str | os.PathLike[str]) -> subprocess.Popen[bytes]:
    """Run ``script`` (Python source) in a child whose store pauses at fault point ``pause_at``.

    When the child reaches the point it creates ``marker`` and sleeps; if it never reaches it, it
    runs to completion (exit 0) so the caller can tell.
    """
    prelude = (
        "import os, time\n"
        "from msa_memory.store import shards as _s\n"
        f"_PAUSE, _MARK = {pause_at!r}, {str(marker)!r}\n"
        "def _hook(point):\n"
        "    if point == _PAUSE:\n"
        "        open(_MARK, 'w').close()\n"
        "        time.sleep(600)\n"
        "_s.fault_hook = _hook\n"
    )
    return subprocess.Popen([sys.executable, "-c", prelude + script], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def kill_when_paused(proc: subprocess.Popen[bytes], marker: str | os.PathLike[str], timeout: float = 60.0) -> bool:
    """SIGKILL ``proc`` once ``marker`` exists; False if the child finished first (not killed)."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(marker):
        if proc.poll() is not None:
            return False
        if time.monotonic() > deadline:
            proc.kill()
            raise TimeoutError(f"writer child never reached its pause point (marker {marker})")
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return True
