"""A question's routing tokens, as text-mode routing and router training both read them.

``query_tokens`` is the one definition of which tokens of a question route (the tokenizer's special
tokens around it, the leading BOS not routing, a router's query suffix appended); ``Memory`` routes
with it and ``train.features`` extracts training queries with it. ``fold_shouted`` lower-cases a question
written in capitals only, as ``Memory`` does before routing. No torch here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from msa_memory.errors import ConfigError

__all__ = ["fold_shouted", "query_tokens", "special_token_frame", "suffix_tokens", "router_suffix"]


def fold_shouted(text: str) -> str:
    """``text`` lower-cased when it is written in capitals only (two or more upper-case letters, no lower-case
    one), else ``text`` unchanged.

    A model's tokens and hidden states are case-sensitive: "DIELECTRIC CONSTANT OF LIQUIDS" splits into other
    tokens than "dielectric constant of liquids" and routes like neither prose nor its documents (BM25 and
    uncased dense retrievers fold case themselves). Questions typed with caps lock on, or copied from systems
    that keep text in capitals, route as the same words in lower case do. Mixed case (names, acronyms inside
    prose) is kept: it carries meaning the model reads.
    """
    if sum(c.isupper() for c in text) >= 2 and not any(c.islower() for c in text):
        return text.lower()
    return text


def query_tokens(tokenizer: Any, question: str | Sequence[int], suffix: str = "") -> tuple[list[int], int]:
    """(token ids, number of leading non-routing tokens) of a question as text-mode routing sees it.

    ``suffix`` (a router's ``query_suffix``) is tokenized on its own, without special tokens, and
    appended: the question's own tokens are the same with or without it. A question given as token
    ids (made without special tokens) gets the special tokens the tokenizer adds around a text.
    """
    if isinstance(question, str):
        ids = list(tokenizer(question, add_special_tokens=True)["input_ids"])
    else:
        head, tail = special_token_frame(tokenizer)
        ids = head + [int(i) for i in question] + tail
    bos = tokenizer.bos_token_id
    skip = 1 if bos is not None and ids[:1] == [bos] else 0
    if len(ids) <= skip:
        raise ConfigError(f"The query {question!r} has no tokens to route with.")
    return ids + suffix_tokens(tokenizer, suffix), skip


def special_token_frame(tokenizer: Any) -> tuple[list[int], list[int]]:
    """(ids before, ids after) that ``add_special_tokens=True`` puts around a text's tokens (e.g. ([BOS], []))."""
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    full = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    for i in range(len(full) - len(plain) + 1):
        if full[i:i + len(plain)] == plain:
            return full[:i], full[i + len(plain):]
    bos = tokenizer.bos_token_id
    return ([bos] if bos is not None and full[:1] == [bos] else []), []


def suffix_tokens(tokenizer: Any, suffix: str) -> list[int]:
    """The token ids of a query suffix as :func:`query_tokens` appends them (tokenized on its own, no special
    tokens; [] for none): their count is the routing rows that only suffix queries read."""
    return list(tokenizer(suffix, add_special_tokens=False)["input_ids"]) if suffix else []


def router_suffix(loaded: Any) -> str:
    """The query suffix of ``loaded``'s router ("" for none)."""
    return str(getattr(getattr(getattr(loaded, "router", None), "config", None), "query_suffix", "") or "")
