"""Per-version routers: re-key every document of a store with another router into a new version.

Design note. Router keys are a linear map of the pooled router-layer inputs x̄ that a store may
keep (``x_router``, identity ``hidden_size > 0``), so a new router needs no re-encoding: for every
shard of version N, ``keys_fn(shard_id, x_router)`` gives the shard's new (L, C, H, D) keys (the
caller does the maths; this package stays numpy-only). Shards are immutable, so the new keys go
into a new one-shard Zarr array ``router_keys/{shard}.{router}.{hex}/k_router/`` (written in
``staging/``, fsynced, renamed into place), and version N+1 lists, per shard entry,
``"router_keys": {"path", "files"}`` (whole-file sizes + crc32c), plus a top-level
``"router": {"router_id", "router_layers", ...}``. Publishing N+1 is the usual single commit point
(exclusive create of the manifest under the writer lock, after checking that nobody published
since N), so a crash anywhere leaves version N intact and only orphans that ``gc`` removes.

What it means for everything else:
- the store identity (``msa_store.json``) keeps the backbone fingerprint and the router the store
  was created with; a snapshot's ``identity`` is that record with ``router_id`` replaced by its
  version's router, so appends and ``Memory`` are checked against the router of the version they
  open (``MemoryStore.check_identity`` names the versions that match another router);
- older versions are untouched and keep reading their shards' own keys; ``restore`` carries the
  restored version's router; commits carry the parent's router and keys; ``compact`` writes the
  version's keys into the new shard; ``gc`` keeps key arrays that any kept version names;
- the router's layers must equal the store's router layers (content K̄V̄ are kept at exactly those
  layers); copy into a new store (``train.reindex.reindex_router_to``) to change them;
- a store with a shifted grid (identity ``shifted_layers``) has its shifted keys recomputed too, by
  ``shifted_keys_fn(shard_id, x_router_s)`` into ``k_router_s/`` beside ``k_router/``; the router's
  ``shifted_layers`` must equal the store's (only those layers' shifted inputs are kept).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from msa_memory.errors import ConfigError, SchemaMismatchError, VersionConflictError
from msa_memory.schemas.records import STORAGE_DTYPES, StoreIdentity
from msa_memory.store import _manifest, shards
from msa_memory.store._layout import (ROUTER_KEYS_DIR, STAGING_DIR, check_layout, check_name, fsync_dir,
                                     os_write_error, token)
from msa_memory.store._zarrshard import ArrayReader, shard_file, write_array

if TYPE_CHECKING:
    from msa_memory.store.reader import MemoryStore

__all__ = ["rekey", "relabel", "version_router", "keys_reader", "router_key_paths", "KeysFn"]

#: keys_fn(shard_id, x_router (L, C, E) storage dtype) -> (L, C, H, D) keys in storage dtype.
KeysFn = Callable[[str, np.ndarray], np.ndarray]


def version_router(manifest: dict[str, Any], identity: StoreIdentity) -> dict[str, Any]:
    """The router of a version: its manifest's ``router`` or, absent, the identity's."""
    r = manifest.get("router")
    if r is None:
        r = {"router_id": identity.router_id, "router_layers": list(identity.router_layers)}
        if identity.shifted_layers:
            r["shifted_layers"] = list(identity.shifted_layers)
        if identity.shifted_window is not None:
            r["shifted_window"] = identity.shifted_window
    return dict(r)


def keys_reader(root: Path, entry: dict[str, Any], identity: StoreIdentity, n_chunks: int,
                shifted: bool = False) -> ArrayReader:
    """Reader of the (L, C, H, D) router-key array a shard entry's ``router_keys`` names (``shifted``: its
    (Ls, Cs, H, D) ``k_router_s`` beside it)."""
    L = len(identity.shifted_layers) if shifted else identity.n_layers
    H, D = identity.n_kv_heads, identity.head_dim
    name = "k_router_s" if shifted else "k_router"
    path = shard_file(root / entry["router_keys"]["path"] / name, 4)
    return ArrayReader(path, (L, n_chunks, H, D), (1, n_chunks, H, D), STORAGE_DTYPES[identity.dtype],
                       f"router keys {entry['router_keys']['path']!r}/{name} of shard {entry['shard_id']!r}")


def router_key_paths(manifest: dict[str, Any]) -> set[str]:
    """Store-relative directories of the router-key arrays a manifest names."""
    return {e["router_keys"]["path"] for e in manifest["shards"] if "router_keys" in e}


def verify_keys(root: Path, entry: dict[str, Any]) -> list[tuple[str, str]]:
    """(path, problem) for each missing or damaged file of a shard entry's router keys."""
    return shards.check_files(root, entry["router_keys"]["path"], entry["router_keys"]["files"])


def _write_keys(root: Path, identity: StoreIdentity, shard_id: str, router_id: str,
                keys: np.ndarray, keys_s: np.ndarray | None = None) -> dict[str, Any]:
    """Write one shard's new keys (and its shifted grid's, ``keys_s``) durably under ``router_keys/``;
    returns the entry's ``router_keys``."""
    name = f"{shard_id}.{router_id[:16]}.{token()}"
    stage = root / STAGING_DIR / f"rk-{name}"
    stage.mkdir(parents=True)
    H, D = identity.n_kv_heads, identity.head_dim
    files: dict[str, dict[str, int]] = {}
    for arr, k, dims in (("k_router", keys, ["layer", "chunk", "head", "dim"]),
                         ("k_router_s", keys_s, ["shifted_layer", "shifted_chunk", "head", "dim"])):
        if k is None:
            continue
        written = write_array(stage / arr, k, (1, k.shape[1], H, D),
                              {"msa_logical_dtype": identity.dtype, "dims": dims,
                               "msa_router_id": router_id, "msa_shard_id": shard_id})
        fsync_dir(stage / arr)
        files.update({f"{arr}/{rel}": {"size": size, "crc32c": crc} for rel, (size, crc) in written.items()})
    fsync_dir(stage)
    shards.fault_hook("rekey:staged")
    (root / ROUTER_KEYS_DIR).mkdir(exist_ok=True)
    os.rename(stage, root / ROUTER_KEYS_DIR / name)
    fsync_dir(root / ROUTER_KEYS_DIR)
    return {"path": f"{ROUTER_KEYS_DIR}/{name}", "files": dict(sorted(files.items()))}


def _checked(k: Any, shape: tuple[int, ...], st: Any, fn: str, shard_id: str) -> np.ndarray:
    if not isinstance(k, np.ndarray) or k.shape != shape or k.dtype != st:
        raise SchemaMismatchError(
            f"{fn} returned {getattr(k, 'dtype', type(k).__name__)} {getattr(k, 'shape', '')} for shard "
            f"{shard_id!r}; expected {st} {shape} (layers, chunks, kv heads, head dim).")
    return k


def _base(store: MemoryStore, read_version: int | None) -> tuple[MemoryStore, int]:
    """The snapshot a new version is made from (``read_version``, default ``store``'s) and its number."""
    from msa_memory.store.reader import MemoryStore

    rv = store.version if read_version is None else int(read_version)
    return (store if store.version == rv else MemoryStore(store.root, rv)), rv


def _checked_router(base: MemoryStore, router: Any) -> dict[str, Any]:
    """``router`` checked against ``base``'s store (a JSON-able dict with a router id, the store's router
    layers, shifted layers and shifted window) and completed with them."""
    import json

    from msa_memory.errors import IdentityMismatchError

    root, ident = base.root, base.identity
    if not isinstance(router, dict) or not isinstance(router.get("router_id"), str) or not router["router_id"]:
        raise ConfigError(f"rekey(router=...) needs a dict with a non-empty 'router_id', got {router!r}.")
    try:
        json.dumps(router)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"rekey(router=...) must be JSON-serialisable: {e}") from None
    layers = [int(x) for x in router.get("router_layers", [])]
    if layers != list(ident.router_layers):
        raise IdentityMismatchError(
            f"The new router's layers {layers} differ from store {str(root)!r}'s router layers "
            f"{list(ident.router_layers)}; a new version can only re-key the same layers (content K̄V̄ are kept at "
            "exactly those layers).",
            hint="Train the adapter on the store's layers (msa train-router --layers "
                 f"{','.join(map(str, ident.router_layers))} --keep-layers), or copy into a new store "
                 "with `msa store reindex-router STORE --adapter DIR --dest NEW`.")
    shifted = [int(x) for x in router.get("shifted_layers", [])]
    if shifted != list(ident.shifted_layers):
        raise IdentityMismatchError(
            f"The new router's shifted layers {shifted} differ from store {str(root)!r}'s {list(ident.shifted_layers)}; "
            "the store keeps shifted-grid inputs at exactly those layers.",
            hint="Use an adapter with the store's shifted layers (RouterAdapter.with_shifted_layers), or copy into a "
                 "new store with `msa store reindex-router STORE --adapter DIR --dest NEW`.")
    window = router.get("shifted_window")
    if shifted and (None if window is None else int(window)) != ident.shifted_window:
        raise IdentityMismatchError(
            f"The new router's shifted grid has windows of {window or ident.chunk_tokens} tokens, store {str(root)!r} "
            f"keeps the inputs of windows of {ident.shifted_window or ident.chunk_tokens} tokens.",
            hint="Use an adapter with the store's grid (RouterAdapter.with_shifted_layers(layers, window=...)), or "
                 "re-encode.")
    router = {**router, "router_id": router["router_id"], "router_layers": layers}
    if shifted:
        router["shifted_layers"] = shifted
    if ident.shifted_window is not None:
        router["shifted_window"] = ident.shifted_window
    return router


def _publish(base: MemoryStore, rv: int, entries: list[dict[str, Any]], router: dict[str, Any], message: str,
             lock_timeout: float, written: list[Path]) -> MemoryStore:
    """Publish version ``rv`` + 1 = ``base`` with shard ``entries`` under ``router`` (the usual single commit
    point); another writer's version since ``rv`` raises VersionConflictError and removes ``written``."""
    from msa_memory.store import commit as _commit

    root, ident = base.root, base.identity
    with _commit.writer_lock(root, lock_timeout, "a reindex"):
        shards.fault_hook("rekey:locked")
        latest = _manifest.latest_version(root)
        if latest != rv:
            for p in written:
                shutil.rmtree(p, ignore_errors=True)
            raise VersionConflictError(
                f"Store {str(root)!r} is at version {latest}, but this reindex read version {rv}; nothing was "
                "published.", hint="Re-open the store and run the reindex again.")
        prev = version_router(base.manifest, ident)
        m = _commit.new_manifest(
            latest + 1, latest, "reindex", message or f"reindex router {prev['router_id'][:16]} -> "
            f"{router['router_id'][:16]}", base._identity_sha, entries, list(base.manifest["deletions"]),
            base.manifest["used_id_ranges"], dict(base.manifest["stats"]),
            {"added_docs": 0, "deleted_docs": 0, "added_shards": [], "removed_shards": [],
             "previous_router_id": prev["router_id"]}, router=router)
        return _commit.publish(root, m)


def rekey(store: MemoryStore, router: dict[str, Any], keys_fn: KeysFn, *, message: str = "",
          read_version: int | None = None, lock_timeout: float = 60.0,
          log: Callable[[str], None] | None = None, shifted_keys_fn: KeysFn | None = None) -> MemoryStore:
    """Publish version N+1 = version N (``read_version``, default ``store.version``) with every
    shard's router keys recomputed by ``keys_fn`` and ``router`` as the version's router.

    ``router`` needs ``router_id`` (non-empty str) and ``router_layers`` (must equal the store's);
    other JSON-able keys (adapter path, training command...) are kept as provenance. Returns the
    new snapshot, or ``store`` itself when version N already has this router (nothing written).
    Raises ConfigError (no router inputs kept, bad ``router``), IdentityMismatchError (other
    layers), SchemaMismatchError (``keys_fn`` returned the wrong shape/dtype), VersionConflictError
    (another writer published after N; nothing published). On any error no version is published.
    """
    root = store.root
    base, rv = _base(store, read_version)
    ident = base.identity
    if ident.hidden_size <= 0:
        raise ConfigError(
            f"Store {str(root)!r} keeps no router inputs (x_router; identity.hidden_size=0), so its router keys "
            "cannot be recomputed.",
            hint="Encode the corpus once with `msa-encode --keep-router-inputs` (Encoder(keep_router_inputs=True)); "
                 "later routers can then be applied with `msa store reindex-router`.")
    router = _checked_router(base, router)
    shifted = router.get("shifted_layers", [])
    if shifted and shifted_keys_fn is None:
        raise ConfigError(f"Store {str(root)!r} keeps a shifted grid at layers {shifted}: rekey needs shifted_keys_fn.")
    if version_router(base.manifest, ident)["router_id"] == router["router_id"]:
        return base
    check_name("router id", router["router_id"][:16])
    check_layout(root, "a reindex")
    st = STORAGE_DTYPES[ident.dtype]
    L, H, D = ident.n_layers, ident.n_kv_heads, ident.head_dim
    entries: list[dict[str, Any]] = []
    written: list[Path] = []
    try:
        for e in base.manifest["shards"]:
            view = base._view(e["shard_id"])
            C = view.record.n_chunks
            x = view.array("x_router").read(0, L)                      # (L, C, E) storage dtype
            k = _checked(keys_fn(e["shard_id"], x), (L, C, H, D), st, "keys_fn", e["shard_id"])
            k_s = None
            if shifted:
                Ls, Cs = len(shifted), int(view.shifted_offsets[-1])
                x_s = view.array("x_router_s").read(0, Ls)              # (Ls, Cs, E)
                assert shifted_keys_fn is not None
                k_s = _checked(shifted_keys_fn(e["shard_id"], x_s), (Ls, Cs, H, D), st, "shifted_keys_fn",
                               e["shard_id"])
            rk = _write_keys(root, ident, e["shard_id"], router["router_id"], k, k_s)
            written.append(root / rk["path"])
            entries.append({**{k_: v for k_, v in e.items() if k_ != "router_keys"}, "router_keys": rk})
            if log is not None:
                log(f"re-keyed shard {e['shard_id']} ({C} chunks)")
        shards.fault_hook("rekey:written")
    except Exception as e:
        for p in written:  # nothing will name them: remove now rather than leave them to gc
            shutil.rmtree(p, ignore_errors=True)
        err = os_write_error(root, e, "a reindex") if isinstance(e, OSError) else None
        if err is None:
            raise
        raise err from e
    return _publish(base, rv, entries, router, message, lock_timeout, written)


def relabel(store: MemoryStore, router: dict[str, Any], *, message: str = "", read_version: int | None = None,
            lock_timeout: float = 60.0) -> MemoryStore:
    """Publish version N+1 = version N under ``router``, every shard's router keys kept as they are.

    For a router whose key projections equal version N's router's (the same router with other query
    projections or suffix queries, ``RouterConfig.suffix_layers``), so that its keys are the ones stored; the
    caller vouches for that (``train.reindex.key_copy_source``). Only the manifest is written, so the store
    needs no kept router inputs. ``router`` is checked as in :func:`rekey` (the store's router layers, shifted
    layers and window); returns the snapshot itself when version N already has this router.
    """
    base, rv = _base(store, read_version)
    router = _checked_router(base, router)
    prev = version_router(base.manifest, base.identity)["router_id"]
    if prev == router["router_id"]:
        return base
    check_name("router id", router["router_id"][:16])
    message = message or f"reindex router {prev[:16]} -> {router['router_id'][:16]} (same keys)"
    return _publish(base, rv, list(base.manifest["shards"]), router, message, lock_timeout, [])
