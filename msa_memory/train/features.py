"""Extract the frozen-backbone inputs of the router: pooled passage inputs and query-token inputs.

Both go through the encoder's own forward (``msa_memory.encode``), so the numbers are the ones a
store and the runtime see:

- passages: ``Encoder.encode_tokens`` on the model's wrapping (``LoadedModel.wrap_ids``), with
  ``keep_router_inputs`` semantics: x̄ (L, C, E) = the chunk-mean of each router layer's
  ``input_layernorm`` output (last chunk partial, sums in fp32);
- queries: the question tokens exactly as ``runtime.Memory`` routes them in text mode
  (:func:`msa_memory.routing.query.query_tokens`: ``tokenizer(question, add_special_tokens=True)``,
  positions from 0, BOS not routing, no memory: the cheap approximation of msa-reference §6.4), packed
  per-query causal → (T, L, E); a router's ``query_suffix`` is appended to each question as the runtime
  appends it.

Because ``router_k_proj`` is linear and bias-free, ``router_k_proj(x̄)`` equals the pooled router
key the encoder stores, so training needs no further backbone passes. The layers extracted are the
loaded model's router layers; load it with ``router_layers="all"`` to measure every layer. What
this module does not do: train, or write stores.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import numpy as np
import torch

from msa_memory.encode.encoder import token_batches
from msa_memory.errors import ConfigError
from msa_memory.routing.query import query_tokens, router_suffix, special_token_frame, suffix_tokens  # noqa: F401  (also this module's API)
from msa_memory.train.feature_set import Features

__all__ = ["query_tokens", "suffix_tokens", "router_suffix", "extract_passages", "extract_passage_tokens", "extract_passage_grids", "extract_queries", "extract_query_tokens", "build_features",
           "store_features", "save_features", "load_features"]


def extract_passages(loaded: Any, passages: Sequence[str], *, max_batch_tokens: int = 8192,
                     dtype: torch.dtype = torch.bfloat16,
                     progress: Callable[[int, int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled router-layer inputs of every passage: ((L, C, E) x̄, (C,) passage index per chunk).

    Passage i is wrapped as document id i (only the ``msa`` wrap embeds the id).
    """
    return extract_passage_tokens(loaded, [loaded.wrap_ids(p, i) for i, p in enumerate(passages)],
                                  max_batch_tokens=max_batch_tokens, dtype=dtype, progress=progress)


def extract_passage_tokens(loaded: Any, seqs: Sequence[Sequence[int]], *, max_batch_tokens: int = 8192,
                           dtype: torch.dtype = torch.bfloat16,
                           progress: Callable[[int, int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`extract_passages` on already wrapped token ids (``loaded.wrap_ids`` of each passage)."""
    return extract_passage_grids(loaded, seqs, max_batch_tokens=max_batch_tokens, dtype=dtype, progress=progress)[:2]


def extract_passage_grids(loaded: Any, seqs: Sequence[Sequence[int]], *, max_batch_tokens: int = 8192,
                          dtype: torch.dtype = torch.bfloat16, progress: Callable[[int, int], None] | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """:func:`extract_passage_tokens` plus, when the loaded router shifts some layers, the pooled inputs
    over the shifted grid at those layers: ``(x̄, chunk_doc, x̄_s (Ls, Cs, E) or None, chunk_doc_s or None)``."""
    from msa_memory.encode import Encoder

    enc = Encoder(loaded, max_batch_tokens=max_batch_tokens, keep_router_inputs=True)
    seqs = [list(s) for s in seqs]
    shifted = bool(loaded.router.config.shifted_layers)
    xs, xs_shifted, counts, counts_shifted, done = [], [], [], [], 0
    total = len(seqs)
    for group in token_batches([len(s) for s in seqs], max_batch_tokens):
        pb = enc.encode_tokens([seqs[i] for i in group])
        xs.append(pb.x.to(dtype).cpu())                  # (L, C_b, E)
        counts += list(pb.n_chunks)
        if shifted:
            xs_shifted.append(pb.x_s.to(dtype).cpu())           # (Ls, Cs_b, E)
            counts_shifted += list(pb.n_chunks_s)
        done += len(group)
        if progress is not None:
            progress(done, total)

    def grid(parts: list[torch.Tensor], n: list[int], L: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat(parts, dim=1) if parts else torch.empty(L, 0, loaded.hidden_size, dtype=dtype)
        return x, torch.repeat_interleave(torch.arange(len(seqs)), torch.tensor(n, dtype=torch.int64))

    x, chunk_doc = grid(xs, counts, len(loaded.router_layers))
    if not shifted:
        return x, chunk_doc, None, None
    return (x, chunk_doc, *grid(xs_shifted, counts_shifted, len(loaded.router.config.shifted_layers)))


@torch.inference_mode()
def extract_queries(loaded: Any, questions: Sequence[str], *, max_batch_tokens: int = 4096,
                    dtype: torch.dtype = torch.bfloat16, suffix: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Router-layer inputs of the routing tokens of every question: ((Tq, L, E) flat, (Q+1,) offsets).

    ``suffix``: the query suffix appended to each question (:func:`query_tokens`); None: ``loaded``'s
    router's own (:func:`router_suffix`)."""
    sfx = router_suffix(loaded) if suffix is None else suffix
    return extract_query_tokens(loaded, [query_tokens(loaded.tokenizer, q, sfx) for q in questions],
                                max_batch_tokens=max_batch_tokens, dtype=dtype)


@torch.inference_mode()
def extract_query_tokens(loaded: Any, toks: Sequence[tuple[Sequence[int], int]], *, max_batch_tokens: int = 4096,
                         dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`extract_queries` on already tokenized questions: ``(token ids, leading non-routing tokens)``."""
    from msa_memory.encode import PackedCausalAttention

    layers = list(loaded.router_layers)
    slot = {l: i for i, l in enumerate(layers)}
    keep = [len(t) - s for t, s in toks]
    offs = np.concatenate([[0], np.cumsum(keep)]).astype(np.int64)
    out = torch.empty((int(offs[-1]), len(layers), loaded.hidden_size), dtype=dtype)
    dev = loaded.device
    for group in token_batches([len(t) for t, _ in toks], max_batch_tokens):
        lens = [len(toks[i][0]) for i in group]
        ids = torch.tensor([t for i in group for t in toks[i][0]], dtype=torch.long, device=dev)[None]
        pos = torch.cat([torch.arange(n, device=dev) for n in lens])[None]
        cap: dict[int, torch.Tensor] = {}

        def on_input(layer: int, x: torch.Tensor) -> None:
            cap[layer] = x[0].to(dtype).cpu()            # (T, E)

        loaded.backbone.run(ids, pos, PackedCausalAttention(lens, dev), stop_after=max(layers) + 1,
                            on_layer_input=on_input, observe_layers=layers, kv_only_last=True)
        start = 0
        for i, n in zip(group, lens):
            s = toks[i][1]
            for l in layers:
                out[offs[i]:offs[i + 1], slot[l]] = cap[l][start + s:start + n]
            start += n
    return out, torch.from_numpy(offs)


def build_features(loaded: Any, passages: Sequence[str], queries: Sequence[Any], *,
                   hard_negatives: Sequence[Sequence[int]] | None = None, max_batch_tokens: int = 8192,
                   log: Callable[[str], None] | None = None, query_suffix: str | None = None) -> Features:
    """:class:`Features` of passages and :class:`~msa_memory.train.pairs.Query` objects over them.

    ``query_suffix``: appended to every query (:func:`extract_queries`; None: ``loaded``'s router's)."""
    t0 = time.perf_counter()
    step = max(1, len(passages) // 10)

    def prog(done: int, total: int) -> None:
        if log is not None and (done == total or done % step < 8):
            log(f"  passages {done}/{total} ({time.perf_counter() - t0:.0f}s)")

    x, chunk_doc = extract_passages(loaded, passages, max_batch_tokens=max_batch_tokens, progress=prog)
    sfx = router_suffix(loaded) if query_suffix is None else query_suffix
    qx, qoff = extract_queries(loaded, [q.text for q in queries], suffix=sfx)
    if log is not None:
        log(f"  features: {len(passages)} passages, {x.shape[1]} chunks, {len(queries)} queries, "
            f"{len(loaded.router_layers)} layers, {time.perf_counter() - t0:.0f}s")
    return Features(tuple(int(v) for v in loaded.router_layers), x, chunk_doc, len(passages), qx, qoff,
                    [tuple(q.positives) for q in queries], [q.kind for q in queries],
                    [tuple(h) for h in hard_negatives] if hard_negatives is not None else [], query_suffix=sfx)


def store_features(loaded: Any, store: Any, doc_ids: Sequence[int], queries: Sequence[Any], *,
                   hard_negatives: Sequence[Sequence[int]] | None = None,
                   log: Callable[[str], None] | None = None, query_suffix: str | None = None) -> Features | None:
    """:class:`Features` whose passage inputs x̄ are read from ``store`` instead of re-encoded.

    ``doc_ids[i]`` is the store document of passage ``i`` (its text unchanged). Returns None when
    the store cannot serve them: it kept no router inputs, misses one of ``loaded``'s router layers,
    or was encoded by another backbone (its x̄ would not be this model's). Query inputs are computed
    with the model as :func:`extract_queries` does.
    """
    from msa_memory.schemas.records import to_float32

    ident = store.identity
    layers = list(loaded.router_layers)
    why = ("it keeps no router inputs" if ident.hidden_size <= 0 else
           f"it kept router layers {list(ident.router_layers)}, not all of {layers}"
           if any(l not in ident.router_layers for l in layers) else
           "it was encoded by another backbone" if ident.model_fingerprint != loaded.model_fingerprint else None)
    if why is not None:
        if log is not None:
            log(f"features: store {str(store.root)!r} cannot serve the passage inputs ({why}); re-encoding its texts")
        return None
    t0 = time.perf_counter()
    index = {int(d): i for i, d in enumerate(doc_ids)}
    xs, order, chunk_doc = [], None, None
    for l in layers:
        x, cd = store.router_inputs(ident.router_layers.index(l))       # (C, E) storage dtype, (C,) doc ids
        if order is None:
            pos = np.array([index.get(int(d), -1) for d in cd], dtype=np.int64)
            missing = sorted(set(range(len(doc_ids))) - set(pos.tolist()))
            if (pos < 0).any() or missing:
                raise ConfigError(f"Store {str(store.root)!r}: documents {missing[:5]} have no router inputs in "
                                  "this version, or the store has documents outside the training set.")
            order = np.argsort(pos, kind="stable")                        # documents in passage order
            chunk_doc = torch.from_numpy(pos[order])
        xs.append(torch.from_numpy(to_float32(x[order], ident.dtype)).to(torch.bfloat16))
    sfx = router_suffix(loaded) if query_suffix is None else query_suffix
    qx, qoff = extract_queries(loaded, [q.text for q in queries], suffix=sfx)
    if log is not None:
        log(f"  features: {len(doc_ids)} passages ({int(chunk_doc.shape[0])} chunks) read from the store's kept "
            f"router inputs, {len(queries)} queries encoded, {time.perf_counter() - t0:.0f}s")
    return Features(tuple(int(v) for v in layers), torch.stack(xs), chunk_doc, len(doc_ids), qx, qoff,
                    [tuple(q.positives) for q in queries], [q.kind for q in queries],
                    [tuple(h) for h in hard_negatives] if hard_negatives is not None else [], query_suffix=sfx)


def save_features(feats: Features, path: str) -> None:
    """Write features to one ``.pt`` file (tensors + lists; read back with :func:`load_features`)."""
    torch.save({"layers": list(feats.layers), "x_chunks": feats.x_chunks, "chunk_doc": feats.chunk_doc,
                "n_docs": feats.n_docs, "q_x": feats.q_x, "q_offsets": feats.q_offsets,
                "positives": [list(p) for p in feats.positives], "kinds": feats.kinds,
                "hard_negatives": [list(h) for h in feats.hard_negatives], "query_suffix": feats.query_suffix,
                **({"teacher_cands": feats.teacher_cands, "teacher_scores": feats.teacher_scores}
                   if feats.teacher_cands is not None else {})}, path)


def load_features(path: str) -> Features:
    """Read features written by :func:`save_features`."""
    d = torch.load(path, weights_only=True, mmap=True)  # file-backed: a multi-GB cache is not copied into RAM
    return Features(tuple(d["layers"]), d["x_chunks"], d["chunk_doc"], int(d["n_docs"]), d["q_x"], d["q_offsets"],
                    [tuple(p) for p in d["positives"]], list(d["kinds"]), [tuple(h) for h in d["hard_negatives"]],
                    query_suffix=str(d.get("query_suffix", "")), teacher_cands=d.get("teacher_cands"),
                    teacher_scores=d.get("teacher_scores"))
