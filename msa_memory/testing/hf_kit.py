"""Reference numbers straight from a Hugging Face model, for tests that check our own paths against them."""

from __future__ import annotations

from typing import Any, Sequence

import torch


@torch.no_grad()
def layer_input(hf_model: Any, layer: int, ids: Sequence[int]) -> torch.Tensor:
    """(T, E) the ``input_layernorm`` output of decoder layer ``layer`` for token ids ``ids`` (positions from 0),
    from the unmodified HF forward: what a router reads at that layer."""
    seen: dict[str, torch.Tensor] = {}
    h = hf_model.model.layers[layer].input_layernorm.register_forward_hook(
        lambda m, i, o: seen.setdefault("x", o.detach()))
    try:
        hf_model(input_ids=torch.tensor([list(ids)]))
    finally:
        h.remove()
    return seen["x"][0]
