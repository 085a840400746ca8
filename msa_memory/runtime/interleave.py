"""Memory Interleave: multi-round retrieval (msa-reference §5), with a round cap and causal masking.

Design note. Two protocols behind one call, :func:`ask_interleave`:

- MSA checkpoints (store wrap ``"msa"``): §5.2. Each round is a fresh pooled prefill of
  [question layout | everything generated and injected so far]; the routing query is the
  instruction + question plus the *latest* injected document block (the reference's doc_ids == 0
  regions, here exact because segments are tokenized apart). The model decodes document ids
  ``[n]`` ending in ``<|object_ref_end|>``; those documents' raw text ``"[n]. text\\n"`` is injected
  and the next round starts. When it emits ``<End-of-Retrieve>`` (or the round cap is reached),
  ``<|im_start|>The user's question is: Q\\n<|object_ref_end|>`` is forwarded through the same
  cache — causally, where the reference attends bidirectionally (§9.9) — and the answer is
  decoded; the text after ``The answer to the question is:`` is the answer.
- Other models: route → inject → re-route. Round 0 routes the question; round r routes the
  question plus the text injected in round r-1 and adds up to k documents not yet chosen; it stops
  when nothing new comes back or at the cap, then answers in text mode over all chosen documents.

A question given as token ids takes the text's place as a segment of its own, in the routing
layout, the answer cue and (other models) the re-routing query.

What it does not do: batch several questions (the reference's pausing machinery is not needed for
one sequence). Invariant: at most ``max_rounds`` retrieval rounds; every injected id exists.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from typing import Any, Protocol

from msa_memory.runtime.engine import sync_device
from msa_memory.runtime.prompts import PromptIds
from msa_memory.runtime.results import Answer, DocHit, Round

__all__ = ["ask_interleave", "requested_ids", "inject", "ROUND_END", "END_RETRIEVE", "ANSWER_PREFIX"]

ROUND_END = "<|object_ref_end|>"
END_RETRIEVE = "<End-of-Retrieve>"
ANSWER_PREFIX = "The answer to the question is:"
_ID = re.compile(r"\[(\d+)\]")


class Host(Protocol):
    """What the two protocols use of a :class:`msa_memory.runtime.memory.Memory` (which calls them)."""

    layout: Any
    tokenizer: Any
    routing: Any
    doc_ids: Any
    engine: Any
    store: Any
    index: Any
    device: Any

    @property
    def prefix(self) -> Any: ...
    def route(self, question: Any, k: int | None = None) -> tuple[Any, Any, dict[str, float]]: ...
    def hits(self, doc_ids: Any, scores: Any) -> list[DocHit]: ...
    def layer_hits(self, routes: dict[int, Any]) -> tuple[list[DocHit], dict[int, list[int]]]: ...
    def generate_ids(self, state: Any, prompt: PromptIds, positions: list[int], **kw: Any) -> tuple[list[int], str]: ...
    def eos_ids(self) -> list[int]: ...
    def answer_text(self, ids: list[int], stop_strings: Sequence[str]) -> str: ...
    def question_text(self, question: str | list[int]) -> str: ...


def _cue(question: str | list[int], lead: str) -> list[tuple[Any, bool]]:
    """Segments of the answer cue ``lead<|im_start|>The user's question is: Q\\n<|object_ref_end|>`` (never routes)."""
    if isinstance(question, str):
        return [(f"{lead}<|im_start|>The user's question is: {question}\n{ROUND_END}", False)]
    return [(f"{lead}<|im_start|>The user's question is: ", False), (question, False), (f"\n{ROUND_END}", False)]


def requested_ids(text: str, known: set[int]) -> list[int]:
    """Document ids ``[n]`` in generated ``text`` that exist in the store: deduplicated, ascending (§5.2)."""
    return sorted({int(m) for m in _ID.findall(text)} & known)


def inject(lay: Any, history: PromptIds, docs: list[tuple[int, str]]) -> PromptIds:
    """Append ``"[n]. text\\n"`` of each document + the round delimiter to ``history``.

    Only this latest block routes in the next round (the reference's doc_ids == 0 region (b));
    everything earlier in the history stops routing, and the delimiter never routes.
    """
    block = "".join(f"[{d}]. {t}\n" for d, t in docs)
    return PromptIds(history.ids, [False] * len(history.ids)) + lay.encode([(block, True), (ROUND_END, False)])


def _add(timings: dict[str, float], other: dict[str, float]) -> None:
    for key, v in other.items():
        timings[key] = timings.get(key, 0.0) + v


def ask_interleave(mem: Host, question: str | list[int], k: int | None, max_rounds: int,
                   kw: dict[str, Any]) -> Answer:
    if max_rounds < 1:
        from msa_memory.errors import ConfigError

        raise ConfigError(f"max_rounds must be >= 1, got {max_rounds!r}.")
    if mem.layout.msa:
        return _msa_protocol(mem, question, k, max_rounds, kw)
    return _generic(mem, question, k, max_rounds, kw)


def _msa_protocol(mem: Host, question: str | list[int], k: int | None, max_rounds: int,
                  kw: dict[str, Any]) -> Answer:
    lay, tok = mem.layout, mem.tokenizer
    kk = int(k or mem.routing.top_k)
    P = len(lay.head_ids())
    base = lay.question(question)                       # routing rows: instruction + question
    history = PromptIds([], [])                         # generated + injected, appended round by round
    timings: dict[str, float] = {}
    rounds: list[Round] = []
    known = set(mem.doc_ids.tolist())
    answer_phase = False
    reason = ""
    n_new = 0
    st = None
    cue_room = len(lay.encode(_cue(question, END_RETRIEVE)).ids)
    for r in range(max_rounds):
        prompt = base + history
        cap = len(prompt.ids) + 2 * kw["max_new_tokens"] + cue_room + 1
        st = mem.engine.new_state(cap, mem.prefix, top_k=kk)
        pos = list(range(P + kk, P + kk + len(prompt.ids)))

        def stop(ids: list[int]) -> bool:
            text = tok.decode(ids, skip_special_tokens=False)
            return ROUND_END in text or END_RETRIEVE in text

        rt: dict[str, float] = {}
        out, reason = mem.generate_ids(st, prompt, pos, route=True, timings=rt, stop=stop,
                                    **{**kw, "stop_strings": ()})
        _add(timings, {**rt, **st.timings})
        n_new += len(out)
        text = tok.decode(out, skip_special_tokens=False)
        hits, per_layer = mem.layer_hits(st.routes)
        rounds.append(Round(r, hits, generated=text, per_layer=per_layer))
        history = history + PromptIds(out, [False] * len(out))
        if END_RETRIEVE in text or reason in ("eos", "length") or r == max_rounds - 1:
            answer_phase = True
            break
        wanted = requested_ids(text, known)
        if not wanted:
            answer_phase = True
            break
        history = inject(lay, history, list(zip(wanted, mem.store.texts(wanted))))
    answer = ""
    if answer_phase and st is not None and reason != "eos":
        out, reason = _answer_after_cue(mem, st, question, END_RETRIEVE in rounds[-1].generated, kw, timings)
        n_new += len(out)
        answer = tok.decode(out, skip_special_tokens=False)
        if kw.get("on_token") is not None:
            kw["on_token"](tok.decode(out, skip_special_tokens=True))
    full = "".join(x.generated for x in rounds) + answer
    if ANSWER_PREFIX in full:
        final = full.rsplit(ANSWER_PREFIX, 1)[1].split("<|im_end|>")[0]
    else:
        final = tok.decode(tok(answer or rounds[-1].generated, add_special_tokens=False)["input_ids"],
                           skip_special_tokens=True)
    return Answer(mem.question_text(question), final.strip(), "interleave", rounds, timings, len(base.ids) + P,
                  n_new, reason, out)


def _answer_after_cue(mem: Host, st: Any, question: str | list[int], retrieval_ended: bool, kw: dict[str, Any],
                      timings: dict[str, float]) -> tuple[list[int], str]:
    """Forward the answer cue through the request's cache (causally), then decode the answer: (ids, stop
    reason). The cue says ``<End-of-Retrieve>`` itself when the model did not (``retrieval_ended`` False)."""
    cue = mem.layout.encode(_cue(question, "" if retrieval_ended else END_RETRIEVE))
    start = st.local_pos[st.n_written - 1].item() + 1
    t0 = time.perf_counter()
    logits = mem.engine.forward(st, cue.ids, list(range(start, start + len(cue.ids))))
    timings["prefill_s"] = timings.get("prefill_s", 0.0) + time.perf_counter() - t0
    t1 = time.perf_counter()
    eos = mem.eos_ids()
    out = list(mem.engine.decode(st, logits, start + len(cue.ids), max_new_tokens=kw["max_new_tokens"],
                                 eos_ids=eos, temperature=kw["temperature"], top_p=kw["top_p"]))
    sync_device(mem.device)
    timings["decode_s"] = timings.get("decode_s", 0.0) + time.perf_counter() - t1
    return out, "eos" if out and out[-1] in eos else "length"


def _generic(mem: Host, question: str | list[int], k: int | None, max_rounds: int, kw: dict[str, Any]) -> Answer:
    kk = int(k or mem.routing.top_k)
    chosen: list[int] = []
    scores: dict[int, float] = {}
    rounds: list[Round] = []
    timings: dict[str, float] = {}
    query: str | list[int] = question
    for r in range(max_rounds):
        t0 = time.perf_counter()
        ids, sc, rt = mem.route(query, min(mem.index.n_docs, kk + len(chosen)))
        timings["routing_s"] = timings.get("routing_s", 0.0) + time.perf_counter() - t0
        new = [(int(d), float(s)) for d, s in zip(ids, sc) if int(d) not in scores][:kk]
        if not new:
            break
        for d, s in new:
            chosen.append(d)
            scores[d] = s
        rounds.append(Round(r, mem.hits([d for d, _ in new], [s for _, s in new])))
        t1 = time.perf_counter()
        latest = mem.store.texts([d for d, _ in new])
        timings["fetch_s"] = timings.get("fetch_s", 0.0) + time.perf_counter() - t1
        more = "\n" + "\n".join(latest)
        query = question + more if isinstance(question, str) else \
            question + list(mem.tokenizer(more, add_special_tokens=False)["input_ids"])
    t2 = time.perf_counter()
    texts = mem.store.texts(chosen)
    timings["fetch_s"] = timings.get("fetch_s", 0.0) + time.perf_counter() - t2
    prompt = mem.layout.with_passages(question, list(zip(chosen, texts)))
    head = mem.layout.head_ids()
    full = PromptIds(head + prompt.ids, [False] * len(head) + prompt.route_rows)
    st = mem.engine.new_state(len(full.ids) + kw["max_new_tokens"] + 1)
    out, reason = mem.generate_ids(st, full, list(range(len(full.ids))), route=False, timings=timings, **kw)
    text = mem.answer_text(out, kw["stop_strings"])
    if rounds:
        rounds[-1].generated = text
    return Answer(mem.question_text(question), text, "interleave", rounds, timings, len(full.ids), len(out), reason,
                  out)
