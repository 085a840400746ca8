"""Re-route a store with a new router adapter without re-encoding (``msa store reindex-router``).

Router keys are a linear map of the pooled router-layer inputs: K̄ᵣ = router_k_proj(x̄) (then
L2-normalised per head in cosine mode), so a store that kept x̄ (``x_router``, identity
``hidden_size > 0``) can get the keys of any adapter for its backbone by one small matmul per
chunk, with no backbone forward.

Two ways:
- ``reindex_router(store, adapter)`` (the default, in place): the adapter becomes the router of a
  new version of the same store (``MemoryStore.rekey``, store/rekey.py): new key arrays for every
  shard, one atomic commit; older versions keep their keys and their router and stay readable and
  restorable. The adapter's layers must equal the store's router layers. An adapter with the key
  projections of the version's router (``key_copy_source``: e.g. the default adapter for a store built by
  the same router without its suffix query: the same keys plus a suffix query) needs no new keys: the new version names it and keeps the stored ones
  (``MemoryStore.relabel``), so the store needs no kept inputs.
- ``reindex_router_to(src, dest, adapter)`` (``--dest``): a new store with the same document ids,
  texts and rows, the content K̄V̄ and x̄ restricted to the adapter's layers (which may be any
  subset of the store's), and the adapter's keys; the source is only read.
Both check the adapter against the store first (head layout, hidden size, pooling, the backbone
fingerprint when the adapter records one) and change nothing when it does not fit.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from collections.abc import Sequence
from typing import Any, Callable

import numpy as np

from msa_memory.errors import ConfigError, IdentityMismatchError
from msa_memory.schemas.records import shifted_chunk_counts

__all__ = ["reindex_router", "reindex_router_to", "router_keys_from_inputs", "check_adapter", "key_copy_source"]


def check_adapter(store: Any, adapter: Any, *, need_inputs: bool = True) -> None:
    """Raise unless ``adapter`` can re-key ``store`` (a snapshot): router inputs kept (unless not
    ``need_inputs``: keys copied, :func:`key_copy_source`), adapter layers among the store's, same head
    layout / hidden size / pooling, same backbone when recorded."""
    ident, rc = store.identity, adapter.config
    if need_inputs and ident.hidden_size <= 0:
        raise ConfigError(f"Store {str(store.root)!r} keeps no router inputs (x_router), so its router keys cannot "
                          "be recomputed.", hint="Re-encode the corpus once with `msa-encode --keep-router-inputs` "
                          "(Encoder(..., keep_router_inputs=True)); later adapters can then be applied by reindexing. "
                          "(A copy into a new store with --dest needs no inputs when the adapter is a part of the "
                          "store's own router: fewer layers or a coarser grid, e.g. `--adapter aligned` for a store "
                          "of the default adapter.)")
    checks = [("n_kv_heads", ident.n_kv_heads, rc.n_kv_heads), ("head_dim", ident.head_dim, rc.head_dim),
              ("chunk_tokens", ident.chunk_tokens, rc.chunk_tokens)]
    if ident.hidden_size > 0:
        checks.insert(2, ("hidden_size", ident.hidden_size, rc.hidden_size))
    for name, have, want in checks:
        if have != want:
            raise IdentityMismatchError(
                f"Adapter {name}={want} does not match store {str(store.root)!r} ({name}={have}): the adapter was "
                f"trained for another backbone than the store's ({ident.model_name}).",
                hint="Use an adapter trained with `msa train-router --model` set to the store's model.")
    fp = rc.extra.get("model_fingerprint") if isinstance(rc.extra, dict) else None
    if fp and fp != ident.model_fingerprint:
        raise IdentityMismatchError(
            f"Adapter was trained on backbone {str(fp)[:16]}, store {str(store.root)!r} was encoded by "
            f"{ident.model_fingerprint[:16]} ({ident.model_name}).",
            hint="Use an adapter trained with `msa train-router --model` set to the store's model.")
    missing = [l for l in rc.router_layers if l not in ident.router_layers]
    if missing:
        raise IdentityMismatchError(f"Adapter router layers {list(rc.router_layers)} include {missing}, which store "
                                    f"{str(store.root)!r} did not keep (it has {list(ident.router_layers)}).",
                                    hint="Train the adapter on a subset of the store's router layers.")
    missing = [l for l in rc.shifted_layers if l not in ident.shifted_layers]
    if missing:
        raise IdentityMismatchError(f"Adapter shifted layers {list(rc.shifted_layers)} include {missing}, where store "
                                    f"{str(store.root)!r} kept no shifted-grid inputs (it has "
                                    f"{list(ident.shifted_layers)}).",
                                    hint="Use RouterAdapter.with_shifted_layers(...) with the store's shifted layers, "
                                         "or re-encode with an adapter that shifts those layers.")
    if rc.shifted_layers and rc.shifted_window != ident.shifted_window:
        raise IdentityMismatchError(f"Adapter's shifted grid has windows of {rc.shifted_window or rc.chunk_tokens} tokens, "
                                    f"store {str(store.root)!r} kept the inputs of windows of "
                                    f"{ident.shifted_window or ident.chunk_tokens} tokens.",
                                    hint=f"Use RouterAdapter.with_shifted_layers(layers, window={ident.shifted_window}), "
                                         "or re-encode with the adapter's grid.")


def key_copy_source(store: Any, adapter: Any, source_adapter: Any = None) -> Any:
    """The router that built ``store``'s version when ``adapter`` is a part of it, else None.

    A part: the same weights at a subset of its router layers, with its shifted grid at a subset of its
    shifted layers (same window) or none; suffix queries (``RouterConfig.suffix_layers``) do not count, on
    either side: they read the same keys. Such an adapter's router keys are rows the store already holds,
    so :func:`reindex_router_to` copies them instead of recomputing them from router inputs. The source
    router is ``source_adapter`` (its fingerprint must be the version's router id) or the shipped adapter
    of that id (``msa_memory.routing.registry.shipped_router``).
    """
    ident, rc = store.identity, adapter.config
    if source_adapter is None:
        from msa_memory.routing.registry import shipped_router

        source_adapter = shipped_router(ident.router_id)
        if source_adapter is None:
            return None
    elif source_adapter.fingerprint() != ident.router_id:
        raise IdentityMismatchError(f"source_adapter has router id {source_adapter.fingerprint()}; version "
                                    f"{store.version} of store {str(store.root)!r} is routed by {ident.router_id}.",
                                    hint="Pass the adapter the store was encoded (or last re-keyed) with.")
    src_rc = source_adapter.config
    if not set(rc.router_layers) <= set(src_rc.router_layers) or not set(rc.shifted_layers) <= set(src_rc.shifted_layers):
        return None
    part = source_adapter.without_suffix_queries().subset(list(rc.router_layers)).with_shifted_layers(
        list(rc.shifted_layers))
    return source_adapter if part.fingerprint() == adapter.without_suffix_queries().fingerprint() else None


def reindex_router(store: Any, adapter: Any, *args: Any, message: str | None = None, adapter_path: str | None = None,
                   log: Callable[[str], None] | None = None, source_adapter: Any = None) -> tuple[Any, dict[str, Any]]:
    """Commit ``adapter``'s router keys for every document of ``store`` as a new version of it.

    (The earlier form ``reindex_router(src, dest_path, adapter)`` still works and means
    ``reindex_router_to(src, dest_path, adapter)``: a copy into a new store.)

    Parameters
    ----------
    store : MemoryStore
        The snapshot to re-key (the new version is prepared against its version; another writer
        publishing meanwhile raises VersionConflictError and publishes nothing).
    adapter : RouterAdapter
        The new router: its layers must equal the store's router layers.
    message : str, optional
        Commit message. ``adapter_path`` is recorded in the version's router as provenance.
    source_adapter : RouterAdapter, optional
        The router of ``store``'s version (its fingerprint must be the version's router id); default the
        shipped adapter of that id. When ``adapter`` has its key projections (:func:`key_copy_source`: e.g.
        the default adapter for a store built by the same router without its suffix query), the new
        version keeps the stored keys (``MemoryStore.relabel``): nothing recomputed, no router inputs needed.

    Returns
    -------
    (MemoryStore, dict)
        The new snapshot (``store`` itself when its version already has this router) and
        ``{"docs", "chunks", "shards", "layers", "router_id", "version", "seconds", "seconds_keys", "copied"}``
        (``copied``: the keys were kept).

    Raises
    ------
    ConfigError
        The store keeps no router inputs and ``adapter``'s keys are not the stored ones.
    IdentityMismatchError
        Adapter for another backbone (head layout, hidden size, pooling, fingerprint) or other layers.
    """
    if isinstance(adapter, (str, os.PathLike)):  # the earlier (src, dest, adapter) form: copy to a new store
        if len(args) != 1:
            raise ConfigError("reindex_router(store, adapter) re-keys in place; to copy into a new store call "
                              "reindex_router_to(store, dest, adapter).")
        return reindex_router_to(store, adapter, args[0], message=message, log=log)
    if args:
        raise ConfigError(f"reindex_router(store, adapter) takes no further positional arguments, got {args!r}.")
    same_keys = key_copy_source(store, adapter, source_adapter) is not None
    check_adapter(store, adapter, need_inputs=not same_keys)
    ident, rc = store.identity, adapter.config
    if list(rc.router_layers) != list(ident.router_layers):
        raise IdentityMismatchError(
            f"Adapter router layers {list(rc.router_layers)} differ from store {str(store.root)!r}'s "
            f"{list(ident.router_layers)}; a new version of the same store can only re-key the same layers.",
            hint="Copy into a new store restricted to the adapter's layers with `msa store reindex-router STORE "
                 "--adapter DIR --dest NEW`, or train on the store's layers (msa train-router --layers "
                 f"{','.join(map(str, ident.router_layers))} --keep-layers).")
    if list(rc.shifted_layers) != list(ident.shifted_layers):
        raise IdentityMismatchError(
            f"Adapter shifted layers {list(rc.shifted_layers)} differ from store {str(store.root)!r}'s "
            f"{list(ident.shifted_layers)}; a new version of the same store keeps the same shifted grid.",
            hint=f"Use adapter.with_shifted_layers({list(ident.shifted_layers)}), or copy into a new store with "
                 "`msa store reindex-router STORE --adapter DIR --dest NEW`.")
    t0 = time.perf_counter()
    t_keys = [0.0]
    n_chunks = [0]

    def make_keys_fn(layers: Sequence[int], count: bool) -> Callable[[str, np.ndarray], np.ndarray]:
        def keys_fn(shard_id: str, x: np.ndarray) -> np.ndarray:  # (L, C, E) -> (L, C, H, D), storage dtype
            t1 = time.perf_counter()
            k = np.stack([router_keys_from_inputs(adapter, l, x[i], ident.dtype) for i, l in enumerate(layers)])
            t_keys[0] += time.perf_counter() - t1
            n_chunks[0] += x.shape[1] if count else 0
            return k
        return keys_fn

    router = {"router_id": adapter.fingerprint(), "router_layers": list(rc.router_layers),
              "score": rc.score, "source": rc.source}
    if rc.shifted_layers:
        router["shifted_layers"] = list(rc.shifted_layers)
    if rc.shifted_window is not None:
        router["shifted_window"] = rc.shifted_window
    if adapter_path is not None:
        router["adapter_path"] = str(adapter_path)
    cmd = rc.extra.get("command") if isinstance(rc.extra, dict) else None
    if cmd:
        router["trained_by"] = str(cmd)
    if same_keys:   # the stored keys are this router's: a new version names it, nothing else is written
        new = store.relabel(router, message=message or "")
        n_chunks[0] = int(new.stats()["n_chunks"]) if new.version != store.version else 0
    else:
        new = store.rekey(router, make_keys_fn(rc.router_layers, True), message=message or "", log=log,
                          shifted_keys_fn=make_keys_fn(rc.shifted_layers, False) if rc.shifted_layers else None)
    stats = {"docs": int(new.stats()["n_docs"]), "chunks": int(n_chunks[0]), "shards": len(new.manifest["shards"]),
             "layers": list(rc.router_layers), "router_id": router["router_id"], "version": new.version,
             "unchanged": new.version == store.version, "copied": same_keys,
             "seconds": round(time.perf_counter() - t0, 3), "seconds_keys": round(t_keys[0], 3)}
    return new, stats


def router_keys_from_inputs(adapter: Any, layer: int, x: np.ndarray, logical_dtype: str,
                            batch: int = 65536) -> np.ndarray:
    """(C, E) stored router inputs of decoder layer ``layer`` → (C, H, D) stored router keys.

    The exact computation of ``Encoder.encode_tokens``: ``adapter.keys_from_pooled`` in fp32, then
    narrowed to the storage dtype. ``x`` is in storage form (bf16 as uint16).
    """
    import torch

    from msa_memory.schemas.records import from_float32, to_float32

    out = []
    for s in range(0, x.shape[0], batch):
        xf = torch.from_numpy(to_float32(x[s:s + batch], logical_dtype))           # (c, E) fp32
        with torch.no_grad():
            k = adapter.keys_from_pooled(int(layer), xf.to(next(adapter.parameters()).device))  # (c, H, D)
        out.append(from_float32(k.float().cpu().numpy(), logical_dtype))
    if not out:
        h, d = adapter.config.n_kv_heads, adapter.config.head_dim
        return np.zeros((0, h, d), dtype=from_float32(np.zeros(1, np.float32), logical_dtype).dtype)
    return np.concatenate(out)


def reindex_router_to(src: Any, dest: str | Path, adapter: Any, *, docs_per_shard: int = 4096,
                      message: str | None = None, log: Callable[[str], None] | None = None,
                      source_adapter: Any = None) -> tuple[Any, dict[str, Any]]:
    """Write ``src`` (a ``MemoryStore`` snapshot) re-keyed with ``adapter`` into a new store at ``dest``.

    Parameters
    ----------
    src : MemoryStore
        The store to re-key; must keep router inputs (``identity.hidden_size > 0``), unless ``adapter``
        is a part of the router that built it (:func:`key_copy_source`: the same weights at fewer layers
        or with less or none of its shifted grid, e.g. ``aligned`` for a store of the default). A part's
        keys are copied, not recomputed (kept or not, the inputs then only travel to the copy).
    dest : path
        Where the new store is created (must not exist or be empty).
    adapter : RouterAdapter
        The new router; its layers must be a subset of ``src``'s router layers and its head layout
        must match the store's.
    docs_per_shard : int, default 4096
    message : str, optional
        Commit message (default names the source and the adapter).
    source_adapter : RouterAdapter, optional
        The router of ``src``'s version, to tell a part of it (its fingerprint must be the version's router
        id); default the shipped adapter of that id.

    Returns
    -------
    (MemoryStore, dict)
        The new store's snapshot and timings: ``{"docs", "chunks", "seconds", "seconds_keys", "copied", ...}``.

    Raises
    ------
    ConfigError
        The source keeps no router inputs and the adapter is not a part of its router.
    IdentityMismatchError
        Adapter layers/head layout/pooling incompatible with the store.
    """
    from msa_memory.schemas.records import EncodedChunks
    from msa_memory.store import create_store, write_shard

    t0 = time.perf_counter()
    ident = src.identity
    rc = adapter.config
    # a part of the store's own router: its keys are rows the store holds, copied (bit for bit what the encoder
    # wrote, where keys recomputed from the stored bf16 inputs would differ by rounding); inputs travel if kept
    copy = key_copy_source(src, adapter, source_adapter) is not None
    check_adapter(src, adapter, need_inputs=not copy)
    keep_x = ident.hidden_size > 0
    pos = [ident.router_layers.index(l) for l in rc.router_layers]  # positions of the kept layers
    new_ident = dataclasses.replace(ident, router_id=adapter.fingerprint(), router_layers=tuple(rc.router_layers),
                                    shifted_layers=tuple(rc.shifted_layers), shifted_window=rc.shifted_window,
                                    extra={**ident.extra, "reindexed_from": {"root": str(src.root), "version": src.version,
                                                                               "router_id": ident.router_id}})
    # 1. read: document rows, pooled inputs of the kept layers, content K̄V̄
    cols = ["doc_id", "source_path", "passage_index", "byte_start", "byte_end", "file_sha256", "n_tokens",
            "n_chunks", "text"]
    tab = src.documents(cols).to_pydict()
    ids = np.asarray(tab["doc_id"], dtype=np.int64)
    t_read = time.perf_counter()
    rows = _router_rows(src, adapter, pos, copy, keep_x)
    xs, keys, chunk_doc, xs_shifted, keys_shifted, t_keys = (rows.xs, rows.keys, rows.chunk_doc, rows.xs_shifted,
                                                             rows.keys_shifted, rows.seconds_keys)
    # documents in chunk order (contiguous runs of one id)
    order_ids = chunk_doc[np.r_[True, chunk_doc[1:] != chunk_doc[:-1]]] if chunk_doc.size else np.zeros(0, np.int64)
    row = {int(d): i for i, d in enumerate(ids)}
    n_ch = np.asarray([tab["n_chunks"][row[int(d)]] for d in order_ids], dtype=np.int64)
    offs = np.concatenate([[0], np.cumsum(n_ch)])
    n_tok = np.asarray([tab["n_tokens"][row[int(d)]] for d in order_ids], dtype=np.int64)
    n_chunks_shifted = shifted_chunk_counts(n_tok, ident.chunk_tokens, ident.shifted_window)
    offs_shifted = np.concatenate([[0], np.cumsum(n_chunks_shifted)])
    if log is not None:
        log(f"read {len(order_ids)} docs / {int(offs[-1])} chunks, keys for {len(pos)} layers in {t_keys:.2f}s")
    # 2. write: a new store with the same ids
    dest_store = create_store(dest, new_ident, message="create (reindex-router)")
    if len(ids):
        dest_store.reserve_ids(int(ids.max()) + 1)
    recs = []
    for s in range(0, len(order_ids), docs_per_shard):
        d_ids = order_ids[s:s + docs_per_shard]
        e = min(s + docs_per_shard, len(order_ids))
        c0, c1, s0, s1 = int(offs[s]), int(offs[e]), int(offs_shifted[s]), int(offs_shifted[e])
        kv = np.concatenate(src.load_kv(d_ids))[:, pos]                 # (C, L', 2, H, D)
        shifted = {} if not rc.shifted_layers else {
            "n_chunks_s": n_chunks_shifted[s:e], "k_router_s": np.stack([k[s0:s1] for k in keys_shifted]),
            "x_router_s": np.stack([x[s0:s1] for x in xs_shifted]) if xs_shifted else None}
        enc = EncodedChunks(doc_ids=d_ids.astype(np.int64), n_tokens=n_tok[s:e],
                            n_chunks=n_ch[s:e], k_router=np.stack([k[c0:c1] for k in keys]),
                            kv=np.ascontiguousarray(kv), dtype=ident.dtype,
                            x_router=np.stack([x[c0:c1] for x in xs]) if xs else None, **shifted)
        recs.append(write_shard(dest, f"reindex-{s // docs_per_shard:05d}", _passages(tab, row, d_ids), enc))
    msg = message or f"reindex-router from {src.root} v{src.version} with router {new_ident.router_id}"
    out = dest_store.commit(add=recs, message=msg)
    stats = {"docs": int(len(order_ids)), "chunks": int(offs[-1]), "layers": list(rc.router_layers),
             "seconds": round(time.perf_counter() - t0, 3), "seconds_read": round(t_read - t0, 3),
             "seconds_keys": round(t_keys, 3), "router_id": new_ident.router_id, "version": out.version,
             "copied": copy}
    return out, stats


@dataclasses.dataclass
class _RouterRows:
    """What :func:`reindex_router_to` reads of the kept layers: pooled inputs (if kept) and router keys, on the
    aligned grid and on the adapter's shifted layers, and the aligned chunks' documents."""

    xs: list[np.ndarray]
    keys: list[np.ndarray]
    chunk_doc: np.ndarray
    xs_shifted: list[np.ndarray]
    keys_shifted: list[np.ndarray]
    seconds_keys: float


def _router_rows(src: Any, adapter: Any, pos: list[int], copy: bool, keep_x: bool) -> _RouterRows:
    """The kept layers' rows of ``src``: router keys copied (``copy``: a part of the store's router) or
    recomputed from the kept inputs with ``adapter``."""
    ident, rc = src.identity, adapter.config
    xs, keys = [], []
    chunk_doc = None
    t_keys = 0.0
    for p, l in zip(pos, rc.router_layers):
        if keep_x:
            x, cd = src.router_inputs(p)                               # (C, E), (C,)
            xs.append(x)
        if copy:
            k, cd = src.router_keys(p)
        else:
            t1 = time.perf_counter()
            k = router_keys_from_inputs(adapter, l, x, ident.dtype)
            t_keys += time.perf_counter() - t1
        keys.append(k)
        if chunk_doc is None:
            chunk_doc = cd
    assert chunk_doc is not None
    xs_shifted, keys_shifted = [], []                       # the shifted grid at the adapter's shifted layers
    for l in rc.shifted_layers:
        j = ident.shifted_layers.index(l)
        if keep_x:
            x, _ = src.router_inputs_shifted(j)                        # (Cs, E), documents in the same order
            xs_shifted.append(x)
        if copy:
            keys_shifted.append(src.router_keys_shifted(j)[0])
        else:
            t1 = time.perf_counter()
            keys_shifted.append(router_keys_from_inputs(adapter, l, x, ident.dtype))
            t_keys += time.perf_counter() - t1
    return _RouterRows(xs, keys, chunk_doc, xs_shifted, keys_shifted, t_keys)


def _passages(tab: dict[str, list[Any]], row: dict[int, int], d_ids: np.ndarray) -> list[Any]:
    """The ``Passage`` records of documents ``d_ids`` from their document-table rows."""
    from msa_memory.schemas.records import Passage

    return [Passage(text=tab["text"][row[int(d)]], source_path=tab["source_path"][row[int(d)]],
                    passage_index=int(tab["passage_index"][row[int(d)]]),
                    byte_start=int(tab["byte_start"][row[int(d)]]), byte_end=int(tab["byte_end"][row[int(d)]]),
                    file_sha256=tab["file_sha256"][row[int(d)]]) for d in d_ids]
