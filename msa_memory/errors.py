"""One exception hierarchy for the whole package.

Every error a user can meet is a subclass of :class:`MsaError` and also of the builtin that a
notebook user would naturally catch (``KeyError`` for an unknown document id, ``FileNotFoundError``
for a missing store, ...). Messages say what was wrong, the offending value, what is allowed and
what to do next.

Rollback guarantee for writers: any error raised by a commit means that no manifest was published;
the store still reads exactly as the version the writer started from. Files a failed writer left
behind are orphans that ``gc`` lists and removes.
"""

from __future__ import annotations

__all__ = [
    "MsaError",
    "ConfigError",
    "StoreError",
    "StoreNotFoundError",
    "StoreExistsError",
    "StoreFormatError",
    "StoreLayoutError",
    "StoreNotWritableError",
    "DiskFullError",
    "ManifestCorruptError",
    "ShardMissingError",
    "ShardCorruptError",
    "VersionNotFoundError",
    "VersionConflictError",
    "LockTimeoutError",
    "StoreUnavailableError",
    "SchemaMismatchError",
    "IdentityMismatchError",
    "DocumentNotFoundError",
    "DuplicateDocumentError",
    "IdNotReservedError",
    "EncodeError",
    "ModelLoadError",
    "RuntimeMemoryError",
    "JobError",
]


class MsaError(Exception):
    """Base class of every error raised on purpose by msa-memory."""

    hint: str | None = None

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint

    def __str__(self) -> str:  # KeyError quotes its argument; we want the plain message
        msg = self.args[0] if self.args else ""
        return f"{msg} {self.hint}" if self.hint else str(msg)


class ConfigError(MsaError, ValueError):
    """A configuration value or argument is invalid."""


# ----------------------------------------------------------------------------- store


class StoreError(MsaError):
    """Base class of errors about the on-disk store."""


class StoreNotFoundError(StoreError, FileNotFoundError):
    """No store exists at the given path."""


class StoreExistsError(StoreError, FileExistsError):
    """A store already exists where a new one was to be created."""


class StoreFormatError(StoreError, ValueError):
    """The store was written by a newer (or unknown) format version."""


class StoreLayoutError(StoreError, ValueError):
    """A store folder or file is a symbolic link, or leads outside the store root: the store reads,
    writes and deletes nothing through it."""


class StoreNotWritableError(StoreError, PermissionError):
    """A write (commit, gc, tag, repair...) was asked of a store this process cannot write to (read-only
    file system or permissions); nothing was changed. Reads need no write access."""


class DiskFullError(StoreError, OSError):
    """The device of the store ran out of space during a write; no version was published and nothing
    already stored was changed (files the write left are orphans that ``gc`` removes)."""


class ManifestCorruptError(StoreError, ValueError):
    """A version manifest, identity record or table file cannot be parsed or fails validation."""


class ShardMissingError(StoreError, FileNotFoundError):
    """A shard named by a version manifest is missing on disk."""


class ShardCorruptError(StoreError, ValueError):
    """A shard's bytes fail their checksum; its numbers must not be used."""


class VersionNotFoundError(StoreError, KeyError):
    """A version number or tag does not exist."""


class VersionConflictError(StoreError, RuntimeError):
    """Another commit was published after the version this writer read; nothing was published."""


class LockTimeoutError(StoreError, TimeoutError):
    """The store's writer lock could not be taken in time."""


class StoreUnavailableError(StoreError, ConnectionError):
    """The medium of a remote store (S3) kept failing or throttling after the retries with backoff; the
    call changed nothing it had not finished (no version was published by a failed commit)."""


class SchemaMismatchError(StoreError, ValueError):
    """Arrays written to the store have the wrong shape or dtype for its identity record."""


class IdentityMismatchError(StoreError, ValueError):
    """The model (or router) writing to / reading from a store differs from the one that built it."""


class DocumentNotFoundError(MsaError, KeyError):
    """A document id (or source path) is not live in the version at hand."""


class DuplicateDocumentError(StoreError, ValueError):
    """A document id is written twice, or was already used (ids are never reused)."""


class IdNotReservedError(StoreError, ValueError):
    """A shard uses document ids that were never handed out by ``store.reserve_ids``."""


# ----------------------------------------------------------------------------- encode / runtime / jobs


class EncodeError(MsaError, RuntimeError):
    """Encoding a document or batch failed."""


class ModelLoadError(MsaError, RuntimeError):
    """A model, tokenizer or router adapter cannot be loaded."""


class RuntimeMemoryError(MsaError, RuntimeError):
    """The runtime cannot serve a request with the memory it was given (budget, device)."""


class JobError(MsaError, RuntimeError):
    """A batch encoding job failed; no version was committed."""
