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


@pytest.fixture(params=["aligned", "shifted", "fine"])
def store(tmp_path, request):
    """A fresh tiny store keeping router inputs; every test runs three times: with MSA's aligned router-key
    grid alone, with the shifted grid at router layer 3 as well, and with that grid's windows finer than
    the chunks (2 tokens at a stride of 1, P = 4)."""
    shifted = () if request.param == "aligned" else (3,)
    window = 2 if request.param == "fine" else None
    s = create_store(tmp_path / "mem.msa", tiny_identity(hidden_size=4, shifted_layers=shifted, shifted_window=window))
    yield s
    if (tmp_path / "mem.msa" / "versions").exists():
        assert validate_store_manifests(tmp_path / "mem.msa") >= 1
