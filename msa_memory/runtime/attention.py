"""MSA memory attention: the attention core registered in transformers' ``AttentionInterface``, and the
per-request state it works on (:class:`ForwardState`).

The core receives post-RoPE q (1, Hq, T, D) and pre-GQA k/v (1, H, T, D) of the new tokens, writes k/v
into a per-layer buffer preallocated once per request as

    [ prefix K/V (P) | memory K̄/V̄ (M, router layers only) | local tokens (capacity) ]

and runs SDPA over the filled part with a causal mask on the local part (bottom-right aligned: token i
sees the prefix, all memory, local tokens 0..i), Gemma-style sliding windows honoured on prefix and
local keys. A fixed-shape decoding step (:class:`StaticStep`, what a CUDA graph replays) attends the
whole buffer under a mask built on the device. Which request a forward belongs to is
:data:`CURRENT_STATE`, set by :meth:`msa_memory.runtime.engine.MsaEngine.session`; outside a session the
core falls back to transformers' SDPA, so the shared HF model behaves normally. See the design note of
:mod:`msa_memory.runtime.engine`.
"""

from __future__ import annotations

import contextvars
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from msa_memory.errors import RuntimeMemoryError

if TYPE_CHECKING:
    import torch

    from msa_memory.routing.index import RouteResult

__all__ = ["ATTN_NAME", "CURRENT_STATE", "ForwardState", "LayerBuf", "StaticStep", "attend", "attend_static",
           "msa_attention", "register_attention", "sdpa_over_buffer"]

ATTN_NAME = "msa_runtime"
CURRENT_STATE: contextvars.ContextVar[ForwardState | None] = contextvars.ContextVar("msa_forward_state", default=None)
_REGISTERED = False


@dataclass
class LayerBuf:
    k: torch.Tensor          # (H, cap, D)
    v: torch.Tensor          # (H, cap, D)
    local_start: int         # P + M
    n_local: int = 0         # local tokens written so far


@dataclass
class ForwardState:
    """Everything one request's forwards share: buffers, prefix, routing decisions, timings."""

    capacity: int
    """Local tokens (prompt + generated + injected) the buffers can hold."""
    prefix: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None
    """Per decoder layer (K, V), each (H, P, D), or None for no prefix."""
    prefix_len: int = 0
    route: bool = False
    """Route (and fetch memory) in the next forward's router layers."""
    route_rows: torch.Tensor | None = None
    """(T,) bool: which tokens of the next forward are routing-query tokens (doc_id 0)."""
    collect_only: bool = False
    """Route-only pass: accumulate document scores, attach no memory."""
    top_k: int | None = None
    routes: dict[int, RouteResult] = field(default_factory=dict)
    """Router-layer position → its top-k (from the last routing forward)."""
    suffix_rows: int = 0
    """Trailing routing rows of the next routing forward that are the router's query suffix: the suffix
    queries read the last of them, the router queries the rows before them (0: no suffix queries)."""
    preset_routes: dict[int, RouteResult] | None = None
    """Routes decided beforehand (``MsaEngine.pooled_routes``): a routing forward attaches these
    layers' memory instead of routing its own tokens."""
    preset_memory: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
    """With ``preset_routes``: each router position's memory (K̄, V̄), each (H, M, D), used instead of the
    content tier's (training with documents encoded in the same graph, ``train.reader``)."""
    doc_score_sum: torch.Tensor | None = None
    query_sums: dict[tuple[bool, int], tuple[torch.Tensor, int]] | None = None
    """Calibration pass (``MsaEngine.query_sums``): the router positions' summed prepared queries; nothing
    is scored or attached."""
    pending_memory: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    layers: dict[int, LayerBuf] = field(default_factory=dict)
    local_pos: torch.Tensor | None = None
    """(capacity,) int64 positions of local tokens (for sliding windows)."""
    cur_pos: torch.Tensor | None = None
    n_written: int = 0
    timings: dict[str, float] = field(default_factory=lambda: {"routing_s": 0.0, "fetch_s": 0.0})
    masks: dict[tuple, torch.Tensor] = field(default_factory=dict)
    """Attention masks of the current forward, by (prefix + memory length, local tokens before, T, window)."""
    reader: bool = False
    """Apply the engine's reader adapter (question-side LoRA) to this request's forwards."""
    static: StaticStep | None = None
    """The fixed-shape decoding step while one runs (its forwards attend the whole buffer)."""
    decode_graph: tuple[StaticStep, Any] | None = None
    """A captured CUDA graph of this request's decoding step, kept for its later decode calls."""


@dataclass
class StaticStep:
    """Device tensors of one fixed-shape decoding step (what a CUDA graph of it reads and writes)."""

    ids: torch.Tensor        # (1, 1) long: the token to feed; the step leaves its argmax here
    pos: torch.Tensor        # (1, 1) long: its position; the step adds 1
    n: torch.Tensor          # (1,) long: local tokens written before it; the step adds 1
    logits: torch.Tensor     # (V,) float32: the step's last-position logits


def msa_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any,
               scaling: float | None = None, dropout: float = 0.0, sliding_window: int | None = None,
               softcap: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """AttentionInterface entry: route to the active request's state, or plain SDPA outside one."""
    st = CURRENT_STATE.get()
    if st is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, sliding_window=sliding_window, **kwargs)
    return attend(st, module.layer_idx, query, key, value, scaling, sliding_window, softcap), None


def attend(st: ForwardState, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            scaling: float | None, window: int | None, softcap: float | None) -> torch.Tensor:
    import torch

    _, Hq, T, D = q.shape
    H = k.shape[1]
    buf = st.layers.get(layer_idx)
    if buf is None:  # first forward of this request at this layer: allocate [prefix | memory | local]
        pk, pv = st.prefix[layer_idx] if st.prefix is not None else (None, None)
        mk, mv = st.pending_memory.pop(layer_idx, (None, None))
        P = 0 if pk is None else pk.shape[1]
        M = 0 if mk is None else mk.shape[1]
        cap = P + M + st.capacity
        kb = torch.empty((H, cap, D), dtype=k.dtype, device=k.device)
        vb = torch.empty((H, cap, D), dtype=v.dtype, device=v.device)
        if P:
            kb[:, :P] = pk
            vb[:, :P] = pv
        if M:
            kb[:, P:P + M] = mk
            vb[:, P:P + M] = mv
        buf = st.layers[layer_idx] = LayerBuf(kb, vb, P + M)
    if st.static is not None:
        return attend_static(st, st.static, buf, q, k, v, scaling, window, softcap)
    n0 = buf.n_local
    if n0 + T > st.capacity:
        raise RuntimeMemoryError(f"Request needs more than its {st.capacity} local-token slots; raise max_new_tokens "
                                 "or shorten the prompt.")
    s = buf.local_start + n0
    buf.k[:, s:s + T] = k[0]
    buf.v[:, s:s + T] = v[0]
    buf.n_local = n0 + T
    total = s + T
    keys, vals = buf.k[:, :total].unsqueeze(0), buf.v[:, :total].unsqueeze(0)     # (1, H, total, D)
    mask = None
    if T > 1 or window is not None:
        # (T, total) bool: memory/prefix visible, local causal (bottom-right aligned), sliding window.
        # The same for every layer of this forward with the same [prefix | memory] length and window:
        # built once per forward (``ForwardState.masks``, emptied when ``MsaEngine.forward`` ends), not per layer
        mkey = (buf.local_start, n0, T, window)
        mask = st.masks.get(mkey)
        if mask is None:
            mask = torch.ones((T, total), dtype=torch.bool, device=q.device)
            i = torch.arange(T, device=q.device).unsqueeze(1)
            j = torch.arange(n0 + T, device=q.device).unsqueeze(0)
            mask[:, buf.local_start:] = j <= n0 + i
            if window is not None and st.local_pos is not None:
                qpos = st.local_pos[n0:n0 + T].unsqueeze(1)
                mask[:, buf.local_start:] &= (qpos - st.local_pos[:n0 + T].unsqueeze(0)) < window
                P = st.prefix_len
                if P:
                    mask[:, :P] &= (qpos - torch.arange(P, device=q.device).unsqueeze(0)) < window
            st.masks[mkey] = mask
    return sdpa_over_buffer(q, keys, vals, mask, scaling, softcap)


def sdpa_over_buffer(q: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor, mask: torch.Tensor | None,
          scaling: float | None, softcap: float | None) -> torch.Tensor:
    """(1, T, Hq, D) attention of q (1, Hq, T, D) over keys/vals (1, H, S, D) under a (T, S) bool mask."""
    import torch
    import torch.nn.functional as F

    Hq, D, H = q.shape[1], q.shape[3], keys.shape[1]
    scale = scaling if scaling is not None else D ** -0.5
    if softcap is None:
        out = F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask, scale=scale, enable_gqa=(Hq != H))
    else:  # logit soft-capping (Gemma 2): explicit attention
        rep = Hq // H
        kk, vv = keys.repeat_interleave(rep, 1), vals.repeat_interleave(rep, 1)
        w = (q @ kk.transpose(-1, -2)) * scale
        w = torch.tanh(w / softcap) * softcap
        if mask is not None:
            w = w.masked_fill(~mask, float("-inf"))
        out = torch.softmax(w.float(), -1).to(q.dtype) @ vv
    return out.transpose(1, 2).contiguous()                                        # (1, T, Hq, D)


def attend_static(st: ForwardState, sp: StaticStep, buf: LayerBuf, q: torch.Tensor, k: torch.Tensor,
                   v: torch.Tensor, scaling: float | None, window: int | None, softcap: float | None) -> torch.Tensor:
    """One decoding token against the whole [prefix | memory | local] buffer, with no host-side index:
    its k/v go to slot ``local_start + sp.n`` and the mask is built from ``sp.n`` / ``sp.pos`` on the
    device (the same visibility as the dynamic path: prefix and memory, local tokens up to this one,
    sliding windows on prefix and local positions; memory always visible)."""
    import torch

    if q.shape[2] != 1:
        raise RuntimeMemoryError("The fixed-shape decoding step takes one token per forward.")
    L, cap = buf.local_start, buf.k.shape[1]
    slot = sp.n + L                                                                 # (1,) long, on the device
    buf.k.index_copy_(1, slot, k[0])
    buf.v.index_copy_(1, slot, v[0])
    mkey = ("static", L, cap, window)
    mask = st.masks.get(mkey)
    if mask is None:
        j = torch.arange(cap, device=q.device)
        vis = j <= slot
        if window is not None:
            P = st.prefix_len
            kpos = torch.cat([torch.arange(P, device=q.device), torch.zeros(L - P, dtype=torch.long, device=q.device),
                              st.local_pos[:cap - L]])
            vis = vis & (((sp.pos[0] - kpos) < window) | ((j >= P) & (j < L)))
        mask = st.masks[mkey] = vis.view(1, cap)
    return sdpa_over_buffer(q, buf.k.unsqueeze(0), buf.v.unsqueeze(0), mask, scaling, softcap)


def register_attention() -> None:
    global _REGISTERED
    if not _REGISTERED:
        from transformers import AttentionInterface

        AttentionInterface.register(ATTN_NAME, msa_attention)
        _REGISTERED = True
