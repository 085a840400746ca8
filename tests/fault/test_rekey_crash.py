"""A reindex (store.rekey) SIGKILLed at each step: the store stays readable at the old version.

A child process re-keys a two-shard store with a linear map of its router inputs and is killed
(real SIGKILL) after staging a key array, after writing all of them, just before publishing, and
just after. Oracles: before the publish the latest version is the old one and reads
byte-identically (keys, router); gc lists the leftovers (staging dirs, key arrays no version names)
and removes them; a second reindex then succeeds; after the publish the new version is complete.

Run: .venv/bin/python -m pytest tests/fault/test_rekey_crash.py -q
"""

from __future__ import annotations

import numpy as np
import pytest

from msa_memory.store import create_store, open_store
from msa_memory.testing.faults import kill_when_paused, spawn_paused_writer, validate_store_manifests
from msa_memory.testing.store_kit import add_docs, tiny_identity

REKEY = """
import numpy as np
from msa_memory.schemas.records import from_float32, to_float32
from msa_memory.store import open_store
store = open_store({root!r})
idt = store.identity
W = np.random.default_rng(9).standard_normal((idt.n_layers, idt.hidden_size, idt.n_kv_heads * idt.head_dim)).astype(np.float32)
def fn(sid, x):
    return from_float32(np.einsum("lce,lef->lcf", to_float32(x, idt.dtype), W).reshape(
        idt.n_layers, x.shape[1], idt.n_kv_heads, idt.head_dim), idt.dtype)
store.rekey({{"router_id": "crashrouter", "router_layers": list(idt.router_layers)}}, fn)
print("PUBLISHED")
"""

POINTS = ["rekey:staged", "rekey:written", "rekey:locked", "commit:before_publish", "commit:published"]


def _keys(store):
    return [store.router_keys(i)[0].tobytes() for i in range(store.identity.n_layers)], store.identity.router_id


@pytest.fixture
def base(tmp_path):
    rng = np.random.default_rng(0)
    s = create_store(tmp_path / "mem", tiny_identity(hidden_size=3))
    s, *_ = add_docs(s, [4, 7, 3], rng, "a")
    s, *_ = add_docs(s, [5, 2], rng, "b")
    return s


@pytest.mark.parametrize("point", POINTS)
def test_sigkill_mid_reindex(base, tmp_path, point):
    before = _keys(base)
    marker = tmp_path / "paused"
    proc = spawn_paused_writer(REKEY.format(root=str(base.root)), point, marker)
    assert kill_when_paused(proc, marker), proc.stderr.read().decode()[-2000:]
    after = open_store(base.root)
    if point == "commit:published":  # killed after the commit point: the new version is complete
        assert after.version == base.version + 1 and after.identity.router_id == "crashrouter"
        assert after.verify()["ok"] and _keys(open_store(base.root, version=base.version)) == before
        assert not any(o["kind"] == "router_keys" for o in after.gc(dry_run=True, grace_s=0)["orphans"])
        return
    assert after.version == base.version and _keys(after) == before and after.verify()["ok"]
    kinds = {o["kind"] for o in after.gc(dry_run=True, grace_s=0)["orphans"]}
    assert kinds == ({"staging"} if point == "rekey:staged" else {"router_keys"})
    after.gc(dry_run=False, grace_s=0)
    assert not any((base.root / "router_keys").iterdir()) if (base.root / "router_keys").exists() else True
    assert not any((base.root / "staging").iterdir())
    # the reindex can simply be run again
    proc = spawn_paused_writer(REKEY.format(root=str(base.root)), "never", marker.with_suffix(".2"))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and b"PUBLISHED" in out, err.decode()[-2000:]
    new = open_store(base.root)
    assert new.version == base.version + 1 and new.identity.router_id == "crashrouter" and new.verify()["ok"]
    assert _keys(new)[0] != before[0]
    assert validate_store_manifests(base.root) == new.version + 1
