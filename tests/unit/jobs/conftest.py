"""Fixtures of the job tests: one tiny random-weight model saved once per session, small corpora."""

from __future__ import annotations

from pathlib import Path

import pytest
from jobkit import make_corpus, write_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen3")


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return make_corpus(tmp_path / "notes", 12)
