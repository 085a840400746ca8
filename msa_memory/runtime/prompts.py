"""Prompt layouts of the runtime: token segments with a routing flag, built per model family.

Design note. A prompt is a list of segments ``(text, routes)`` tokenized one by one
(``add_special_tokens=False``) and concatenated, so the routing-token rows (the reference's
``doc_ids == 0``) are exact — the reference finds them by re-tokenizing string prefixes, which can
be off by one at BPE boundaries (§9.8).

- MSA checkpoints (store wrap ``"msa"``): the exact §3.1 strings — template head
  ``<|im_start|>user\\n`` (the cached prefix), then the instruction-wrapped question (routes), the
  tail ``<|im_end|>\\n`` and the response head ``<|im_start|>``.
- Other models: the chat template (if the tokenizer has one) rendered around a sentinel and cut
  there: head = prefix, the question routes, the tail (with the generation prompt) does not.
  Without a chat template: BOS (if any) as the prefix, then the question, then ``"\\nAnswer:"``.

Text mode puts the chosen passages' raw text before the question inside the same layout.
A question given as token ids (a list of ints) is a segment of its own, taken as it is, between the
tokens of the fixed strings around it.
What it does not do: run the model. Invariant: ``ids`` and ``route_rows`` have equal length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence, Union

__all__ = ["Layout", "PromptIds", "layout_for", "MSA_INSTRUCTION", "MSA_RETURN_DOCS"]

MSA_INSTRUCTION = "\nPlease answer the question based on the above historical document information\n\n"
MSA_RETURN_DOCS = "Please return all documents related to the question\n"
_SENTINEL = "\x00MSA_SENTINEL\x00"

#: A prompt segment's content: text (tokenized on its own) or token ids (taken as they are).
Segment = Union[str, Sequence[int]]


@dataclass
class PromptIds:
    """Token ids of the local part of a prompt (after the cached prefix) and its routing rows."""

    ids: list[int]
    route_rows: list[bool]

    def __post_init__(self) -> None:
        assert len(self.ids) == len(self.route_rows)

    def __add__(self, other: PromptIds) -> PromptIds:
        return PromptIds(self.ids + other.ids, self.route_rows + other.route_rows)


@dataclass
class Layout:
    """How questions, passages and answers are laid out for one tokenizer / wrap style."""

    tokenizer: Any
    msa: bool
    head: str
    tail: str

    def encode(self, segments: Sequence[tuple[Segment, bool]]) -> PromptIds:
        ids: list[int] = []
        rows: list[bool] = []
        for text, routes in segments:
            if not len(text):
                continue
            t = self.tokenizer(text, add_special_tokens=False)["input_ids"] if isinstance(text, str) else \
                [int(i) for i in text]
            ids += list(t)
            rows += [routes] * len(t)
        return PromptIds(ids, rows)

    def head_ids(self) -> list[int]:
        """The template head: the cached prefix at positions 0..P-1."""
        return self.encode([(self.head, False)]).ids

    def _msa_question(self, question: Segment) -> list[tuple[Segment, bool]]:
        """The routing segments of MSA's instruction-wrapped question (one string for a text question)."""
        if isinstance(question, str):
            return [(MSA_INSTRUCTION + question + "\n" + MSA_RETURN_DOCS, True)]
        return [(MSA_INSTRUCTION, True), (question, True), ("\n" + MSA_RETURN_DOCS, True)]

    def question(self, question: Segment) -> PromptIds:
        """Pooled / routing layout: the question (text or token ids) routes, the template tail does not."""
        if self.msa:
            return self.encode([*self._msa_question(question), (self.tail, False)])
        return self.encode([(question, True), (self.tail, False)])

    def with_passages(self, question: Segment, passages: Sequence[tuple[int, str]]) -> PromptIds:
        """Text mode: passages' raw text before the question (text or token ids); only the question routes."""
        if self.msa:
            docs = "".join(f"[{i}]. {text}\n" for i, text in passages)
            return self.encode([(docs, False), *self._msa_question(question), (self.tail, False)])
        docs = "".join(f"Passage {n + 1}:\n{text.strip()}\n\n" for n, (_, text) in enumerate(passages))
        pre = "Answer the question using the passages below.\n\n" if passages else ""
        return self.encode([(pre + docs + "Question: ", False), (question, True), (self.tail, False)])


def layout_for(tokenizer: Any, wrap: str = "plain", use_chat_template: bool | None = None) -> Layout:
    """Build the :class:`Layout` of a tokenizer; ``wrap="msa"`` selects the reference §3.1 strings."""
    if wrap == "msa":
        return Layout(tokenizer, True, "<|im_start|>user\n", "<|im_end|>\n<|im_start|>")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if use_chat_template is None:
        use_chat_template = has_template
    if use_chat_template and has_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": _SENTINEL}], tokenize=False,
                                             add_generation_prompt=True)
        if _SENTINEL in text:
            head, tail = text.split(_SENTINEL, 1)
            return Layout(tokenizer, False, head, tail)
    bos = getattr(tokenizer, "bos_token", None) or ""
    return Layout(tokenizer, False, bos, "\nAnswer:")
