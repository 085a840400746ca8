"""Re-route a store with a new router adapter without re-encoding (``msa store reindex-router``).

Router keys are a linear map of the pooled router-layer inputs: K̄ᵣ = router_k_proj(x̄) (then
L2-normalised per head in cosine mode), so a store that kept x̄ (``x_router``, identity
``hidden_size > 0``) can get the keys of any adapter whose router layers it kept, by one small
matmul per chunk, with no backbone forward.

The store records the router that produced its keys (``identity.router_id``) and refuses writers
with another identity, so the re-keyed documents go into a *new store* (``dest``): same document
ids (reserved up front), same texts and rows, the same content K̄V̄ and x̄ (restricted to the new
adapter's layers), new ``k_router``; one commit publishes it. The source store is only read.
What this module does not do: change a store's identity in place (the store format has no verb
for that; see the report), or encode text.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from msa_memory.errors import ConfigError, IdentityMismatchError

__all__ = ["reindex_router", "router_keys_from_inputs"]


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


def reindex_router(src: Any, dest: str | Path, adapter: Any, *, docs_per_shard: int = 4096,
                   message: str | None = None, log: Callable[[str], None] | None = None) -> tuple[Any, dict[str, Any]]:
    """Write ``src`` (a ``MemoryStore`` snapshot) re-keyed with ``adapter`` into a new store at ``dest``.

    Parameters
    ----------
    src : MemoryStore
        The store to re-key; must keep router inputs (``identity.hidden_size > 0``).
    dest : path
        Where the new store is created (must not exist or be empty).
    adapter : RouterAdapter
        The new router; its layers must be a subset of ``src``'s router layers and its head layout
        must match the store's.
    docs_per_shard : int, default 4096
    message : str, optional
        Commit message (default names the source and the adapter).

    Returns
    -------
    (MemoryStore, dict)
        The new store's snapshot and timings: ``{"docs", "chunks", "seconds", "seconds_keys", ...}``.

    Raises
    ------
    ConfigError
        The source keeps no router inputs.
    IdentityMismatchError
        Adapter layers/head layout/pooling incompatible with the store.
    """
    import dataclasses

    from msa_memory.schemas.records import EncodedChunks, Passage
    from msa_memory.store import create_store, write_shard

    t0 = time.perf_counter()
    ident = src.identity
    rc = adapter.config
    if ident.hidden_size <= 0:
        raise ConfigError(f"Store {str(src.root)!r} keeps no router inputs (x_router), so its router keys cannot "
                          "be recomputed.", hint="Re-encode the corpus once with Encoder(..., keep_router_inputs=True) "
                          "(msa-encode has no flag for it yet); later adapters can then be applied by reindexing.")
    missing = [l for l in rc.router_layers if l not in ident.router_layers]
    if missing:
        raise IdentityMismatchError(f"Adapter router layers {list(rc.router_layers)} include {missing}, which store "
                                    f"{str(src.root)!r} did not keep (it has {list(ident.router_layers)}).",
                                    hint="Train the adapter on a subset of the store's router layers.")
    for name, have, want in (("n_kv_heads", ident.n_kv_heads, rc.n_kv_heads), ("head_dim", ident.head_dim, rc.head_dim),
                             ("hidden_size", ident.hidden_size, rc.hidden_size),
                             ("chunk_tokens", ident.chunk_tokens, rc.chunk_tokens)):
        if have != want:
            raise IdentityMismatchError(f"Adapter {name}={want} does not match store {str(src.root)!r} ({name}={have}).")
    pos = [ident.router_layers.index(l) for l in rc.router_layers]  # positions of the kept layers
    new_ident = dataclasses.replace(ident, router_id=adapter.fingerprint(), router_layers=tuple(rc.router_layers),
                                    extra={**ident.extra, "reindexed_from": {"root": str(src.root), "version": src.version,
                                                                               "router_id": ident.router_id}})
    # 1. read: document rows, pooled inputs of the kept layers, content K̄V̄
    cols = ["doc_id", "source_path", "passage_index", "byte_start", "byte_end", "file_sha256", "n_tokens",
            "n_chunks", "text"]
    tab = src.documents(cols).to_pydict()
    ids = np.asarray(tab["doc_id"], dtype=np.int64)
    t_read = time.perf_counter()
    xs, keys = [], []
    chunk_doc = None
    t_keys = 0.0
    for p, l in zip(pos, rc.router_layers):
        x, cd = src.router_inputs(p)                                   # (C, E), (C,)
        if chunk_doc is None:
            chunk_doc = cd
        t1 = time.perf_counter()
        keys.append(router_keys_from_inputs(adapter, l, x, ident.dtype))
        t_keys += time.perf_counter() - t1
        xs.append(x)
    assert chunk_doc is not None
    # documents in chunk order (contiguous runs of one id)
    order_ids = chunk_doc[np.r_[True, chunk_doc[1:] != chunk_doc[:-1]]] if chunk_doc.size else np.zeros(0, np.int64)
    row = {int(d): i for i, d in enumerate(ids)}
    n_ch = np.asarray([tab["n_chunks"][row[int(d)]] for d in order_ids], dtype=np.int64)
    offs = np.concatenate([[0], np.cumsum(n_ch)])
    if log is not None:
        log(f"read {len(order_ids)} docs / {int(offs[-1])} chunks, keys for {len(pos)} layers in {t_keys:.2f}s")
    # 2. write: a new store with the same ids
    dest_store = create_store(dest, new_ident, message="create (reindex-router)")
    if len(ids):
        dest_store.reserve_ids(int(ids.max()) + 1)
    recs = []
    for s in range(0, len(order_ids), docs_per_shard):
        d_ids = order_ids[s:s + docs_per_shard]
        c0, c1 = int(offs[s]), int(offs[min(s + docs_per_shard, len(order_ids))])
        kv = np.concatenate(src.load_kv(d_ids))[:, pos]                 # (C, L', 2, H, D)
        passages = [Passage(text=tab["text"][row[int(d)]], source_path=tab["source_path"][row[int(d)]],
                            passage_index=int(tab["passage_index"][row[int(d)]]),
                            byte_start=int(tab["byte_start"][row[int(d)]]), byte_end=int(tab["byte_end"][row[int(d)]]),
                            file_sha256=tab["file_sha256"][row[int(d)]]) for d in d_ids]
        enc = EncodedChunks(doc_ids=d_ids.astype(np.int64),
                            n_tokens=np.asarray([tab["n_tokens"][row[int(d)]] for d in d_ids], dtype=np.int64),
                            n_chunks=n_ch[s:s + docs_per_shard], k_router=np.stack([k[c0:c1] for k in keys]),
                            kv=np.ascontiguousarray(kv), dtype=ident.dtype,
                            x_router=np.stack([x[c0:c1] for x in xs]))
        recs.append(write_shard(dest, f"reindex-{s // docs_per_shard:05d}", passages, enc))
    msg = message or f"reindex-router from {src.root} v{src.version} with router {new_ident.router_id}"
    out = dest_store.commit(add=recs, message=msg)
    stats = {"docs": int(len(order_ids)), "chunks": int(offs[-1]), "layers": list(rc.router_layers),
             "seconds": round(time.perf_counter() - t0, 3), "seconds_read": round(t_read - t0, 3),
             "seconds_keys": round(t_keys, 3), "router_id": new_ident.router_id, "version": out.version}
    return out, stats
