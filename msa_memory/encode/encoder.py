"""The encoding forward: passages -> pooled K̄, V̄, K̄ᵣ (and optionally x̄) per router layer.

Reference behaviour: msa-reference.md §2.2-§2.5. For each batch of passages:

1. wrap + tokenise each passage (:meth:`LoadedModel.wrap_ids`; a passage given as token ids gets the
   same frame around its ids, :meth:`LoadedModel.wrap_token_ids`) and pack them back to back into one
   row with no padding; positions restart at 0 for every passage (document-wise RoPE);
2. run decoder layers ``0 .. max(router_layers)`` only (never the layers above, the final norm or
   the LM head) through :class:`~msa_memory.encode.forward.Backbone`, with block-diagonal causal
   attention (:class:`PackedCausalAttention`: no passage sees another; sliding windows honoured);
3. inside each router layer's attention call, pool K (after k_norm and RoPE, before GQA
   repetition) and V per 64-token chunk in fp32 -- captured from the attention module's own
   tensors, never from an HF cache (Gemma 3's sliding layers keep only 512 tokens there);
4. pool the layer's ``input_layernorm`` output x per chunk (fp32) and compute the router keys as
   ``router_k(mean x)`` (= mean of router_k(x): the projection is linear), L2-normalised per head
   iff the router's score mode is "cosine";
5. at the router's ``shifted_layers`` (not MSA; empty by default) pool the same x once more over the
   shifted grid (P-token windows from token P/2, or finer windows: :func:`~msa_memory.encode.pooling.shifted_pool`) and
   make router keys of those means the same way: no second forward.

The template prefix's K/V for every layer (:meth:`Encoder.template_prefix`) comes from one causal
forward of the prefix tokens alone at positions 0..P-1, for the runtime.

Does not write files or know about stores; returns numpy in the storage dtype (bf16 as uint16).
Key invariant (tested): packing many passages gives the same pooled values as one at a time, and
both equal a slow per-passage reference through the unmodified HF model.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from msa_memory.encode.attention import PackedCausalAttention, causal_attention
from msa_memory.encode.forward import AttnCall
from msa_memory.encode.model import LoadedModel
from msa_memory.encode.pooling import chunk_layout, chunk_mean_pool, shifted_pool
from msa_memory.errors import ConfigError, EncodeError
from msa_memory.schemas.records import STORAGE_DTYPES, EncodedChunks, Passage, shifted_chunk_counts

__all__ = ["Encoder", "TemplatePrefix", "PooledBatch"]

_TORCH_STORE = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class TemplatePrefix:
    """Per-layer K/V of the template prefix tokens (positions 0..P-1, causal among themselves)."""

    token_ids: list[int]
    keys: list[torch.Tensor]
    """One (Hkv, P, D) tensor per decoder layer (post k_norm, post RoPE), model dtype and device."""
    values: list[torch.Tensor]
    """One (Hkv, P, D) tensor per decoder layer."""

    def pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(K, V), ...] per decoder layer, as the runtime's buffers take them."""
        return list(zip(self.keys, self.values))


@dataclass
class PooledBatch:
    """fp32 pooled state of a list of token sequences (torch, on the model's device)."""

    n_tokens: list[int]
    n_chunks: list[int]
    k: torch.Tensor
    """(L, C, Hkv, D) pooled keys."""
    v: torch.Tensor
    """(L, C, Hkv, D) pooled values."""
    x: torch.Tensor
    """(L, C, E) pooled router-layer inputs."""
    k_router: torch.Tensor
    """(L, C, Hkv, D) router keys as stored."""
    n_chunks_s: list[int] | None = None
    """Chunks per document on the shifted grid (None: the router shifts no layer)."""
    x_s: torch.Tensor | None = None
    """(Ls, Cs, E) pooled router-layer inputs over the shifted grid, at the shifted layers."""
    k_router_s: torch.Tensor | None = None
    """(Ls, Cs, Hkv, D) router keys over the shifted grid, as stored."""


def _to_storage(t: torch.Tensor, dtype: str) -> np.ndarray:
    """fp32 torch -> numpy in the storage form of ``dtype`` (bf16: RNE, kept as uint16 bits).

    The cast and any transposition happen on t's device in one copy kernel, before the transfer:
    a strided tensor copied to the host first would be made contiguous there, by the CPU (H100,
    Qwen3-4B shape, 32x512 tokens: 17.4 ms for the kv block that way, 1.8 ms this way; through a
    pinned buffer plus a copy out of it: 2.8 ms).
    """
    t = t.detach()
    if t.dtype != _TORCH_STORE[dtype] or not t.is_contiguous():
        t = torch.empty(t.shape, dtype=_TORCH_STORE[dtype], device=t.device).copy_(t)
    t = t.cpu()
    return t.view(torch.int16).numpy().view(np.uint16) if dtype == "bfloat16" else t.numpy()


class Encoder:
    """Encode passages into pooled MSA memory with a :class:`LoadedModel`.

    Parameters
    ----------
    model : LoadedModel
    max_batch_tokens : int, default 8192
        Tokens packed into one forward (a longer passage gets a forward of its own).
    keep_router_inputs : bool, default False
        Also return ``x_router`` (L, C, E): pooled input_layernorm outputs, from which router keys
        of any adapter can be recomputed (``reindex-router``, router training).
    store_dtype : "bfloat16" | "float16" | "float32", default "bfloat16"
        Logical dtype of the returned arrays.
    attention_strategy : "auto" | "loop" | "bucket", default "auto"
        See :class:`~msa_memory.encode.attention.PackedCausalAttention`.

    Examples
    --------
    >>> enc = Encoder(load_model("default"))                                  # doctest: +SKIP
    >>> out = enc.encode(np.array([7]), [Passage("Hello.", "a.txt")])         # doctest: +SKIP
    >>> out.kv.shape                                                          # doctest: +SKIP
    (1, 9, 2, 1, 256)
    """

    def __init__(self, model: LoadedModel, max_batch_tokens: int = 8192, keep_router_inputs: bool = False,
                 store_dtype: str = "bfloat16", attention_strategy: str = "auto"):
        if int(max_batch_tokens) < 1:
            raise ConfigError(f"max_batch_tokens must be >= 1, got {max_batch_tokens!r}.")
        if store_dtype not in STORAGE_DTYPES:
            raise ConfigError(f"store_dtype must be one of {sorted(STORAGE_DTYPES)}, got {store_dtype!r}.")
        if attention_strategy not in ("auto", "loop", "bucket"):
            raise ConfigError(f"attention_strategy must be 'auto', 'loop' or 'bucket', got {attention_strategy!r}.")
        self.model = model
        self.max_batch_tokens = int(max_batch_tokens)
        self.keep_router_inputs = bool(keep_router_inputs)
        self.store_dtype = store_dtype
        self.attention_strategy = attention_strategy
        self._prefix: TemplatePrefix | None = None

    def identity(self):
        """The StoreIdentity of what this encoder writes (model + router + dtype + x_router)."""
        return self.model.identity(store_dtype=self.store_dtype, keep_router_inputs=self.keep_router_inputs)

    # -- public --------------------------------------------------------------------------------
    def tokenize(self, doc_ids: Sequence[int] | np.ndarray, passages: Sequence[Passage]) -> list[list[int]]:
        """Wrapped token ids of each passage (MSA wrapping embeds the store document id).

        A passage with ``token_ids`` is wrapped around those ids (:meth:`LoadedModel.wrap_token_ids`),
        checked against the model's vocabulary; otherwise its ``text`` is tokenised.
        """
        ids = np.asarray(doc_ids).reshape(-1)
        if len(ids) != len(passages):
            raise EncodeError(f"Got {len(ids)} doc_ids for {len(passages)} passages; give one id per passage.")
        out = []
        for d, p in zip(ids.tolist(), passages):
            if p.token_ids is not None:
                given = self.model.check_token_ids(p.token_ids, f"Passage {p.passage_index} of {p.source_path!r}")
                toks = self.model.wrap_token_ids(given, int(d))
            else:
                toks = self.model.wrap_ids(p.text, int(d))
            if not toks:
                raise EncodeError(
                    f"Passage {p.passage_index} of {p.source_path!r} (doc id {d}) has no tokens to encode.",
                    hint="Drop empty passages before encoding (split_passages never makes them).")
            out.append(toks)
        return out

    def encode(self, doc_ids: Sequence[int] | np.ndarray, passages: Sequence[Passage], *,
               progress: Callable[[int, int], None] | None = None) -> EncodedChunks:
        """Encode ``passages`` (one MSA document each) into :class:`EncodedChunks`.

        Parameters
        ----------
        doc_ids : (N,) int array
            Store document ids, one per passage (reserved from the store beforehand).
        passages : sequence of Passage
        progress : callable(tokens_done, tokens_total), optional
            Called after each forward.

        Returns
        -------
        EncodedChunks
            ``kv`` (C, L, 2, Hkv, D), ``k_router`` (L, C, Hkv, D), ``x_router`` (L, C, E) or None;
            numpy in the storage dtype, documents in the given order.

        Raises
        ------
        EncodeError
            Mismatched ids/passages, an empty passage, or a forward that fails.
        """
        ids = np.asarray(doc_ids, dtype=np.int64).reshape(-1)
        seqs = self.tokenize(ids, passages)
        total = sum(len(s) for s in seqs)
        m = self.model
        L, H, D, E = len(m.router_layers), m.n_kv_heads, m.head_dim, m.hidden_size
        Ls = len(m.router.config.shifted_layers)
        kv_parts, kr_parts, x_parts, krs_parts, xs_parts, n_chunks, n_chunks_s = [], [], [], [], [], [], []
        done = 0
        for batch in self._batches([len(s) for s in seqs]):
            pb = self.encode_tokens([seqs[i] for i in batch])
            # (L, C, H, D) x2 -> (C, L, 2, H, D)
            kv_parts.append(_to_storage(torch.stack([pb.k, pb.v], dim=2).transpose(0, 1), self.store_dtype))
            kr_parts.append(_to_storage(pb.k_router, self.store_dtype))
            if self.keep_router_inputs:
                x_parts.append(_to_storage(pb.x, self.store_dtype))
            if Ls:
                krs_parts.append(_to_storage(pb.k_router_s, self.store_dtype))
                if self.keep_router_inputs:
                    xs_parts.append(_to_storage(pb.x_s, self.store_dtype))
                n_chunks_s.extend(pb.n_chunks_s)
            n_chunks.extend(pb.n_chunks)
            done += sum(pb.n_tokens)
            if progress is not None:
                progress(done, total)
        sd = STORAGE_DTYPES[self.store_dtype]

        def cat(parts: list[np.ndarray], axis: int, empty: tuple[int, ...]) -> np.ndarray:
            return np.concatenate(parts, axis=axis) if parts else np.zeros(empty, dtype=sd)

        kv = cat(kv_parts, 0, (0, L, 2, H, D))
        kr = cat(kr_parts, 1, (L, 0, H, D))
        xr = cat(x_parts, 1, (L, 0, E)) if self.keep_router_inputs else None
        shifted: dict[str, np.ndarray | None] = {}
        if Ls:
            shifted = {"n_chunks_s": np.array(n_chunks_s, dtype=np.int64), "k_router_s": cat(krs_parts, 1, (Ls, 0, H, D)),
                       "x_router_s": cat(xs_parts, 1, (Ls, 0, E)) if self.keep_router_inputs else None}
        return EncodedChunks(doc_ids=ids, n_tokens=np.array([len(s) for s in seqs], dtype=np.int64),
                             n_chunks=np.array(n_chunks, dtype=np.int64), k_router=kr, kv=kv,
                             dtype=self.store_dtype, x_router=xr, **shifted)  # type: ignore[arg-type]

    @torch.inference_mode()
    def encode_tokens(self, seqs: Sequence[Sequence[int]]) -> PooledBatch:
        """One packed forward over already-wrapped token sequences -> fp32 :class:`PooledBatch`.

        A building block of :meth:`encode`: nothing writes its result. To store documents given as
        token ids, use ``msa_memory.encode_token_ids`` (or :meth:`encode` with
        ``Passage(..., token_ids=...)``), which wraps them like text documents.
        """
        m = self.model
        dev = m.device
        lens = [len(s) for s in seqs]
        if not lens or min(lens) < 1:
            raise EncodeError(f"encode_tokens needs non-empty sequences, got lengths {lens!r}.")
        t = sum(lens)
        flat = np.fromiter(itertools.chain.from_iterable(seqs), dtype=np.int64, count=t)
        starts = np.cumsum(lens) - np.asarray(lens)
        pos_np = np.arange(t, dtype=np.int64) - np.repeat(starts, lens)  # restart at 0 per doc
        ids_pos = torch.from_numpy(np.stack([flat, pos_np])).to(dev)  # one host -> device copy
        ids, pos = ids_pos[0:1], ids_pos[1:2]  # (1, T) each
        layout = chunk_layout(lens, m.chunk_tokens, device=dev)
        router_layers = m.router_layers
        slot = {l: i for i, l in enumerate(router_layers)}
        C, L = layout.n_total, len(router_layers)
        k_out = torch.empty(L, C, m.n_kv_heads, m.head_dim, dtype=torch.float32, device=dev)
        v_out = torch.empty_like(k_out)
        x_out = torch.empty(L, C, m.hidden_size, dtype=torch.float32, device=dev)
        shifted = m.router.config.shifted_layers
        sslot = {l: i for i, l in enumerate(shifted)}
        if shifted:
            s_window = m.router.config.shifted_window
            n_shifted = shifted_chunk_counts(lens, m.chunk_tokens, s_window)
            s_pool = shifted_pool(lens, m.chunk_tokens, s_window, device=dev)
            xs_out = torch.empty(len(shifted), int(n_shifted.sum()), m.hidden_size, dtype=torch.float32, device=dev)
        seen: set[int] = set()
        packed = PackedCausalAttention(lens, dev, strategy=self.attention_strategy)  # type: ignore[arg-type]

        def attention(call: AttnCall) -> torch.Tensor:
            out = packed(call)  # returns at once when call.output_needed is False (last layer)
            i = slot.get(call.layer)
            if i is not None:  # (1, H, T, D) -> (T, H, D) -> (C, H, D)
                k_out[i] = chunk_mean_pool(call.k[0].transpose(0, 1), layout)
                v_out[i] = chunk_mean_pool(call.v[0].transpose(0, 1), layout)
                seen.add(call.layer)
            return out

        def on_input(layer: int, x: torch.Tensor) -> None:
            x_out[slot[layer]] = chunk_mean_pool(x[0], layout)  # (T, E) -> (C, E)
            j = sslot.get(layer)
            if j is not None:                                   # (T, E) -> (Cs, E)
                xs_out[j] = s_pool(x[0])

        try:
            m.backbone.run(ids, pos, attention, stop_after=max(router_layers) + 1,
                           on_layer_input=on_input, observe_layers=router_layers, kv_only_last=True)
        except (RuntimeError, ValueError) as e:
            raise EncodeError(f"Encoding forward failed on a batch of {len(lens)} passages "
                              f"({sum(lens)} tokens): {e}",
                              hint="Lower max_batch_tokens if this is out of memory.") from e
        if seen != set(router_layers):
            raise EncodeError(f"Router layers {sorted(set(router_layers) - seen)} were not reached by the forward.")
        kr = torch.stack([m.router.keys_from_pooled(l, x_out[i]) for i, l in enumerate(router_layers)])
        pb = PooledBatch(n_tokens=lens, n_chunks=layout.n_chunks, k=k_out, v=v_out, x=x_out, k_router=kr)
        if shifted:
            pb.n_chunks_s = n_shifted.tolist()
            pb.x_s = xs_out
            pb.k_router_s = torch.stack([m.router.keys_from_pooled(l, xs_out[j]) for j, l in enumerate(shifted)])
        return pb

    @torch.inference_mode()
    def template_prefix(self) -> TemplatePrefix:
        """Per-layer K/V of the template prefix (all decoder layers), computed once and cached."""
        if self._prefix is not None:
            return self._prefix
        m = self.model
        toks = m.template_prefix_ids()
        n_l = m.n_layers
        keys: list[torch.Tensor] = [torch.empty(0)] * n_l
        vals: list[torch.Tensor] = [torch.empty(0)] * n_l
        if not toks:
            z = torch.zeros(m.n_kv_heads, 0, m.head_dim, dtype=m.dtype, device=m.device)
            keys, vals = [z] * n_l, [z] * n_l
        else:
            def attention(call: AttnCall) -> torch.Tensor:
                keys[call.layer] = call.k[0].clone()  # (Hkv, P, D)
                vals[call.layer] = call.v[0].clone()
                return causal_attention(call)

            ids = torch.tensor([toks], dtype=torch.long, device=m.device)
            pos = torch.arange(len(toks), device=m.device)[None]
            m.backbone.run(ids, pos, attention)
        self._prefix = TemplatePrefix(token_ids=list(toks), keys=keys, values=vals)
        return self._prefix

    # -- helpers -------------------------------------------------------------------------------
    def _batches(self, lens: list[int]) -> list[list[int]]:
        return token_batches(lens, self.max_batch_tokens)


def token_batches(lens: Sequence[int], max_batch_tokens: int) -> list[list[int]]:
    """Consecutive groups of item indices with at most ``max_batch_tokens`` tokens (oversized: alone)."""
    out: list[list[int]] = []
    cur: list[int] = []
    n = 0
    for i, ln in enumerate(lens):
        if cur and n + ln > max_batch_tokens:
            out.append(cur)
            cur, n = [], 0
        cur.append(i)
        n += ln
    if cur:
        out.append(cur)
    return out
