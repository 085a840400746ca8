"""Plain records, Arrow schemas and the manifest JSON Schema: no I/O, no torch."""

from msa_memory.schemas.records import (
    FORMAT_VERSION,
    STORAGE_DTYPES,
    EncodedChunks,
    Passage,
    StoreIdentity,
    from_float32,
    to_float32,
)

__all__ = [
    "FORMAT_VERSION",
    "STORAGE_DTYPES",
    "EncodedChunks",
    "Passage",
    "StoreIdentity",
    "from_float32",
    "to_float32",
]
