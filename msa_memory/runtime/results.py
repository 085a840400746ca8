"""Result records of the runtime: what was retrieved (per round, per layer), what was answered, how long it took.

Design note. Plain dataclasses with ``to_dict()`` (JSON-ready, for ``msa ask --json``) and
``_repr_html_`` (notebooks). No torch, no model: built by ``memory.py`` from routing results and
the store's document table. Invariant: every document a round used is listed with its store id,
score and source, so an answer can always be traced back to passages.
"""

from __future__ import annotations

import html
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["DocHit", "Round", "Answer"]


@dataclass
class DocHit:
    """One retrieved document."""

    doc_id: int
    score: float
    source_path: str = ""
    passage_index: int = 0
    layers: list[int] = field(default_factory=list)
    """Router-layer positions that chose it (pooled mode); empty for summed-score routing."""
    preview: str = ""


@dataclass
class Round:
    """One retrieval round: the documents chosen and what the model generated in it."""

    index: int
    docs: list[DocHit]
    generated: str = ""
    per_layer: dict[int, list[int]] = field(default_factory=dict)
    """Router-layer position → chosen doc ids (pooled mode: each router layer routes on its own)."""


@dataclass
class Answer:
    """The result of :meth:`Memory.ask`."""

    question: str
    answer: str
    mode: str
    rounds: list[Round]
    timings: dict[str, float]
    """Seconds: routing_s, fetch_s, prefill_s (incl. routing and fetch), decode_s, total_s."""
    n_prompt_tokens: int = 0
    n_new_tokens: int = 0
    stop_reason: str = ""
    """``"eos"``, ``"stop"`` (a stop string or protocol marker) or ``"length"`` (max_new_tokens)."""
    tokens: list[int] = field(default_factory=list)
    """Generated token ids of the final answer phase (before stop-string cutting)."""

    @property
    def docs(self) -> list[DocHit]:
        """Documents of all rounds, first occurrence kept."""
        seen: dict[int, DocHit] = {}
        for r in self.rounds:
            for d in r.docs:
                seen.setdefault(d.doc_id, d)
        return list(seen.values())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return self.answer

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><td>{r.index}</td><td>{d.doc_id}</td><td>{d.score:.4g}</td><td>{html.escape(d.source_path)}</td>"
            f"<td>{d.passage_index}</td><td>{html.escape(d.preview)}</td></tr>" for r in self.rounds for d in r.docs)
        t = ", ".join(f"{k}={v * 1000:.1f} ms" for k, v in self.timings.items())
        return (f"<div><b>Q:</b> {html.escape(self.question)}<br><b>A ({html.escape(self.mode)}):</b> "
                f"{html.escape(self.answer)}<br><small>{t}; {self.n_prompt_tokens} prompt tokens, "
                f"{self.n_new_tokens} new</small><table><tr><th>round</th><th>doc</th><th>score</th><th>source</th>"
                f"<th>passage</th><th>text</th></tr>{rows}</table></div>")
