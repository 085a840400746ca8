"""Tiered content memory: pooled K̄V̄ of the chosen documents, fetched on demand, with an LRU cache.

Design note. Router keys are small and resident (``routing.RouterIndex``); content K̄V̄ is 2× larger
and only the top-k documents' rows are ever needed, so it lives one tier down:

- ``source="host"``: every document's K̄V̄ in ONE host tensor (C, L, 2, H, D), pinned when the
  device is a GPU. A fetch of n documents is one ``index_select`` into a pinned staging buffer and
  ONE host→device copy (the reference issues one small copy per document per layer, §4.3/§9.7).
- ``source="store"``: nothing is preloaded; misses are read with ``store.load_kv`` (one call per
  fetch) and copied the same way. For stores larger than host memory.

Fetched documents stay in a device-side LRU cache bounded by ``cache_bytes``: all L layers of a
document come in one fetch, so router layers that pick the same document reuse it (the reference
re-fetches per layer). What it does not do: choose documents (routing) or attend (generation).
Invariant: :meth:`fetch` returns exactly the requested documents, in the requested order.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Callable, Literal, Sequence

import numpy as np

from msa_memory.errors import ConfigError, RuntimeMemoryError

if TYPE_CHECKING:
    import torch

__all__ = ["ContentMemory", "Source", "content_for_store"]

Source = Literal["host", "store", "auto"]


class ContentMemory:
    """Content K̄V̄ of a document collection, addressed by dense document index 0..N-1.

    Parameters
    ----------
    n_chunks : array-like (N,) int64
        Chunks of each document, in dense-index order.
    layout : tuple (L, H, D)
    dtype : torch.dtype
        Logical dtype of the values (bf16 bit patterns are viewed, not converted).
    device : str or torch.device, default "cpu"
    host_kv : torch.Tensor, optional
        (C, L, 2, H, D) all documents' K̄V̄ in dense-index order (``source="host"``).
    loader : callable, optional
        ``loader(dense_indices) -> list of (C_d, L, 2, H, D) arrays`` (``source="store"``).
    cache_bytes : int, default 256 MiB
        Budget of the device-side document cache; 0 disables caching.
    """

    def __init__(self, n_chunks: Any, layout: tuple[int, int, int], dtype: torch.dtype, device: Any = "cpu", *,
                 host_kv: torch.Tensor | None = None,
                 loader: Callable[[np.ndarray], Sequence[np.ndarray]] | None = None,
                 cache_bytes: int = 256 << 20) -> None:
        import torch

        if (host_kv is None) == (loader is None):
            raise ConfigError("ContentMemory needs exactly one of host_kv (preloaded) or loader (from the store).")
        self.n_chunks = np.asarray(n_chunks, dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.n_chunks)]).astype(np.int64)
        self.layout = tuple(int(x) for x in layout)
        self.dtype = dtype
        self.device = torch.device(device)
        self.loader = loader
        self.cache_bytes = int(cache_bytes)
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._cached_bytes = 0
        self.stats = {"fetches": 0, "docs_fetched": 0, "cache_hits": 0, "bytes_copied": 0}
        L, H, D = self.layout
        self._row_bytes = L * 2 * H * D * torch.empty((), dtype=dtype).element_size()
        self.host_kv = None
        if host_kv is not None:
            if tuple(host_kv.shape) != (int(self.offsets[-1]), L, 2, H, D):
                raise ConfigError(f"host_kv must be (C={int(self.offsets[-1])}, L={L}, 2, H={H}, D={D}); "
                                  f"got {tuple(host_kv.shape)}.")
            if self.device.type == "cuda" and not host_kv.is_pinned():
                host_kv = host_kv.pin_memory()
            self.host_kv = host_kv
        self._staging: torch.Tensor | None = None

    @property
    def source(self) -> str:
        return "host" if self.host_kv is not None else "store"

    @property
    def n_docs(self) -> int:
        return int(self.n_chunks.shape[0])

    def host_nbytes(self) -> int:
        return 0 if self.host_kv is None else self.host_kv.numel() * self.host_kv.element_size()

    # ------------------------------------------------------------------ fetching
    def _stage(self, rows: int) -> torch.Tensor:
        """A reusable (pinned, on GPU hosts) staging buffer of at least ``rows`` chunks."""
        import torch

        L, H, D = self.layout
        if self._staging is None or self._staging.shape[0] < rows:
            cap = max(rows, 1024)
            buf = torch.empty((cap, L, 2, H, D), dtype=self.dtype)
            self._staging = buf.pin_memory() if self.device.type == "cuda" else buf
        return self._staging[:rows]

    def _fetch_missing(self, idx: np.ndarray) -> list[torch.Tensor]:
        """One gather + one copy for all documents in ``idx`` (none cached)."""
        import torch

        counts = self.n_chunks[idx]
        total = int(counts.sum())
        if self.host_kv is not None:
            # (ΣC,) chunk rows of all requested documents, in request order
            starts = self.offsets[idx]
            first = np.concatenate([[0], np.cumsum(counts)[:-1]])
            rows = np.arange(total, dtype=np.int64) + np.repeat(starts - first, counts)   # vectorized ranges
            rows_t = torch.from_numpy(rows)
            if self.device.type == "cpu":
                flat = self.host_kv.index_select(0, rows_t)                       # (ΣC, L, 2, H, D)
            else:
                stage = self._stage(total)
                torch.index_select(self.host_kv, 0, rows_t, out=stage)
                flat = stage.to(self.device, non_blocking=True)
        else:
            assert self.loader is not None
            arrays = self.loader(idx)
            if len(arrays) != len(idx):
                raise RuntimeMemoryError(f"The store returned {len(arrays)} K̄V̄ arrays for {len(idx)} documents.")
            stage = self._stage(total) if self.device.type == "cuda" else None
            parts = []
            for i, a in zip(idx, arrays):
                if a.shape[0] != self.n_chunks[i]:
                    raise RuntimeMemoryError(f"Document index {int(i)} has {a.shape[0]} K̄V̄ chunks in the store "
                                             f"but {int(self.n_chunks[i])} router-key chunks; the store is inconsistent "
                                             "(run `msa store verify`).")
                t = torch.from_numpy(np.ascontiguousarray(a))
                parts.append(t.view(self.dtype) if t.dtype != self.dtype else t)
            cat = torch.cat(parts) if parts else torch.empty((0, *self.kv_shape_tail()), dtype=self.dtype)
            if stage is not None:
                stage.copy_(cat)
                flat = stage.to(self.device, non_blocking=True)
            else:
                flat = cat
        self.stats["bytes_copied"] += total * self._row_bytes
        return list(torch.split(flat, counts.tolist()))

    def kv_shape_tail(self) -> tuple[int, int, int, int]:
        L, H, D = self.layout
        return (L, 2, H, D)

    def fetch(self, doc_index: Any) -> list[torch.Tensor]:
        """Per-document (C_d, L, 2, H, D) device tensors of ``doc_index`` (dense indices), in order."""
        idx = np.asarray(doc_index, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_docs):
            raise ConfigError(f"Document indices must lie in 0..{self.n_docs - 1}; got {idx.tolist()!r}.")
        self.stats["fetches"] += 1
        out: dict[int, torch.Tensor] = {}
        missing = []
        for i in dict.fromkeys(idx.tolist()):
            hit = self._cache.get(i)
            if hit is not None:
                self._cache.move_to_end(i)
                out[i] = hit
                self.stats["cache_hits"] += 1
            else:
                missing.append(i)
        if missing:
            got = self._fetch_missing(np.asarray(missing, dtype=np.int64))
            self.stats["docs_fetched"] += len(missing)
            for i, t in zip(missing, got):
                out[i] = t
                self._remember(i, t)
        return [out[i] for i in idx.tolist()]

    def _remember(self, i: int, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        if nbytes > self.cache_bytes:
            return
        self._cache[i] = t
        self._cached_bytes += nbytes
        while self._cached_bytes > self.cache_bytes and self._cache:
            _, old = self._cache.popitem(last=False)
            self._cached_bytes -= old.numel() * old.element_size()

    def layer_kv(self, doc_index: Any, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K̄ and V̄ of one router layer for the given documents: two (H, ΣC, D) tensors."""
        import torch

        docs = self.fetch(doc_index)
        L, H, D = self.layout
        if not docs:
            empty = torch.empty((H, 0, D), dtype=self.dtype, device=self.device)
            return empty, empty
        kv = torch.cat([d[:, layer] for d in docs]) if len(docs) > 1 else docs[0][:, layer]  # (ΣC, 2, H, D)
        return kv[:, 0].transpose(0, 1), kv[:, 1].transpose(0, 1)

    def clear_cache(self) -> None:
        self._cache.clear()
        self._cached_bytes = 0


def _parse_bytes(v: int | str | None) -> int | None:
    if v is None or isinstance(v, int):
        return v
    s = str(v).strip().upper().replace("IB", "").replace("B", "")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    try:
        return int(float(s[:-1]) * mult[s[-1]]) if s and s[-1] in mult else int(float(s))
    except ValueError as e:
        raise ConfigError(f"Cannot read the byte size {v!r}; use an int or e.g. '4GiB', '512MiB'.") from e


def content_for_store(store: Any, doc_ids: np.ndarray, chunk_doc: np.ndarray, device: Any, *, source: str = "auto",
                      memory_budget: int | str | None = "4GiB", cache_bytes: int | str = "256MiB") -> ContentMemory:
    """The content tier of a store version's documents ``doc_ids`` (dense order; ``chunk_doc`` maps each
    aligned chunk to one): ``source`` "host" preloads every document's K̄V̄ (up to ``memory_budget``),
    "store" reads chosen documents on demand, "auto" picks "host" if it fits (see ``runtime.Memory``)."""
    import torch

    from msa_memory.routing.scoring import torch_dtype_of

    ident = store.identity
    dt = torch_dtype_of(ident.dtype)
    n_chunks = np.bincount(chunk_doc, minlength=len(doc_ids)).astype(np.int64)
    layout = (ident.n_layers, ident.n_kv_heads, ident.head_dim)
    kv_bytes = int(n_chunks.sum()) * ident.n_layers * 2 * ident.n_kv_heads * ident.head_dim * \
        torch.empty((), dtype=dt).element_size()
    budget = _parse_bytes(memory_budget)
    if source not in ("auto", "host", "store"):
        raise ConfigError(f"source={source!r} is not one of 'auto', 'host', 'store'.")
    if source == "auto":
        source = "host" if budget is None or kv_bytes <= budget else "store"
    if source == "host" and budget is not None and kv_bytes > budget:
        raise RuntimeMemoryError(f"Content K̄V̄ of this store takes {kv_bytes / 2**30:.2f} GiB, over the "
                                 f"memory_budget of {budget / 2**30:.2f} GiB.",
                                 hint="Use source='store' (read on demand) or raise memory_budget.")
    cache = _parse_bytes(cache_bytes) or 0
    if source == "host":
        arrays = store.load_kv(doc_ids) if len(doc_ids) else []
        flat = (torch.from_numpy(np.concatenate(arrays)) if arrays
                else torch.empty((0, *layout[:1], 2, *layout[1:]), dtype=dt))
        host = flat.view(dt) if flat.dtype != dt else flat
        return ContentMemory(n_chunks, layout, dt, device, host_kv=host, cache_bytes=cache)
    else:
        return ContentMemory(n_chunks, layout, dt, device, loader=lambda idx: store.load_kv(doc_ids[idx]),
                             cache_bytes=cache)
