"""The resident index of a store: its router keys read once into memory, where routing scores them.

:func:`load_resident_index` is what ``runtime.Memory`` opens a store version with: it checks that the keys
fit (host and devices, :func:`check_router_key_room`), reads one key tensor per router layer with its chunk
→ dense document map (a layer that also keys the shifted grid holds both grids' keys, document by document:
:func:`interleave_grids`), and builds a :class:`~msa_memory.routing.index.RouterIndex`, a
:class:`~msa_memory.routing.parallel.ShardedRouterIndex` over several devices or this rank's
:class:`~msa_memory.routing.parallel.DistributedRouterIndex`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from msa_memory.errors import ConfigError, RuntimeMemoryError
from msa_memory.routing.config import RoutingConfig
from msa_memory.routing.index import RouterIndex
from msa_memory.routing.parallel import DistributedRouterIndex, ShardedRouterIndex, shard_bounds, shard_rows
from msa_memory.routing.scoring import torch_dtype_of

__all__ = ["ResidentIndex", "load_resident_index", "check_router_key_room", "free_bytes", "interleave_grids"]


@dataclass
class ResidentIndex:
    """A store version's router keys, resident: the index and the dense document order it routes over."""

    index: Any
    """RouterIndex, ShardedRouterIndex or DistributedRouterIndex."""
    doc_ids: np.ndarray
    """(N,) int64 store document ids of the dense documents 0..N-1."""
    chunk_doc: np.ndarray
    """(C,) dense document of every aligned chunk (the shifted grid's chunks are routing-only)."""
    key_bytes: int
    """Bytes of all shards' router keys."""


def load_resident_index(store: Any, routing: RoutingConfig, device: Any, devices: Sequence[str] | None = None,
                        distributed: Any = False) -> ResidentIndex:
    """Read a store version's router keys into a resident index on ``device`` (one :class:`RouterIndex`), on
    ``devices`` (a :class:`ShardedRouterIndex`, several) or this rank's shard of them (``distributed``: a
    :class:`DistributedRouterIndex`). Refuses, before reading, keys that cannot fit where they go."""
    import torch

    ident = store.identity
    n_shards = len(devices) if devices else (_world_size(distributed) if distributed else 1)
    key_bytes = check_router_key_room(store, devices or [device], n_shards)
    # 1. router keys: one resident tensor per router layer, shared chunk → dense doc map; a layer with
    #    the shifted grid too holds both grids' keys, document by document, with a map of its own
    dt = torch_dtype_of(ident.dtype)
    keys, maps, chunk_doc, shifted = [], [], None, {p: j for j, p in enumerate(ident.shifted_positions)}
    cut: tuple[int, int] | None = None     # distributed: this rank's document range, its rows kept alone
    both: tuple[np.ndarray, np.ndarray] | None = None      # (row order, map) shared by the shifted layers
    for pos in range(ident.n_layers):
        k_np, docs = store.router_keys(pos)
        if chunk_doc is None:
            doc_ids, chunk_doc = np.unique(docs, return_inverse=True)
            first_docs = docs
        elif not np.array_equal(docs, first_docs):
            raise RuntimeMemoryError(f"Router layer {pos} lists chunks in another order than layer 0 in store "
                                     f"{str(store.root)!r}; run `msa store verify`.")
        layer_map = chunk_doc
        if pos in shifted:
            ks_np, sdocs = store.router_keys_shifted(shifted[pos])
            if both is None:
                both = interleave_grids(docs, sdocs, doc_ids, store.root)
            k_np, layer_map = np.concatenate([k_np, ks_np])[both[0]], both[1]
        if distributed:
            if cut is None:
                bounds = shard_bounds(np.bincount(chunk_doc, minlength=len(doc_ids)), n_shards)
                rank = _rank(distributed)
                cut = int(bounds[rank]), int(bounds[rank + 1])
            rows, layer_map = shard_rows(layer_map, *cut)
            k_np = k_np[rows]
        t = torch.from_numpy(np.ascontiguousarray(k_np))
        keys.append(t.view(dt) if t.dtype != dt else t)
        maps.append(layer_map)
    assert chunk_doc is not None
    doc_ids = doc_ids.astype(np.int64)
    layer_maps = maps if shifted else maps[0]
    if distributed:
        assert cut is not None
        local = RouterIndex(keys, layer_maps, doc_ids[cut[0]:cut[1]], routing, device=device)
        index: Any = DistributedRouterIndex(local, doc_ids, bounds,
                                                 None if distributed is True else distributed)
    elif devices and len(devices) > 1:
        index = ShardedRouterIndex(keys, layer_maps, doc_ids, routing, devices)
    else:
        index = RouterIndex(keys, layer_maps, doc_ids, routing,
                                 device=devices[0] if devices else device)
    return ResidentIndex(index, doc_ids, chunk_doc, key_bytes)


def interleave_grids(docs: np.ndarray, sdocs: np.ndarray, doc_ids: np.ndarray,
                      root: Any) -> tuple[np.ndarray, np.ndarray]:
    """(row order, chunk → dense document map) of a layer's aligned chunks (store ids ``docs``) followed by
    its shifted-grid chunks (``sdocs``), put document by document: each document's aligned chunks, then its
    shifted ones, documents in the store's order. Both grids list documents in the same order (one run each);
    so the layer's map stays sorted where the aligned one is, and routing keeps its one-pass reduces."""
    def runs(d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:   # (run index of every chunk, run ids)
        start = np.r_[True, d[1:] != d[:-1]] if d.size else np.zeros(0, bool)
        return np.cumsum(start) - 1, d[start]

    run_aligned, ids_aligned = runs(docs)
    run_shifted, ids_shifted = runs(sdocs)
    if not np.array_equal(ids_aligned, ids_shifted):
        raise RuntimeMemoryError(f"Store {str(root)!r} lists its documents in another order on the shifted router-key "
                                 "grid than on the aligned one; run `msa store verify`.")
    order = np.argsort(np.concatenate([run_aligned, run_shifted]), kind="stable")     # a run's aligned rows come first
    return order, np.searchsorted(doc_ids, np.concatenate([docs, sdocs])[order])



def free_bytes(device: Any) -> int | None:
    """Bytes free for new tensors on ``device``: CUDA's free memory, a Linux host's MemAvailable; None where
    it cannot be read (then nothing is checked)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _world_size(distributed: Any) -> int:
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise ConfigError("Memory(..., distributed=...) needs torch.distributed initialised in this process.",
                          hint="Start the processes with torchrun (or call torch.distributed.init_process_group) "
                               "first; for several devices in one process use devices=[...] instead.")
    return dist.get_world_size(None if distributed is True else distributed)


def _rank(distributed: Any) -> int:
    import torch.distributed as dist

    return dist.get_rank(None if distributed is True else distributed)


def check_router_key_room(store: Any, devices: Sequence[Any], n_shards: int = 1) -> int:
    """Raise RuntimeMemoryError, before anything is loaded, when the router keys cannot fit where they go.

    ``n_shards`` > 1: each device holds about 1/n_shards of the keys (shards are balanced by chunk count);
    the host check is for the whole, as the keys pass through the host. Returns all shards' bytes."""
    import torch

    need = store.router_key_bytes()
    ident = store.identity
    share = -(-need // max(1, n_shards))
    where: list[tuple[Any, int]] = [("cpu", need)]     # keys pass through the host
    where += [(d, share) for d in dict.fromkeys(str(d) for d in devices) if torch.device(d).type == "cuda"]
    for w, n in where:
        free = free_bytes(w)
        if free is not None and n > free:
            grid = (f", {len(ident.shifted_layers)} of them also over a shifted grid of "
                    f"{ident.shifted_window or ident.chunk_tokens}-token windows" if ident.shifted_layers else "")
            part = f" ({n / 2**30:.2f} GiB a shard of {n_shards})" if n_shards > 1 and w != "cpu" else ""
            raise RuntimeMemoryError(
                f"The router keys of store {str(store.root)!r} take {need / 2**30:.2f} GiB{part} ({ident.n_layers} "
                f"router layers{grid}), more than the {free / 2**30:.2f} GiB free on "
                f"{'the host' if w == 'cpu' else w}; Memory keeps them all resident.",
                hint="Open it where more memory is free (device='cuda' on a larger GPU, devices=[...] or "
                     "distributed=True to shard the keys over several GPUs, or a larger host), or use a "
                     "store with fewer router keys: `msa store reindex-router STORE --dest NEW --adapter aligned` "
                     "copies a store of the default adapter to MSA's aligned grid alone (a fifth of its keys) without "
                     "encoding.")
    return need
