"""Fixtures of the store unit tests: a fresh tiny store per test; every manifest written during a
test is validated against manifest.schema.json at teardown."""

from __future__ import annotations

import numpy as np
import pytest

from msa_memory.store import create_store
from msa_memory.testing.faults import validate_store_manifests
from msa_memory.testing.store_kit import tiny_identity


@pytest.fixture(autouse=True)
def strict_manifests(monkeypatch):
    """Every manifest read or published in these tests is also checked against the JSON Schema."""
    from msa_memory.store import _manifest

    monkeypatch.setattr(_manifest, "STRICT_VALIDATION", True)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def store(tmp_path):
    s = create_store(tmp_path / "mem.msa", tiny_identity(hidden_size=4))
    yield s
    if (tmp_path / "mem.msa" / "versions").exists():
        assert validate_store_manifests(tmp_path / "mem.msa") >= 1
