"""Run an HF decoder backbone with caller-controlled positions and attention.

This is the one mechanism through which msa-memory drives a Hugging Face causal LM (Qwen3, Qwen2,
Llama, Mistral, Gemma 3): the encoder (packed block-diagonal attention + K/V capture), the runtime
(MSA pooled generation with its own KV cache) and router training all use :class:`Backbone`.

How it works: a manual loop over the model's own decoder-layer modules (so the per-family maths --
norms, q/k norms, RoPE, Gemma's scaled embedding and extra norms -- stays HF's code), with

* caller-given ``position_ids`` turned into RoPE cos/sin by the model's own rotary module (Gemma 3:
  one per layer type, local 10k / global 1M bases);
* an attention function registered in transformers' ``AttentionInterface`` under the name
  ``"msa_memory"``; during :meth:`Backbone.run` the model config's ``_attn_implementation`` is
  switched to it (and restored afterwards), so each layer's attention module computes q/k/v exactly
  as HF does and then hands them to the caller's function as an :class:`AttnCall`;
* forward hooks on ``input_layernorm`` to observe the router inputs;
* :meth:`Backbone.logits` applying the final norm + LM head to chosen positions only.

What it deliberately does not do: build any HF attention mask (no O(T^2) tensors are made unless a
caller's attention function makes them), touch the HF cache, or run layers past ``stop_after``.
The attention functions callers pass (:func:`~msa_memory.encode.attention.causal_attention`,
:class:`~msa_memory.encode.attention.PackedCausalAttention`) are in :mod:`msa_memory.encode.attention`.
Key invariant: with ``causal_attention`` as the attention function, :meth:`Backbone.run` +
:meth:`Backbone.logits` equal the unmodified HF model's forward (tested per family).

Thread-safety: the config switch is guarded by a re-entrant lock per config object, so concurrent
``run`` calls on one model serialise; plain ``hf_model(...)`` calls made *while* a ``run`` is in
flight on another thread would see the switched implementation -- don't mix them across threads.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.modeling_utils import AttentionInterface

from msa_memory.errors import ConfigError, EncodeError

__all__ = [
    "ATTN_IMPLEMENTATION",
    "AttnCall",
    "AttentionFn",
    "Backbone",
    "CUDA_SDPA_BACKENDS",
    "sdpa_backends",
]

#: Name under which our dispatcher is registered in transformers' AttentionInterface.
ATTN_IMPLEMENTATION = "msa_memory"
_KWARG = "msa_attention"


@dataclass
class AttnCall:
    """What one layer's attention module hands to the caller's attention function."""

    layer: int
    """Decoder layer index (0-based)."""
    q: torch.Tensor
    """(B, Hq, T, D) queries after q_norm (if the family has one) and RoPE."""
    k: torch.Tensor
    """(B, Hkv, T, D) keys after k_norm and RoPE, before GQA repetition."""
    v: torch.Tensor
    """(B, Hkv, T, D) values, before GQA repetition."""
    scaling: float
    """Softmax scale (1/sqrt(D) for most families; Gemma 3: query_pre_attn_scalar^-0.5)."""
    sliding_window: int | None
    """Window W of this layer (a query attends to keys with q_pos - k_pos < W), or None."""
    softcap: float | None
    """Attention-logit soft cap (tanh), or None."""
    position_ids: torch.Tensor | None
    """(B, T) the position ids given to :meth:`Backbone.run`."""
    module: nn.Module
    """The HF attention module (read-only use: ``num_key_value_groups``, ``head_dim``...)."""
    output_needed: bool = True
    """False at the last layer of a :meth:`Backbone.run` with ``kv_only_last=True``: nothing reads
    this call's output (the forward stops right after it), so the function may skip the attention
    itself and return anything (the encoder only pools K/V there)."""


#: An attention function returns the attention output (B, Hq, T, D) in q's dtype.
AttentionFn = Callable[[AttnCall], torch.Tensor]


def _dispatch(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: Any, dropout: float = 0.0, scaling: float | None = None,
              sliding_window: int | None = None, softcap: float | None = None, **kwargs: Any):
    fn = kwargs.get(_KWARG)
    if fn is None:
        raise EncodeError(
            f"The {ATTN_IMPLEMENTATION!r} attention implementation was called outside Backbone.run "
            "(no attention function given).",
            hint="Run the model through msa_memory.encode.forward.Backbone.run, or restore "
            "config._attn_implementation to 'sdpa'.",
        )
    if softcap is None:
        softcap = getattr(module, "attn_logit_softcapping", None)
    call = AttnCall(
        layer=int(module.layer_idx), q=query, k=key, v=value,
        scaling=float(scaling if scaling is not None else module.head_dim ** -0.5),
        sliding_window=sliding_window, softcap=softcap,
        position_ids=kwargs.get("position_ids"), module=module,
    )
    out = fn(call)  # (B, Hq, T, D)
    return out.transpose(1, 2).contiguous(), None  # HF expects (B, T, Hq, D)


AttentionInterface.register(ATTN_IMPLEMENTATION, _dispatch)

_LOCKS: dict[int, threading.RLock] = {}
_LOCKS_GUARD = threading.Lock()


def _lock_for(obj: object) -> threading.RLock:
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(id(obj), threading.RLock())


#: The SDPA kernels PyTorch may choose from on CUDA while :meth:`Backbone.run` runs (the encoder,
#: router features, template prefixes): all but cuDNN's fused attention. cuDNN builds an execution
#: plan for every new (batch, heads, length) shape it meets -- ~40 ms each on an H200 -- and packed
#: encoding meets a new set of length buckets in almost every batch. H200, Gemma 3 270M shape, 260
#: passages of 40-320 tokens with new lengths in every call (``benchmarks/bench_encode.py --fresh``,
#: same run): 423k tok/s this way, 80k with cuDNN allowed, 305k for HF's own padded backbone; equal
#: lengths (no new shapes): 556k vs 566k. The 100M-token quality haystack encoded through block 17 at
#: 626k tok/s, against 110k with cuDNN allowed. ``None`` leaves PyTorch's own choice (cuDNN first on
#: Hopper). The runtime's engine keeps PyTorch's choice: cuDNN runs its masked prefills best (8,225
#: tokens of text in 66 ms, 220 ms without it, H200), and its decoding steps showed no consistent
#: difference (24.1 vs 24.6 and 37.0 vs 29.7 ms/token without / with cuDNN in two runs).
CUDA_SDPA_BACKENDS: tuple | None = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)


@contextmanager
def sdpa_backends(device: torch.device | str) -> Iterator[None]:
    """Restrict SDPA to :data:`CUDA_SDPA_BACKENDS` while the block runs, on a CUDA ``device``.

    PyTorch keeps these flags process-wide: a thread that calls SDPA while another thread is inside
    this block also runs without cuDNN (same results up to rounding, only another kernel).
    """
    if torch.device(device).type != "cuda" or CUDA_SDPA_BACKENDS is None:
        yield
        return
    with sdpa_kernel(list(CUDA_SDPA_BACKENDS)):
        yield


class _StopForward(Exception):
    """Raised by ``Backbone.run(kv_only_last=True)`` right after the last layer's attention call."""


class Backbone:
    """Layer-by-layer driver of an HF causal LM (or its base model) with caller-owned attention.

    Parameters
    ----------
    hf_model : transformers.PreTrainedModel
        A ``*ForCausalLM`` (or its base ``*Model``) of the Qwen3, Qwen2, Llama, Mistral or Gemma 3
        families. It is used as is (no copy; weights are shared).

    Examples
    --------
    >>> bb = Backbone(hf_model)                                          # doctest: +SKIP
    >>> pos = torch.arange(ids.shape[1])[None]                          # doctest: +SKIP
    >>> h = bb.run(ids, pos, causal_attention)                           # doctest: +SKIP
    >>> logits = bb.logits(h, positions=[-1])                            # doctest: +SKIP
    """

    def __init__(self, hf_model: nn.Module):
        base = hf_model
        if not hasattr(base, "layers"):
            base = getattr(hf_model, getattr(hf_model, "base_model_prefix", "model"), None)
        if base is None or not hasattr(base, "layers") or not hasattr(base, "rotary_emb"):
            raise ConfigError(
                f"{type(hf_model).__name__} is not a supported decoder model (need .model.layers and "
                ".model.rotary_emb, as in Qwen3/Qwen2/Llama/Mistral/Gemma 3).")
        self.hf_model = hf_model
        self.base = base
        self.layers: nn.ModuleList = base.layers
        self.config = base.config
        self.n_layers = len(self.layers)
        self.lm_head: nn.Module | None = getattr(hf_model, "lm_head", None)
        self._rope_by_type = "layer_type" in inspect.signature(base.rotary_emb.forward).parameters
        self.layer_types: list[str] = list(
            getattr(self.config, "layer_types", None) or ["full_attention"] * self.n_layers)
        attn0 = self.layers[0].self_attn
        self.n_q_heads = int(self.config.num_attention_heads)
        self.n_kv_heads = int(self.config.num_key_value_heads)
        self.head_dim = int(getattr(attn0, "head_dim", self.config.hidden_size // self.n_q_heads))
        self.hidden_size = int(self.config.hidden_size)
        self._configs = {id(l.self_attn.config): l.self_attn.config for l in self.layers}

    @property
    def device(self) -> torch.device:
        return self.layers[0].input_layernorm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[0].input_layernorm.weight.dtype

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, E) input embeddings (Gemma's sqrt(E) scaling included)."""
        return self.base.embed_tokens(input_ids)

    def rope(self, x: torch.Tensor, position_ids: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE (cos, sin), each (B, T, D), of ``layer`` at ``position_ids`` (B, T)."""
        if self._rope_by_type:
            return self.base.rotary_emb(x, position_ids, self.layer_types[layer])
        return self.base.rotary_emb(x, position_ids)

    @contextmanager
    def _attn_switched(self) -> Iterator[None]:
        locks = [_lock_for(c) for c in self._configs.values()]
        for lk in locks:
            lk.acquire()
        old = {k: c._attn_implementation for k, c in self._configs.items()}
        try:
            for c in self._configs.values():
                c._attn_implementation = ATTN_IMPLEMENTATION
            yield
        finally:
            for k, c in self._configs.items():
                c._attn_implementation = old[k]
            for lk in reversed(locks):
                lk.release()

    def run(self, input_ids: torch.Tensor | None, position_ids: torch.Tensor,
            attention: AttentionFn, *, inputs_embeds: torch.Tensor | None = None,
            stop_after: int | None = None,
            on_layer_input: Callable[[int, torch.Tensor], None] | None = None,
            observe_layers: Iterable[int] | None = None, kv_only_last: bool = False) -> torch.Tensor:
        """Run decoder layers ``0 .. stop_after-1`` and return the last hidden states (B, T, E).

        Parameters
        ----------
        input_ids : (B, T) int64 tensor or None
            Token ids; or None when ``inputs_embeds`` is given.
        position_ids : (B, T) int64 tensor
            RoPE positions of every token (e.g. restarting at 0 per packed document).
        attention : AttentionFn
            Called once per layer with an :class:`AttnCall`; returns (B, Hq, T, D).
            :func:`causal_attention` reproduces the HF model.
        stop_after : int, optional
            Number of layers to run (default: all). The final norm is *not* applied (see
            :meth:`logits`).
        on_layer_input : callable(layer, x), optional
            Called with the ``input_layernorm`` output x (B, T, E) of each observed layer, before
            that layer's attention function runs (router-Q / router-K inputs).
        observe_layers : iterable of int, optional
            Layers for which ``on_layer_input`` is called (default: all that run).
        kv_only_last : bool, default False
            Run the last layer only up to its attention function (called with
            ``output_needed=False``), then stop: its attention output, ``o_proj`` and MLP are
            skipped. For callers that need only that layer's q/k/v and ``input_layernorm`` output
            (the encoder at its last router layer; router features), about one layer's FLOPs saved.

        Returns
        -------
        torch.Tensor
            (B, T, E) hidden states after layer ``stop_after - 1`` (pre final norm); with
            ``kv_only_last`` the hidden states *entering* that layer.

        Raises
        ------
        ConfigError
            ``stop_after`` out of range, or shapes that disagree.
        """
        n = self.n_layers if stop_after is None else int(stop_after)
        if not 0 < n <= self.n_layers:
            raise ConfigError(f"stop_after must be in 1..{self.n_layers}, got {stop_after!r}.")
        h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        if position_ids.shape != h.shape[:2]:
            raise ConfigError(
                f"position_ids has shape {tuple(position_ids.shape)} but the tokens have shape "
                f"{tuple(h.shape[:2])}; give one position per token.")
        hooks = []
        if on_layer_input is not None:
            watch = set(range(n)) if observe_layers is None else set(int(i) for i in observe_layers)
            for i in sorted(watch):
                if i < n:
                    hooks.append(self.layers[i].input_layernorm.register_forward_hook(
                        lambda _m, _inp, out, i=i: on_layer_input(i, out)))
        rope_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        fn = attention
        if kv_only_last:
            def fn(call: AttnCall) -> torch.Tensor:
                if call.layer != n - 1:
                    return attention(call)
                call.output_needed = False
                attention(call)
                raise _StopForward
        try:
            with self._attn_switched(), sdpa_backends(h.device):
                for i in range(n):
                    lt = self.layer_types[i] if self._rope_by_type else "all"
                    if lt not in rope_cache:
                        rope_cache[lt] = self.rope(h, position_ids, i)
                    try:
                        h = self.layers[i](h, attention_mask=None, position_ids=position_ids,
                                           position_embeddings=rope_cache[lt], past_key_values=None,
                                           use_cache=False, **{_KWARG: fn})
                    except _StopForward:
                        break
        finally:
            for hk in hooks:
                hk.remove()
        return h

    def logits(self, hidden: torch.Tensor, positions: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        """Final norm + LM head (+ final soft cap) at ``positions`` of (B, T, E) hidden states.

        Returns (B, len(positions), V) logits (all positions when ``positions`` is None).
        """
        if self.lm_head is None:
            raise ConfigError("This model has no LM head (a base model was given); load the *ForCausalLM.")
        if positions is not None:
            idx = torch.as_tensor(positions, dtype=torch.long, device=hidden.device)
            hidden = hidden.index_select(1, idx % hidden.shape[1])
        out = self.lm_head(self.base.norm(hidden))
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap is not None:
            out = torch.tanh(out / cap) * cap
        return out
