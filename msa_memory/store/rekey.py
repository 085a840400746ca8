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

from collections.abc import Callable
from typing import Any

import crc32c
import numpy as np

from msa_memory.errors import ConfigError, SchemaMismatchError, ShardCorruptError
from msa_memory.schemas.records import STORAGE_DTYPES, StoreIdentity
from msa_memory.store import _manifest, commit as _commit, lexical, shards
from msa_memory.store._layout import (LEXICAL_DIR, ROUTER_KEYS_DIR, STAGING_DIR, check_files, check_layout, check_name,
                                     os_write_error, token)
from msa_memory.store._manifest import version_router
from msa_memory.store._zarrshard import write_array
from msa_memory.store.backend import Backend
from msa_memory.store.lexical import lexical_source
from msa_memory.store.reader import Snapshot

__all__ = ["rekey", "relabel", "reindex_lexical", "router_key_paths", "verify_keys", "KeysFn"]

#: keys_fn(shard_id, x_router (L, C, E) storage dtype) -> (L, C, H, D) keys in storage dtype.
KeysFn = Callable[[str, np.ndarray], np.ndarray]


def router_key_paths(manifest: dict[str, Any]) -> set[str]:
    """Store-relative directories of the router-key arrays a manifest names."""
    return {e["router_keys"]["path"] for e in manifest["shards"] if "router_keys" in e}


def verify_keys(be: Backend, entry: dict[str, Any]) -> list[tuple[str, str]]:
    """(path, problem) for each missing or damaged file of a shard entry's router keys."""
    return check_files(be, entry["router_keys"]["path"], entry["router_keys"]["files"])


def _write_keys(be: Backend, identity: StoreIdentity, shard_id: str, router_id: str,
                keys: np.ndarray, keys_s: np.ndarray | None = None) -> dict[str, Any]:
    """Write one shard's new keys (and its shifted grid's, ``keys_s``) durably under ``router_keys/`` (staged
    and renamed where the backend can; else in place: the manifest naming them is what commits them);
    returns the entry's ``router_keys``."""
    name = f"{shard_id}.{router_id[:16]}.{token()}"
    final = f"{ROUTER_KEYS_DIR}/{name}"
    stage = f"{STAGING_DIR}/rk-{name}" if be.supports_atomic_rename else final
    H, D = identity.n_kv_heads, identity.head_dim
    files: dict[str, dict[str, int]] = {}
    for arr, k, dims in (("k_router", keys, ["layer", "chunk", "head", "dim"]),
                         ("k_router_s", keys_s, ["shifted_layer", "shifted_chunk", "head", "dim"])):
        if k is None:
            continue
        written = write_array(be, f"{stage}/{arr}", k, (1, k.shape[1], H, D),
                              {"msa_logical_dtype": identity.dtype, "dims": dims,
                               "msa_router_id": router_id, "msa_shard_id": shard_id})
        files.update({f"{arr}/{rel}": {"size": size, "crc32c": crc} for rel, (size, crc) in written.items()})
    be.sync_prefix(stage)
    shards.fault_hook("rekey:staged")
    if stage != final:
        be.rename_prefix(stage, final)
    return {"path": final, "files": dict(sorted(files.items()))}


def _checked(k: Any, shape: tuple[int, ...], st: Any, fn: str, shard_id: str) -> np.ndarray:
    if not isinstance(k, np.ndarray) or k.shape != shape or k.dtype != st:
        raise SchemaMismatchError(
            f"{fn} returned {getattr(k, 'dtype', type(k).__name__)} {getattr(k, 'shape', '')} for shard "
            f"{shard_id!r}; expected {st} {shape} (layers, chunks, kv heads, head dim).")
    return k


def _base(store: Snapshot, read_version: int | None) -> tuple[Snapshot, int]:
    """The snapshot a new version is made from (``read_version``, default ``store``'s) and its number."""
    rv = store.version if read_version is None else int(read_version)
    return (store if store.version == rv else store.checkout_version(rv)), rv


def _checked_router(base: Snapshot, router: Any) -> dict[str, Any]:
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


def _publish(base: Snapshot, rv: int, entries: list[dict[str, Any]], router: dict[str, Any], message: str,
             lock_timeout: float, written: list[str]) -> Any:
    """Publish version ``rv`` + 1 = ``base`` with shard ``entries`` under ``router`` (the usual single commit
    point); another writer's version since ``rv`` raises VersionConflictError and removes ``written``."""
    be, ident = base.backend, base.identity
    with _commit.writer_lock(be, lock_timeout, "a reindex"):
        shards.fault_hook("rekey:locked")
        latest = _manifest.latest_version(be)
        if latest != rv:
            _remove(be, written)
            _conflict(be, latest, rv, "reindex")
        prev = version_router(base.manifest, ident)
        m = _commit.new_manifest(
            latest + 1, latest, "reindex", message or f"reindex router {prev['router_id'][:16]} -> "
            f"{router['router_id'][:16]}", base._identity_sha, entries, list(base.manifest["deletions"]),
            base.manifest["used_id_ranges"], dict(base.manifest["stats"]),
            {"added_docs": 0, "deleted_docs": 0, "added_shards": [], "removed_shards": [],
             "previous_router_id": prev["router_id"]}, router=router)
        return _commit.publish(base, m)


def _remove(be: Backend, written: list[str]) -> None:
    """Remove what a reindex wrote and nothing names (rather than leave it to gc)."""
    for key in written:
        try:
            be.delete_prefix(key)
        except OSError:
            pass


def _conflict(be: Backend, latest: int, rv: int, what: str) -> None:
    from msa_memory.errors import VersionConflictError

    raise VersionConflictError(
        f"Store {str(be)!r} is at version {latest}, but this {what} read version {rv}; nothing was published.",
        hint=f"Re-open the store and run the {what} again.")


def rekey(store: Snapshot, router: dict[str, Any], keys_fn: KeysFn, *, message: str = "",
          read_version: int | None = None, lock_timeout: float = 60.0,
          log: Callable[[str], None] | None = None, shifted_keys_fn: KeysFn | None = None) -> Any:
    """Publish version N+1 = version N (``read_version``, default ``store.version``) with every
    shard's router keys recomputed by ``keys_fn`` and ``router`` as the version's router.

    ``router`` needs ``router_id`` (non-empty str) and ``router_layers`` (must equal the store's);
    other JSON-able keys (adapter path, training command...) are kept as provenance. Returns the
    new snapshot, or ``store`` itself when version N already has this router (nothing written).
    Raises ConfigError (no router inputs kept, bad ``router``), IdentityMismatchError (other
    layers), SchemaMismatchError (``keys_fn`` returned the wrong shape/dtype), VersionConflictError
    (another writer published after N; nothing published). On any error no version is published.
    """
    root = store.backend
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
    written: list[str] = []
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
            written.append(rk["path"])
            entries.append({**{k_: v for k_, v in e.items() if k_ != "router_keys"}, "router_keys": rk})
            if log is not None:
                log(f"re-keyed shard {e['shard_id']} ({C} chunks)")
        shards.fault_hook("rekey:written")
    except Exception as e:
        _remove(root, written)  # nothing will name them: remove now rather than leave them to gc
        err = os_write_error(root, e, "a reindex")
        if err is None:
            raise
        raise err from e
    return _publish(base, rv, entries, router, message, lock_timeout, written)


def relabel(store: Snapshot, router: dict[str, Any], *, message: str = "", read_version: int | None = None,
            lock_timeout: float = 60.0) -> Any:
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


# ----------------------------------------------------------------------------- lexical sidecars


def _write_sidecar(be: Backend, shard_id: str, analyzer: str, data: bytes) -> dict[str, Any]:
    """Write one shard's postings of ``analyzer`` durably as ``lexical/SHARD.ANALYZER.HEX.parquet`` (a fresh
    name: written once); returns the entry's ``lexical``."""
    key = f"{LEXICAL_DIR}/{shard_id}.{analyzer}.{token()}.parquet"
    shards.fault_hook("lexical:staged")
    be.write(key, data, exclusive=True)
    return {"path": key, "analyzer": analyzer, "size": len(data), "crc32c": crc32c.crc32c(data)}


def reindex_lexical(store: Snapshot, *, message: str = "", read_version: int | None = None,
                    lock_timeout: float = 60.0, log: Callable[[str], None] | None = None) -> Any:
    """Publish version N+1 = version N (``read_version``, default ``store.version``) with postings of the
    analyzer this release writes (``lexical.ANALYZER``, ``lex2``) for every shard that lacks them (none, or
    only ``lex1`` ones: this upgrades a store encoded before), written from the documents' stored text as
    sidecars; returns the new snapshot, or the snapshot of N when every shard has them already (nothing written).

    Raises VersionConflictError when another writer published after N (nothing published, the sidecars
    written are removed). On any error no version is published.
    """
    be = store.backend
    base, rv = _base(store, read_version)
    analyzer = lexical.ANALYZER
    todo = [e for e in base.manifest["shards"] if lexical_source(base, e, analyzer) is None]
    if not todo:
        return base
    check_layout(be, "a lexical reindex")
    entries = {e["shard_id"]: e for e in base.manifest["shards"]}
    written: list[str] = []
    try:
        for e in todo:
            sid = e["shard_id"]
            view = base._view(sid)
            tab = view.table(["doc_id", "text"])
            if not np.array_equal(tab.column("doc_id").to_numpy(), view.record.doc_ids):
                raise ShardCorruptError(f"Document table of shard {sid!r} does not match its record.",
                                        hint="Run `msa store verify STORE`.")
            texts = tab.column("text").to_pylist()
            sc = _write_sidecar(be, sid, analyzer, lexical.postings_bytes(view.record.doc_ids, texts, analyzer))
            written.append(sc["path"])
            entries[sid] = {**e, "lexical": sc}
            if log is not None:
                log(f"lexical postings of shard {sid} ({view.record.n_docs} documents)")
        shards.fault_hook("lexical:written")
        with _commit.writer_lock(be, lock_timeout, "a lexical reindex"):
            latest = _manifest.latest_version(be)
            if latest != rv:
                _conflict(be, latest, rv, "lexical reindex")
            m = _commit.new_manifest(
                latest + 1, latest, "reindex", message or f"lexical index ({analyzer}) for {len(todo)} shard(s)",
                base._identity_sha, [entries[e["shard_id"]] for e in base.manifest["shards"]],
                list(base.manifest["deletions"]), base.manifest["used_id_ranges"], dict(base.manifest["stats"]),
                {"added_docs": 0, "deleted_docs": 0, "added_shards": [], "removed_shards": [],
                 "lexical_analyzer": analyzer}, router=base.manifest.get("router"))
            return _commit.publish(base, m)
    except BaseException as e:
        _remove(be, written)  # nothing names them: remove now rather than leave them to gc
        err = os_write_error(be, e, "a lexical reindex")
        if err is None:
            raise
        raise err from e
