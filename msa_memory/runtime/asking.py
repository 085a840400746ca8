"""The answering verbs of :class:`~msa_memory.runtime.memory.Memory`: ``ask`` in its three modes and the
generation helpers they share (and ``interleave.py`` calls).

Design note. ``memory.py`` opens a store version for a model and routes (construction, loading, ``route``,
``search``); this module turns routes into answers: ``pooled`` (each router layer attends to its own
top-k documents' pooled K̄V̄; the engine routes inside the forward), ``text`` (the routed passages' raw text
before the question) and ``interleave`` (``interleave.ask_interleave``). :class:`AskVerbs` is a mixin:
it holds no state of its own and reads the attributes ``Memory.__init__`` sets (listed on the class).

What it does not do: route (``Memory.route``), open stores or load models.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable, Literal, Sequence

from msa_memory.errors import ConfigError
from msa_memory.runtime.generation import generate, stop_at
from msa_memory.runtime.hybrid import Retriever, check_retriever
from msa_memory.runtime.prompts import PromptIds
from msa_memory.runtime.results import Answer, Round

if TYPE_CHECKING:
    import torch

__all__ = ["AskVerbs", "DEFAULT_STOPS", "Mode"]

Mode = Literal["pooled", "text", "interleave"]
_MODES = ("pooled", "text", "interleave")
#: Section markers of our own prompts; a base model that starts repeating them has finished its answer.
DEFAULT_STOPS = ("\n\nPassage ", "\nQuestion:")


class AskVerbs:
    """``ask`` and its generation helpers, mixed into :class:`~msa_memory.runtime.memory.Memory`."""

    # what Memory.__init__ sets and these verbs read
    engine: Any
    tokenizer: Any
    model: Any
    store: Any
    device: torch.device
    identity: Any
    layout: Any
    routing: Any
    suffix_rows: int
    prefix: Any
    query_suffix: str
    reader: Any
    reader_prefix: Any

    def eos_ids(self) -> list[int]:
        ids = set()
        tok = self.tokenizer
        if tok.eos_token_id is not None:
            ids.add(int(tok.eos_token_id))
        gc = getattr(self.model.hf_model, "generation_config", None)
        e = getattr(gc, "eos_token_id", None)
        ids.update([e] if isinstance(e, int) else list(e or []))
        for t in ("<|im_end|>", "<end_of_turn>"):
            i = tok.convert_tokens_to_ids(t)
            if isinstance(i, int) and i != tok.unk_token_id and i is not None:
                ids.add(i)
        return sorted(ids)

    def generate_ids(self, state: Any, prompt: PromptIds, positions: list[int], **kw: Any) -> tuple[list[int], str]:
        """Prefill ``prompt`` into ``state`` then decode; returns (new token ids, stop reason)
        (:func:`msa_memory.runtime.generation.generate`; keywords as there)."""
        return generate(self.engine, self.tokenizer, self.device, self.eos_ids(), state, prompt, positions, **kw)

    def answer_text(self, ids: list[int], stop_strings: Sequence[str]) -> str:
        return stop_at(self.tokenizer.decode(ids, skip_special_tokens=True), stop_strings).strip()

    def ask(self, question: str | Sequence[int], mode: Mode | None = None, *, k: int | None = None,
            max_new_tokens: int = 64,
            temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, max_rounds: int = 3,
            on_token: Callable[[str], None] | None = None, stop_strings: Sequence[str] | None = None,
            retriever: Retriever = "routing", reader: bool | None = None) -> Answer:
        """Answer ``question`` from memory.

        Parameters
        ----------
        question : str or token ids
            Text, or token ids as in :meth:`route` (every mode; the answer's ``question`` is then
            their decoded text).
        mode : {"pooled", "text", "interleave"}, default: "pooled" for MSA stores, else "text"
        k : int, default: the router's top_k
        max_new_tokens : int, default 64
        temperature : float, default 0.0 (greedy); top_p : float, default 1.0; seed : int, optional
        max_rounds : int, default 3 (interleave)
        on_token : callable, optional
            Called with each new piece of answer text as it is generated (streaming).
        stop_strings : sequence of str, optional
            Generation stops when the answer contains one of them (it is cut there). Default: the
            prompt's own section markers (``"\\n\\nPassage "``, ``"\\nQuestion:"``), which a base model
            starts to repeat once it has answered.
        retriever : {"routing", "hybrid"}, default "routing"
            "hybrid" reads the passages :meth:`search` with ``retriever="hybrid"`` ranks first, in text
            mode (the default mode with it); pooled and interleave modes route inside the model's forward
            (every router layer its own documents) and refuse it.
        reader : bool, optional
            Pooled mode: answer with the Memory's reader adapter (``Memory(reader=...)``). Default: when the
            Memory has one. The documents are routed without it either way.
        """
        retriever = check_retriever(retriever)
        mode = mode or ("text" if retriever == "hybrid" else "pooled" if self.identity.wrap == "msa" else "text")
        if mode not in _MODES:
            raise ConfigError(f"mode={mode!r} is not one of {list(_MODES)}.")
        if retriever == "hybrid" and mode != "text":
            raise ConfigError(f"retriever='hybrid' picks the passages of mode='text'; mode={mode!r} routes inside the "
                              "model's forward, each router layer choosing its own documents.",
                              hint="Ask with mode='text' (--mode text) for hybrid retrieval, or keep retriever='routing'.")
        question = self._question(question)
        if int(max_new_tokens) < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens!r}.")
        t0 = time.perf_counter()
        stops = tuple(stop_strings) if stop_strings is not None else DEFAULT_STOPS
        kw = dict(max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_p=float(top_p), seed=seed,
                  on_token=on_token, stop_strings=stops)
        use_reader = bool(self.reader is not None if reader is None else reader) and mode == "pooled"
        if reader and mode != "pooled":
            raise ConfigError(f"reader=True applies to mode='pooled'; mode={mode!r} reads passages as text.",
                              hint="Ask with mode='pooled', or leave reader unset.")
        if use_reader and self.reader is None:
            raise ConfigError("reader=True, but this Memory has no reader adapter.",
                              hint="Open it with Memory(..., reader=FOLDER) (a `msa train-reader --out` folder).")
        if mode == "pooled":
            ans = self._ask_pooled(question, k, kw, use_reader)
        elif mode == "text":
            ans = self._ask_text(question, k, kw, retriever)
        else:
            from msa_memory.runtime.interleave import ask_interleave

            ans = ask_interleave(self, question, k, int(max_rounds), kw)
        ans.timings["total_s"] = time.perf_counter() - t0
        return ans

    def pooled_routes(self, question: str | list[int], k: int, timings: dict[str, float] | None = None) -> dict[int, Any]:
        """Every router layer's top-k of a pooled answer to ``question``, from a forward without the reader.

        The router reads the question where the query suffix ends, but the answer must not see the suffix (and
        a reader adapter must not change routes): a forward of the question (+ suffix) routes, memory attached
        layer by layer as in the prefill, and the answer's prefill then takes these routes."""
        P = len(self.layout.head_ids())
        if self.query_suffix:
            rq, rows = self.layout.encode([(question, True), (self.query_suffix, True)]), self.suffix_rows
        else:
            rq, rows = self.layout.question(question), 0
        return self.engine.pooled_routes(rq.ids, list(range(P + k, P + k + len(rq.ids))), rq.route_rows, self.prefix,
                                         k, timings, rows)

    def _ask_pooled(self, question: str | list[int], k: int | None, kw: dict[str, Any],
                    reader: bool = False) -> Answer:
        timings: dict[str, float] = {}
        prefix = self.prefix
        P = len(self.layout.head_ids())
        kk = int(k or self.routing.top_k)
        q = self.layout.question(question)
        st = self.engine.new_state(len(q.ids) + kw["max_new_tokens"] + 1, self.reader_prefix if reader else prefix,
                                   top_k=kk, reader=reader)
        pos = list(range(P + kk, P + kk + len(q.ids)))                 # §3.2: query starts at P + k
        if self.query_suffix or reader:
            st.preset_routes = self.pooled_routes(question, kk, st.timings)
        toks, reason = self.generate_ids(st, q, pos, route=True, timings=timings, **kw)
        timings.update(st.timings)
        hits, per_layer = self.layer_hits(st.routes)
        rnd = Round(0, hits, per_layer=per_layer)
        text = self.answer_text(toks, kw["stop_strings"])
        rnd.generated = text
        return Answer(self.question_text(question), text, "pooled", [rnd], timings, len(q.ids) + P, len(toks), reason,
                      toks)

    def _ask_text(self, question: str | list[int], k: int | None, kw: dict[str, Any],
                  retriever: Retriever = "routing") -> Answer:
        ids, scores, rt = self.route(question, k, retriever=retriever)
        timings = {"routing_s": rt["route_total_s"]}
        t = time.perf_counter()
        texts = self.store.texts(ids.tolist())
        timings["fetch_s"] = time.perf_counter() - t
        prompt = self.layout.with_passages(question, list(zip(ids.tolist(), texts)))
        head = self.layout.head_ids()
        full = PromptIds(head + prompt.ids, [False] * len(head) + prompt.route_rows)
        st = self.engine.new_state(len(full.ids) + kw["max_new_tokens"] + 1)
        toks, reason = self.generate_ids(st, full, list(range(len(full.ids))), route=False, timings=timings, **kw)
        text = self.answer_text(toks, kw["stop_strings"])
        rnd = Round(0, self.hits(ids, scores), generated=text)
        return Answer(self.question_text(question), text, "text", [rnd], timings, len(full.ids), len(toks), reason,
                      toks)
