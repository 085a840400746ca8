"""Attention functions for :meth:`msa_memory.encode.forward.Backbone.run`: plain causal attention (the HF
model's own result), sliding windows, and packed block-diagonal attention over several documents in one
sequence (:class:`PackedCausalAttention`, what the encoder runs), on one SDPA helper with GQA and soft cap.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from msa_memory.encode.forward import AttnCall
from msa_memory.errors import ConfigError, EncodeError

__all__ = ["sdpa", "windowed_causal", "causal_attention", "PackedCausalAttention"]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scaling: float,
         is_causal: bool = False, mask: torch.Tensor | None = None,
         softcap: float | None = None) -> torch.Tensor:
    """Scaled dot-product attention with GQA and optional soft cap.

    q (B, Hq, Tq, D); k, v (B, Hkv, Tk, D) with Hq a multiple of Hkv; ``mask`` a bool tensor
    broadcastable to (B, Hq, Tq, Tk), True = attend. ``is_causal`` aligns the causal diagonal
    top-left (Tq == Tk expected). Returns (B, Hq, Tq, D).
    """
    n_rep = q.shape[1] // k.shape[1]
    if softcap is not None:  # SDPA cannot soft-cap: plain maths, fp32 softmax (as HF eager)
        kr = k.repeat_interleave(n_rep, dim=1) if n_rep > 1 else k
        vr = v.repeat_interleave(n_rep, dim=1) if n_rep > 1 else v
        s = torch.matmul(q, kr.transpose(-1, -2)) * scaling  # (B, Hq, Tq, Tk)
        s = torch.tanh(s / softcap) * softcap
        if is_causal:
            tq, tk = q.shape[2], k.shape[2]
            mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril() if mask is None else mask
        if mask is not None:
            s = s.masked_fill(~mask, torch.finfo(s.dtype).min)
        p = torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(p, vr)
    if n_rep > 1 and mask is None and (q.device.type == "cpu" or (
            q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256)):
        # no mask: the flash kernels take GQA natively (as HF's sdpa path does), no K/V copies
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=is_causal, scale=scaling, enable_gqa=True)
    if n_rep > 1:
        # repeat_kv as HF does (SDPA's enable_gqa is not taken by every CPU/CUDA kernel with a mask)
        b, h, t, d = k.shape
        k = k[:, :, None].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)
        v = v[:, :, None].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal and mask is None, scale=scaling)


_MASKS: dict[tuple[int, int, str], torch.Tensor] = {}


def _window_mask(n: int, window: int, device: torch.device) -> torch.Tensor:
    """(n, n) bool: causal and q - k < window (HF's sliding_window_overlay)."""
    key = (n, window, str(device))
    m = _MASKS.get(key)
    if m is None:
        i = torch.arange(n, device=device)
        d = i[:, None] - i[None, :]
        m = (d >= 0) & (d < window)
        if len(_MASKS) > 64:
            _MASKS.clear()
        _MASKS[key] = m
    return m


_BANDS: dict[tuple[int, int, int, int, str], torch.Tensor] = {}


def _band_mask(nq: int, q0: int, nk: int, k0: int, window: int, device: torch.device) -> torch.Tensor:
    """(nq, nk) bool for queries at q0.. and keys at k0..: 0 <= q - k < window."""
    key = (nq, nk, q0 - k0, window, str(device))
    m = _BANDS.get(key)
    if m is None:
        d = (torch.arange(nq, device=device)[:, None] + q0) - (torch.arange(nk, device=device)[None, :] + k0)
        m = (d >= 0) & (d < window)
        if len(_BANDS) > 64:
            _BANDS.clear()
        _BANDS[key] = m
    return m


def windowed_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scaling: float,
                    window: int | None, softcap: float | None = None) -> torch.Tensor:
    """Causal self-attention of (B, H, T, D) rows with an optional sliding window, in O(T * W).

    T <= W: one causal SDPA call. Longer: query blocks of W tokens attend to the keys of their
    own and the previous block with a band mask (never a (T, T) mask).
    """
    t = q.shape[2]
    if window is None or t <= window:
        return sdpa(q, k, v, scaling=scaling, is_causal=True, softcap=softcap)
    if t <= 2 * window:
        return sdpa(q, k, v, scaling=scaling, mask=_window_mask(t, window, q.device), softcap=softcap)
    out = torch.empty_like(q)
    for s in range(0, t, window):
        e = min(s + window, t)
        ks = max(0, s - window + 1)
        mask = _band_mask(e - s, s, e - ks, ks, window, q.device)
        out[:, :, s:e] = sdpa(q[:, :, s:e], k[:, :, ks:e], v[:, :, ks:e], scaling=scaling, mask=mask,
                              softcap=softcap)
    return out


def causal_attention(call: AttnCall) -> torch.Tensor:
    """Plain causal attention of each batch row over itself (sliding window and soft cap honoured).

    The attention function that makes :meth:`Backbone.run` equal the unmodified HF forward of
    unpadded sequences.
    """
    return windowed_causal(call.q, call.k, call.v, scaling=call.scaling, window=call.sliding_window,
                           softcap=call.softcap)


class PackedCausalAttention:
    """Block-diagonal causal attention over packed sequences (batch row 0 holds them all).

    ``seq_lens`` gives the lengths of the consecutive sequences packed in a (1, ·, T, D) batch;
    each attends causally to itself only (with the layer's sliding window). Strategies:

    * ``"loop"``: one SDPA call per sequence on views of q/k/v (no copies; best on CPU);
    * ``"bucket"``: sequences of similar length (within ``1/bucket_ratio``) are gathered into a
      right-padded (n, H, Lmax, D) batch and run in one SDPA call. Right padding is exact with a
      causal mask -- real queries never see the padded keys after them -- and padded rows are
      dropped; only attention (not the projections/MLP) pays the padding (best on GPU);
    * ``"auto"``: ``"loop"`` on CPU, ``"bucket"`` elsewhere.
    """

    def __init__(self, seq_lens: Sequence[int], device: torch.device | str,
                 strategy: Literal["auto", "loop", "bucket"] = "auto", bucket_ratio: float = 0.8):
        lens = [int(n) for n in seq_lens]
        if not lens or min(lens) <= 0:
            raise ConfigError(f"seq_lens must be a non-empty list of positive lengths, got {lens!r}.")
        if strategy not in ("auto", "loop", "bucket"):
            raise ConfigError(f"strategy must be 'auto', 'loop' or 'bucket', got {strategy!r}.")
        device = torch.device(device)
        if strategy == "auto":
            strategy = "loop" if device.type == "cpu" else "bucket"
        self.strategy = strategy
        self.seq_lens = lens
        self.total = sum(lens)
        starts = [0]
        for n in lens[:-1]:
            starts.append(starts[-1] + n)
        self.starts = starts
        self._equal = len(set(lens)) == 1
        self._buckets: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        if strategy == "bucket" and not self._equal:
            order = sorted(range(len(lens)), key=lambda i: -lens[i])
            groups: list[list[int]] = []
            for i in order:
                if groups and lens[i] >= bucket_ratio * lens[groups[-1][0]]:
                    groups[-1].append(i)
                else:
                    groups.append([i])
            to = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(device)
            for g in groups:
                lmax = lens[g[0]]
                # gather index (n*Lmax,) into T+1 rows (row T is a zero pad row)
                st, ln, ar = np.asarray(starts)[g], np.asarray(lens)[g], np.arange(lmax)
                flat = np.where(ar[None] < ln[:, None], st[:, None] + ar[None], self.total).reshape(-1)
                src = np.flatnonzero(flat < self.total)  # real slots of the padded batch
                # index tensors made here, once: no boolean indexing (a device sync) per layer
                self._buckets.append((lmax, to(flat), to(src), to(flat[src])))

    def __call__(self, call: AttnCall) -> torch.Tensor:
        q, k, v = call.q, call.k, call.v  # (1, H*, T, D)
        if q.shape[0] != 1 or q.shape[2] != self.total:
            raise EncodeError(
                f"PackedCausalAttention expects one packed row of {self.total} tokens, got q of shape "
                f"{tuple(q.shape)}.")
        if not call.output_needed:  # kv_only_last: nobody reads this output
            return q
        if len(self.seq_lens) == 1:
            return causal_attention(call)
        w = call.sliding_window
        if self.strategy == "bucket" and self._equal:
            # equal lengths: (1, H, n*L, D) -> (n, H, L, D) strided views, no gather
            n, ln = len(self.seq_lens), self.seq_lens[0]
            sp = lambda x: x[0].unflatten(1, (n, ln)).transpose(0, 1)
            ob = windowed_causal(sp(q), sp(k), sp(v), scaling=call.scaling, window=w, softcap=call.softcap)
            return ob.transpose(0, 1).flatten(1, 2)[None]
        out = torch.empty_like(q)
        if self.strategy == "loop":
            for s, n in zip(self.starts, self.seq_lens):
                out[:, :, s:s + n] = windowed_causal(q[:, :, s:s + n], k[:, :, s:s + n], v[:, :, s:s + n],
                                                     scaling=call.scaling, window=w, softcap=call.softcap)
            return out
        pad = lambda x: torch.cat([x[0], x.new_zeros(x.shape[1], 1, x.shape[3])], dim=1)  # (H, T+1, D)
        qp, kp, vp = pad(q), pad(k), pad(v)
        o2 = out[0]  # (Hq, T, D) view
        for lmax, flat, src, dst in self._buckets:
            n = flat.shape[0] // lmax
            gb = lambda x: x.index_select(1, flat).reshape(x.shape[0], n, lmax, x.shape[2]).transpose(0, 1)
            mask = _window_mask(lmax, w, q.device) if w is not None and lmax > w else None
            ob = sdpa(gb(qp), gb(kp), gb(vp), scaling=call.scaling, is_causal=mask is None,
                      mask=mask, softcap=call.softcap)  # (n, Hq, Lmax, D)
            ob = ob.transpose(0, 1).reshape(o2.shape[0], n * lmax, o2.shape[2])
            o2.index_copy_(1, dst, ob.index_select(1, src))
        return out


# ----------------------------------------------------------------------------- backbone
