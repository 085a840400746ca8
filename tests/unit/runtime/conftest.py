"""Fixtures of the runtime tests: a tiny random MSA checkpoint, and a small store built for it.

The store is ``msa_memory.testing.runtime_kit.build_store`` of its six passages (short byte-tokenized texts,
so each document has 1-3 chunks at chunk_tokens=16).
"""

from __future__ import annotations

import pytest

from msa_memory.testing.runtime_kit import PASSAGES, build_store  # noqa: F401  (fixtures below use them)


@pytest.fixture(scope="session")
def tiny_msa_model(tmp_path_factory):
    from msa_memory.encode.model import load_model
    from msa_memory.encode.tiny import write_tiny_msa_checkpoint

    import torch

    path = write_tiny_msa_checkpoint(tmp_path_factory.mktemp("ckpt") / "msa", pooling_kernel_size=16,
                                     extra_msa_config={"top_k_docs": 2})
    return load_model(str(path), dtype=torch.float32)


@pytest.fixture(scope="session")
def tiny_store(tiny_msa_model, tmp_path_factory):
    return build_store(tmp_path_factory.mktemp("store") / "mem.msa", tiny_msa_model)


@pytest.fixture(scope="session")
def tiny_memory(tiny_store, tiny_msa_model):
    from msa_memory.runtime import Memory

    return Memory(tiny_store, model=tiny_msa_model)
