"""Identity record, version manifests, tags and deletion files: the small JSON metadata of a store.

A version manifest lists everything version N is made of (shards, deletion files) plus running
totals, so opening a version reads two small files and nothing that grows with the corpus except
the list of shards. Manifests are validated against ``schemas/manifest.schema.json`` before they are
published; a manifest that fails to parse or validate on read raises ManifestCorruptError.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

import crc32c

from msa_memory.errors import (
    ManifestCorruptError,
    StoreFormatError,
    StoreNotFoundError,
    VersionNotFoundError,
)
from msa_memory.schemas.records import (FINE_GRID_FORMAT_VERSION, FORMAT_VERSION, READ_FORMAT_VERSION,
                                        SHIFTED_GRID_FORMAT_VERSION, StoreIdentity)
from msa_memory.store._layout import (
    DELETIONS_DIR,
    IDENTITY_FILE,
    LATEST_HINT,
    TAGS_DIR,
    VERSIONS_DIR,
    check_tag_name,
    dumps,
    parse_version_file,
    publish_exclusive,
    replace_json_atomic,
    token,
    version_file,
    write_bytes_durable,
)

_VERSIONS_HINT = "Run `msa store versions STORE` to list versions and tags."


@functools.lru_cache(maxsize=1)
def manifest_validator() -> Any:
    """A jsonschema validator of ``manifest.schema.json`` (cached)."""
    import jsonschema

    text = resources.files("msa_memory.schemas").joinpath("manifest.schema.json").read_text()
    schema = json.loads(text)
    cls = jsonschema.validators.validator_for(schema)
    return cls(schema)


#: Validate every manifest read or published against the full JSON Schema (tests switch it on; the
#: always-on structural check below is what makes a damaged manifest raise in production).
STRICT_VALIDATION = os.environ.get("MSA_STORE_STRICT_MANIFESTS") == "1"

_TOP = {"format_version": int, "version": int, "timestamp": str, "message": str, "operation": str,
        "identity_sha256": str, "shards": list, "deletions": list, "used_id_ranges": list, "stats": dict,
        "changes": dict}
_SHARD = {"shard_id": str, "n_docs": int, "n_chunks": int, "n_tokens": int, "n_bytes": int, "doc_id_min": int,
          "doc_id_max": int, "record_crc32c": int}
_DEL = {"path": str, "n_docs": int, "crc32c": int}
_STATS = {"n_docs": int, "n_chunks": int, "n_tokens": int, "n_bytes": int}


def _check_fields(obj: Any, spec: Mapping[str, type], where: str) -> None:
    if not isinstance(obj, dict):
        raise ManifestCorruptError(f"Manifest {where}: expected an object, got {type(obj).__name__}.")
    for k, t in spec.items():
        v = obj.get(k)
        if not isinstance(v, t) or isinstance(v, bool):
            raise ManifestCorruptError(
                f"Manifest {where}: field {k!r} must be {t.__name__}, got {v!r}.",
                hint="The file was damaged or written by other software; restore it or open an older version.")


def check_manifest_structure(m: dict[str, Any], where: str) -> None:
    """Fast structural check (types of every field the reader uses); O(shards), microseconds each."""
    _check_fields(m, _TOP, where)
    for i, e in enumerate(m["shards"]):
        _check_fields(e, _SHARD, f"{where} shards[{i}]")
        if "router_keys" in e:  # a reindexed version's keys of this shard (rekey.py)
            _check_fields(e["router_keys"], {"path": str, "files": dict}, f"{where} shards[{i}].router_keys")
    if "router" in m:
        _check_fields(m["router"], {"router_id": str, "router_layers": list}, f"{where} router")
    for i, e in enumerate(m["deletions"]):
        _check_fields(e, _DEL, f"{where} deletions[{i}]")
    _check_fields(m["stats"], _STATS, f"{where} stats")
    if m.get("parent_version") is not None and not isinstance(m["parent_version"], int):
        raise ManifestCorruptError(f"Manifest {where}: parent_version must be an int or null.")
    if STRICT_VALIDATION:
        validate_manifest(m, where)


def validate_manifest(m: dict[str, Any], where: str) -> None:
    """Full JSON Schema validation (raises ManifestCorruptError)."""
    errors = sorted(manifest_validator().iter_errors(m), key=lambda e: list(e.path))
    if errors:
        e = errors[0]
        raise ManifestCorruptError(
            f"Manifest {where} fails its JSON Schema at {'/'.join(map(str, e.path)) or '(root)'}: {e.message}",
            hint="The file was damaged or written by other software; restore it or open an older version.",
        )


def _check_format(fv: Any, where: str) -> None:
    if not isinstance(fv, int):
        raise ManifestCorruptError(f"{where} has no valid format_version ({fv!r}).")
    if fv > READ_FORMAT_VERSION:
        raise StoreFormatError(
            f"{where} has format_version {fv}; this msa-memory reads formats up to {READ_FORMAT_VERSION}.",
            hint="Upgrade msa-memory (pip install -U msa-memory) to read this store.",
        )


# ----------------------------------------------------------------------------- identity


def write_identity(root: Path, identity: StoreIdentity, created: str) -> dict[str, Any]:
    fv = (FINE_GRID_FORMAT_VERSION if identity.shifted_window is not None else
          SHIFTED_GRID_FORMAT_VERSION if identity.shifted_layers else FORMAT_VERSION)
    rec = {"format_version": fv, "created": created, "identity": identity.to_dict()}
    replace_json_atomic(root / IDENTITY_FILE, rec)
    return rec


def read_identity(root: Path) -> StoreIdentity:
    path = root / IDENTITY_FILE
    try:
        raw = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        raise StoreNotFoundError(
            f"No msa-memory store at {str(root)!r} (missing {IDENTITY_FILE}).",
            hint="Check the path, or create one with `msa-encode PATH --store STORE` / create_store().",
        ) from None
    try:
        rec = json.loads(raw)
        _check_format(rec.get("format_version"), str(path))
        return StoreIdentity.from_dict(rec["identity"])
    except StoreFormatError:
        raise
    except Exception as e:  # noqa: BLE001 - any parse failure means a corrupt record
        raise ManifestCorruptError(
            f"Store identity record {path} is corrupt ({type(e).__name__}: {e}).",
            hint="Restore msa_store.json from a backup; it is written once at creation.",
        ) from None


# ----------------------------------------------------------------------------- versions


def list_versions(root: Path) -> list[int]:
    try:
        names = os.listdir(root / VERSIONS_DIR)
    except FileNotFoundError:
        return []
    return sorted(v for v in (parse_version_file(n) for n in names) if v is not None)


def latest_version(root: Path) -> int:
    """Highest published version (hint file, then probing upwards; a full listing if no hint)."""
    hint = root / VERSIONS_DIR / LATEST_HINT
    v: int | None = None
    try:
        v = int(json.loads(hint.read_text())["version"])
        if not version_file(root, v).exists():
            v = None
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        v = None
    if v is None:
        vs = list_versions(root)
        if not vs:
            raise StoreNotFoundError(f"Store {str(root)!r} has no published version.",
                                     hint="Create the store with create_store() first.")
        v = vs[-1]
    while version_file(root, v + 1).exists():
        v += 1
    return v


def read_manifest(root: Path, version: int) -> dict[str, Any]:
    path = version_file(root, version)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        vs = list_versions(root)
        raise VersionNotFoundError(
            f"Version {version!r} not found in store {str(root)!r}; available: "
            f"{(str(vs[0]) + '..' + str(vs[-1])) if vs else 'none'}.",
            hint=_VERSIONS_HINT,
        ) from None
    try:
        m = json.loads(raw)
        if not isinstance(m, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise ManifestCorruptError(
            f"Manifest {path} is not valid JSON ({e}).",
            hint="Open an older version (open_store(root, version=N-1)) or restore the file from a backup.",
        ) from None
    _check_format(m.get("format_version"), str(path))
    check_manifest_structure(m, str(path))
    if m["version"] != version:
        raise ManifestCorruptError(f"Manifest {path} says it is version {m['version']}, not {version}.")
    return m


def publish_manifest(root: Path, manifest: dict[str, Any]) -> bool:
    """Validate and publish manifest N by exclusive create (the commit point); False if N exists."""
    check_manifest_structure(manifest, f"version {manifest.get('version')} (to be published)")
    ok = publish_exclusive(version_file(root, manifest["version"]), dumps(manifest))
    if ok:
        try:
            replace_json_atomic(root / VERSIONS_DIR / LATEST_HINT, {"version": manifest["version"]})
        except OSError:
            pass  # only a hint
    return ok


# ----------------------------------------------------------------------------- tags


def read_tags(root: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        names = sorted(os.listdir(root / TAGS_DIR))
    except FileNotFoundError:
        return out
    for n in names:
        if n.endswith(".json") and not n.startswith("."):
            try:
                out[n[:-5]] = int(json.loads((root / TAGS_DIR / n).read_text())["version"])
            except (ValueError, KeyError, TypeError, FileNotFoundError):
                raise ManifestCorruptError(f"Tag file {root / TAGS_DIR / n} is corrupt.",
                                           hint="Delete it and tag the version again.") from None
    return out


def write_tag(root: Path, name: str, version: int, created: str) -> None:
    check_tag_name(name)
    (root / TAGS_DIR).mkdir(exist_ok=True)
    replace_json_atomic(root / TAGS_DIR / f"{name}.json", {"version": version, "created": created})


def delete_tag(root: Path, name: str) -> None:
    check_tag_name(name)
    try:
        os.unlink(root / TAGS_DIR / f"{name}.json")
    except FileNotFoundError:
        raise VersionNotFoundError(f"Tag {name!r} not found in store {str(root)!r}.", hint=_VERSIONS_HINT) from None


def resolve_version(root: Path, version: int | str | None) -> int:
    if version is None:
        return latest_version(root)
    if isinstance(version, (int,)) and not isinstance(version, bool):
        return int(version)
    if isinstance(version, str):
        if version.isdigit():
            return int(version)
        tags = read_tags(root)
        if version in tags:
            return tags[version]
        raise VersionNotFoundError(f"Tag {version!r} not found in store {str(root)!r}; tags: {sorted(tags)}.",
                                   hint=_VERSIONS_HINT)
    raise VersionNotFoundError(f"Version must be an int, a tag name or None, got {version!r}.", hint=_VERSIONS_HINT)


# ----------------------------------------------------------------------------- deletion files


def write_deletions(root: Path, version: int, deleted: dict[str, list[int]]) -> dict[str, Any]:
    """Write the ids deleted by ``version``, per shard; returns the manifest entry."""
    rel = f"{DELETIONS_DIR}/{version:08d}-{token()}.json"
    data = dumps({"version": version, "deleted": deleted})
    (root / DELETIONS_DIR).mkdir(exist_ok=True)
    write_bytes_durable(root / rel, data)
    return {"path": rel, "n_docs": sum(len(v) for v in deleted.values()), "crc32c": crc32c.crc32c(data)}


def read_deletions(root: Path, entry: dict[str, Any]) -> dict[str, list[int]]:
    path = root / entry["path"]
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        from msa_memory.errors import ShardMissingError

        raise ShardMissingError(f"Deletion file {path} named by the manifest is missing.",
                                hint="Restore it from a backup; without it deleted documents would reappear.") from None
    if crc32c.crc32c(data) != entry["crc32c"]:
        from msa_memory.errors import ShardCorruptError

        raise ShardCorruptError(f"Deletion file {path} fails its checksum.",
                                hint="Restore it from a backup; `msa store verify` lists all damaged files.")
    return {str(k): [int(x) for x in v] for k, v in json.loads(data)["deleted"].items()}
