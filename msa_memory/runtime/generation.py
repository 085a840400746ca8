"""One answer's generation: prefill a prompt, decode with streaming and stop strings.

:func:`generate` is what every mode of ``runtime.Memory`` (and ``runtime.interleave``) decodes with;
``Memory.generate_ids`` calls it with the memory's engine, tokenizer and end-of-sequence ids.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from msa_memory.runtime.engine import sync_device
from msa_memory.runtime.prompts import PromptIds

__all__ = ["generate", "stop_at", "holds_stop_prefix"]


def stop_at(text: str, stops: Sequence[str]) -> str:
    """``text`` up to the first stop string."""
    cut = min((i for i in (text.find(x) for x in stops) if i >= 0), default=len(text))
    return text[:cut]


def holds_stop_prefix(text: str, stops: Sequence[str]) -> bool:
    """True if ``text`` ends with the beginning of a stop string (hold it back while streaming)."""
    return any(text.endswith(x[:n]) for x in stops for n in range(1, len(x)))


def generate(engine: Any, tokenizer: Any, device: Any, eos: list[int], state: Any, prompt: PromptIds,
             positions: list[int], *, route: bool, max_new_tokens: int, temperature: float, top_p: float,
             seed: int | None, on_token: Callable[[str], None] | None, timings: dict[str, float],
             stop: Callable[[list[int]], bool] | None = None,
             stop_strings: Sequence[str] = ()) -> tuple[list[int], str]:
    """Prefill ``prompt`` into ``state`` with ``engine``, then decode until one of ``eos``, ``stop``, a stop
    string or ``max_new_tokens``; returns (new token ids, stop reason: "eos", "stop" or "length").
    ``on_token`` receives the answer's text piece by piece, a possible stop string's start held back;
    ``timings`` gains prefill_s, first_token_s and decode_s (seconds)."""
    if stop_strings and stop is None:
        tok_ = tokenizer

        def stop(ids: list[int]) -> bool:
            text = tok_.decode(ids[-16:], skip_special_tokens=True)
            return any(x in text for x in stop_strings)

    import torch

    t0 = time.perf_counter()
    logits = engine.forward(state, prompt.ids, positions, route_rows=prompt.route_rows if route else None)
    sync_device(device)
    timings["prefill_s"] = timings.get("prefill_s", 0.0) + time.perf_counter() - t0
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    t1 = time.perf_counter()
    out: list[int] = []
    shown = ""
    for tok in engine.decode(state, logits, positions[-1] + 1, max_new_tokens=max_new_tokens, eos_ids=eos,
                                  temperature=temperature, top_p=top_p, generator=gen, stop=stop):
        out.append(tok)
        if on_token is not None:
            text = stop_at(tokenizer.decode(out, skip_special_tokens=True), stop_strings)
            if len(text) > len(shown) and not text.endswith("\ufffd") and not holds_stop_prefix(text, stop_strings):
                on_token(text[len(shown):])
                shown = text
        if "first_token_s" not in timings:
            timings["first_token_s"] = time.perf_counter() - t0
    if on_token is not None:  # flush what was held back as a possible stop-string start
        text = stop_at(tokenizer.decode(out, skip_special_tokens=True), stop_strings)
        if len(text) > len(shown):
            on_token(text[len(shown):])
    timings["decode_s"] = timings.get("decode_s", 0.0) + time.perf_counter() - t1
    reason = "eos" if out and out[-1] in eos else ("stop" if stop is not None and out and stop(out) else "length")
    return out, reason
