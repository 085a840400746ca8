"""Identity record, version manifests, tags and deletion files: the small JSON metadata of a store.

A version manifest lists everything version N is made of (shards, deletion files) plus running
totals, so opening a version reads two small files and nothing that grows with the corpus except
the list of shards. Every manifest read or published gets a structural check (types of the fields
the store uses, and every id and path it turns into a file path: a shard id, a router-key or
deletion path that could lead outside the store is refused); the full JSON Schema check
(``schemas/manifest.schema.json``) runs too with ``MSA_STORE_STRICT_MANIFESTS=1``. A manifest that
fails to parse or validate on read raises ManifestCorruptError naming the file and the field.

``versions/_latest.json`` names the newest version ever published; a store whose hint names a
version whose manifest is gone is refused (reading on would silently roll it back to an older
version and reuse the lost number), as is one whose hint is damaged. ``msa store repair`` is the
way out of both and of damaged manifests (``store/repair.py``).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping
from importlib import resources
from typing import Any

import crc32c

from msa_memory.errors import (
    ManifestCorruptError,
    MsaError,
    StoreFormatError,
    StoreLayoutError,
    StoreNotFoundError,
    VersionNotFoundError,
)
from msa_memory.schemas.records import (FINE_GRID_FORMAT_VERSION, FORMAT_VERSION, READ_FORMAT_VERSION,
                                        SHIFTED_GRID_FORMAT_VERSION, StoreIdentity)
from msa_memory.store._layout import (
    DELETION_PATH_RE,
    DELETIONS_DIR,
    IDENTITY_FILE,
    LATEST_HINT,
    TAGS_DIR,
    LEXICAL_PATH_RE,
    ROUTER_KEYS_PATH_RE,
    VERSIONS_DIR,
    check_tag_name,
    dumps,
    is_name,
    is_rel_path,
    parse_version_file,
    token,
    version_key,
)
from msa_memory.store.backend import Backend

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
_DAMAGED = "The file was damaged or written by other software."


def repair_hint(root: Backend) -> str:
    """What to do about a damaged or lost manifest of the store at ``root``."""
    return (f"Run `msa store repair {root}`: it sets the damaged file aside and publishes the newest good version "
            "as a new one (nothing is deleted; `--dry-run` shows what it would do).")


def _bad(where: str, field: str, msg: str, hint: str | None) -> ManifestCorruptError:
    return ManifestCorruptError(f"Manifest {where}: field {field} {msg}", hint=hint or _DAMAGED)


def _check_fields(obj: Any, spec: Mapping[str, type], where: str, prefix: str, hint: str | None) -> None:
    if not isinstance(obj, dict):
        raise _bad(where, prefix.rstrip(".") or "(root)", f"must be an object, got {type(obj).__name__}.", hint)
    for k, t in spec.items():
        v = obj.get(k)
        if not isinstance(v, t) or isinstance(v, bool):
            raise _bad(where, f"{prefix}{k}", f"must be {t.__name__}, got {v!r}.", hint)


def check_manifest_structure(m: dict[str, Any], where: str, hint: str | None = None) -> None:
    """Fast structural check (types of every field the reader uses, and every id and path that becomes a
    file path); O(shards), microseconds each. ``where`` names the file, ``hint`` what to do about it."""
    _check_fields(m, _TOP, where, "", hint)
    for i, e in enumerate(m["shards"]):
        _check_fields(e, _SHARD, where, f"shards[{i}].", hint)
        if not is_name(e["shard_id"]):
            raise _bad(where, f"shards[{i}].shard_id", f"is {e['shard_id']!r}, not a shard id (1-128 characters of "
                       "A-Z a-z 0-9 . _ -, starting with a letter or digit): it could lead outside the store.", hint)
        if "router_keys" in e:  # a reindexed version's keys of this shard (rekey.py)
            rk = e["router_keys"]
            _check_fields(rk, {"path": str, "files": dict}, where, f"shards[{i}].router_keys.", hint)
            if not ROUTER_KEYS_PATH_RE.match(rk["path"]):
                raise _bad(where, f"shards[{i}].router_keys.path", f"is {rk['path']!r}, not router_keys/NAME: it "
                           "could lead outside the store.", hint)
            bad = next((k for k in rk["files"] if not is_rel_path(k)), None)
            if bad is not None:
                raise _bad(where, f"shards[{i}].router_keys.files", f"names {bad!r}, not a path inside the "
                           "router-key folder: it could lead outside the store.", hint)
        if "lexical" in e:  # the shard's lexical postings written after it (lexical.py)
            lx = e["lexical"]
            _check_fields(lx, {"path": str, "analyzer": str, "size": int, "crc32c": int}, where,
                          f"shards[{i}].lexical.", hint)
            if not LEXICAL_PATH_RE.match(lx["path"]):
                raise _bad(where, f"shards[{i}].lexical.path", f"is {lx['path']!r}, not lexical/NAME.HEX.parquet: "
                           "it could lead outside the store.", hint)
    if "router" in m:
        _check_fields(m["router"], {"router_id": str, "router_layers": list}, where, "router.", hint)
    for i, e in enumerate(m["deletions"]):
        _check_fields(e, _DEL, where, f"deletions[{i}].", hint)
        if not DELETION_PATH_RE.match(e["path"]):
            raise _bad(where, f"deletions[{i}].path", f"is {e['path']!r}, not deletions/NNNNNNNN-HEX.json: it could "
                       "lead outside the store.", hint)
    _check_fields(m["stats"], _STATS, where, "stats.", hint)
    if m.get("parent_version") is not None and not isinstance(m["parent_version"], int):
        raise _bad(where, "parent_version", "must be an int or null.", hint)
    if STRICT_VALIDATION:
        validate_manifest(m, where, hint)


def validate_manifest(m: dict[str, Any], where: str, hint: str | None = None) -> None:
    """Full JSON Schema validation (raises ManifestCorruptError)."""
    errors = sorted(manifest_validator().iter_errors(m), key=lambda e: list(e.path))
    if errors:
        e = errors[0]
        raise ManifestCorruptError(
            f"Manifest {where} fails its JSON Schema at {'/'.join(map(str, e.path)) or '(root)'}: {e.message}",
            hint=hint or _DAMAGED,
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


def write_identity(be: Backend, identity: StoreIdentity, created: str) -> dict[str, Any]:
    fv = (FINE_GRID_FORMAT_VERSION if identity.shifted_window is not None else
          SHIFTED_GRID_FORMAT_VERSION if identity.shifted_layers else FORMAT_VERSION)
    rec = {"format_version": fv, "created": created, "identity": identity.to_dict()}
    be.replace(IDENTITY_FILE, dumps(rec))
    return rec


def read_identity(root: Backend) -> StoreIdentity:
    path = f"{root}/{IDENTITY_FILE}"
    try:
        raw = root.read(IDENTITY_FILE)
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


def list_versions(root: Backend) -> list[int]:
    names = root.list(VERSIONS_DIR)
    return sorted(v for v in (parse_version_file(n) for n in names) if v is not None)


def read_hint(root: Backend) -> int | None:
    """The version ``versions/_latest.json`` names; None if there is no hint. ManifestCorruptError if damaged."""
    hint = f"{root}/{VERSIONS_DIR}/{LATEST_HINT}"
    try:
        raw = root.read(f"{VERSIONS_DIR}/{LATEST_HINT}")
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        v = json.loads(raw)["version"]
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"version {v!r}")
        return v
    except (ValueError, KeyError, TypeError) as e:
        raise ManifestCorruptError(f"Latest-version hint {hint} of store {str(root)!r} is damaged ({e}); without it "
                                   "a lost latest manifest would go unnoticed.", hint=repair_hint(root)) from None


def _lost(root: Backend, hinted: int, vs: list[int]) -> tuple[str, str]:
    return (f"{VERSIONS_DIR}/{hinted:08d}.json",
            f"Manifest {root}/{version_key(hinted)} of version {hinted} is missing, but {VERSIONS_DIR}/{LATEST_HINT} "
            f"of store {str(root)!r} names it as the latest published version: it was deleted or lost. Reading on "
            f"would silently roll the store back to version {vs[-1] if vs else 'none'} and publish another version "
            f"{hinted}, so the store is refused.")


def latest_problem(root: Backend) -> tuple[str, str] | None:
    """(store-relative path, problem) when the store's latest version is lost or its hint damaged, else None."""
    try:
        hinted = read_hint(root)
    except ManifestCorruptError as e:
        return f"{VERSIONS_DIR}/{LATEST_HINT}", str(e)
    if hinted is None or root.exists(version_key(hinted)):
        return None
    vs = list_versions(root)
    return _lost(root, hinted, vs) if not vs or vs[-1] < hinted else None  # else the hint only lags


def latest_version(root: Backend) -> int:
    """Highest published version (hint file, then probing upwards; a full listing if no hint).

    Raises ManifestCorruptError when the hint is damaged or names a version whose manifest is gone
    while no newer one exists (the hint's update is best effort, so it may lag, never lead).
    """
    v = read_hint(root)
    if v is None or not root.probe(version_key(v)):
        vs = list_versions(root)
        if v is not None and (not vs or vs[-1] < v):
            raise ManifestCorruptError(_lost(root, v, vs)[1], hint=repair_hint(root))
        if not vs:
            raise StoreNotFoundError(f"Store {str(root)!r} has no published version.",
                                     hint="Create the store with create_store() first.")
        v = vs[-1]
    while root.probe(version_key(v + 1)):
        v += 1
    return v


def read_manifest(root: Backend, version: int) -> dict[str, Any]:
    key = version_key(version)
    path = f"{root}/{key}"
    try:
        info = root.stat(key) if root.supports_links else None
        if info is not None and info.kind == "link":
            raise StoreLayoutError(f"Manifest {path} is a symbolic link (to {info.target!r}); the store reads no "
                                   "version through a link.",
                                   hint="Replace the link with the manifest file itself (or remove it), then rerun.")
        raw = root.read(key)
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
        raise ManifestCorruptError(f"Manifest {path} is not valid JSON ({e}).", hint=repair_hint(root)) from None
    _check_format(m.get("format_version"), str(path))
    check_manifest_structure(m, str(path), repair_hint(root))
    if m["version"] != version:
        raise ManifestCorruptError(f"Manifest {path} says it is version {m['version']}, not {version}.",
                                   hint=repair_hint(root))
    return m


def publish_manifest(root: Backend, manifest: dict[str, Any]) -> bool:
    """Validate and publish manifest N by conditional publish (the commit point); False if N exists."""
    check_manifest_structure(manifest, f"version {manifest.get('version')} (to be published)",
                             "This is a bug in the writer that made it; nothing was published.")
    ok = root.publish(version_key(manifest["version"]), dumps(manifest))
    if ok:
        write_hint(root, manifest["version"], forward_only=not root.supports_locks)
    return ok


def write_hint(root: Backend, version: int, *, forward_only: bool = False) -> None:
    """Point ``versions/_latest.json`` at ``version`` (best effort: only a hint).

    ``forward_only`` (commits on a backend without locks): leave a hint that names ``version`` or a later
    one alone. Two committers may still interleave read and write, so the hint may lag by a version or
    two; it never leads (a manifest is published before its hint), and readers probe upwards from it."""
    try:
        if forward_only:
            try:
                hinted = read_hint(root)
            except MsaError:
                hinted = None
            if hinted is not None and hinted >= version:
                return
        root.replace(f"{VERSIONS_DIR}/{LATEST_HINT}", dumps({"version": version}))
    except OSError:
        pass


# ----------------------------------------------------------------------------- tags


def read_tags(root: Backend) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in root.list(TAGS_DIR):
        if n.endswith(".json") and not n.startswith("."):
            key = f"{TAGS_DIR}/{n}"
            info = root.stat(key) if root.supports_links else None
            if info is not None and info.kind == "link":
                raise StoreLayoutError(f"Tag file {root}/{key} is a symbolic link; the store reads nothing "
                                       "through a link.", hint="Delete the link and tag the version again.")
            try:
                out[n[:-5]] = int(json.loads(root.read(key))["version"])
            except (ValueError, KeyError, TypeError, FileNotFoundError):
                raise ManifestCorruptError(f"Tag file {root}/{key} is corrupt.",
                                           hint="Delete it and tag the version again.") from None
    return out


def write_tag(root: Backend, name: str, version: int, created: str) -> None:
    check_tag_name(name)
    root.replace(f"{TAGS_DIR}/{name}.json", dumps({"version": version, "created": created}))


def delete_tag(root: Backend, name: str) -> None:
    check_tag_name(name)
    key = f"{TAGS_DIR}/{name}.json"
    if root.stat(key) is None:
        raise VersionNotFoundError(f"Tag {name!r} not found in store {str(root)!r}.", hint=_VERSIONS_HINT)
    root.delete(key)


def resolve_version(root: Backend, version: int | str | None) -> int:
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


def write_deletions(root: Backend, version: int, deleted: dict[str, list[int]]) -> dict[str, Any]:
    """Write the ids deleted by ``version``, per shard; returns the manifest entry."""
    rel = f"{DELETIONS_DIR}/{version:08d}-{token()}.json"
    data = dumps({"version": version, "deleted": deleted})
    root.write(rel, data, exclusive=True)
    return {"path": rel, "n_docs": sum(len(v) for v in deleted.values()), "crc32c": crc32c.crc32c(data)}


def read_deletions(root: Backend, entry: dict[str, Any]) -> dict[str, list[int]]:
    path = f"{root}/{entry['path']}"
    try:
        data = root.read(entry["path"])
    except FileNotFoundError:
        from msa_memory.errors import ShardMissingError

        raise ShardMissingError(f"Deletion file {path} named by the manifest is missing.",
                                hint="Restore it from a backup; without it deleted documents would reappear.") from None
    if crc32c.crc32c(data) != entry["crc32c"]:
        from msa_memory.errors import ShardCorruptError

        raise ShardCorruptError(f"Deletion file {path} fails its checksum.",
                                hint="Restore it from a backup; `msa store verify` lists all damaged files.")
    return {str(k): [int(x) for x in v] for k, v in json.loads(data)["deleted"].items()}


def version_router(manifest: dict[str, Any], identity: StoreIdentity) -> dict[str, Any]:
    """The router of a version: its manifest's ``router`` or, absent, the identity's (a reindex can give a
    version another router than the one the store was created with, ``rekey.py``)."""
    r = manifest.get("router")
    if r is None:
        r = {"router_id": identity.router_id, "router_layers": list(identity.router_layers)}
        if identity.shifted_layers:
            r["shifted_layers"] = list(identity.shifted_layers)
        if identity.shifted_window is not None:
            r["shifted_window"] = identity.shifted_window
    return dict(r)
