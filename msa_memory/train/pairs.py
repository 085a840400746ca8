"""Query → positive-passage pairs for router training and evaluation.

Three kinds (issue 6):

(a) ``inverse_cloze``: a sentence of a passage is the query, the passage is the positive; with
    probability ``p_remove`` the sentence is cut out of the passage first (so routing must match
    meaning, not the verbatim text).
(b) ``insert_facts``: synthetic "key → value" facts ("The access code of the Velmora station is
    4417.") inserted at a sentence boundary of a real passage and asked as questions with varied
    phrasings. Train and eval use disjoint name syllables, values and (partly) question templates.
(c) ``load_jsonl``: user pairs ``{"query": ..., "positive_ids": [...]}`` over store document ids.

A :class:`PairSet` holds the (possibly edited) passage texts and the queries; positives are
indices into ``passages``. Everything is deterministic given ``seed``. No model, no I/O except
``load_jsonl``.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from msa_memory.errors import ConfigError
from msa_memory.train.texts import sentences

__all__ = ["Query", "PairSet", "FactMaker", "build_pairs", "load_jsonl"]


@dataclass(frozen=True, slots=True)
class Query:
    """One training / evaluation query."""

    text: str
    """The query text as routed."""
    positives: tuple[int, ...]
    """Indices of its positive passages in the owning :class:`PairSet`."""
    kind: str = "ict"
    """``"ict"`` (inverse cloze), ``"fact"`` (synthetic needle) or ``"user"`` (JSONL)."""
    answer: str = ""
    """The expected answer of a fact query (exact-match target), empty otherwise."""


@dataclass
class PairSet:
    """Passages (texts + source names) and queries over them."""

    passages: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    queries: list[Query] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        out = {"passages": len(self.passages), "queries": len(self.queries)}
        for q in self.queries:
            out[q.kind] = out.get(q.kind, 0) + 1
        return out


# ----------------------------------------------------------------------------- facts

_ATTRS: list[tuple[str, str]] = [
    ("access code", "code"), ("launch date", "date"), ("headquarters city", "city"),
    ("chief engineer", "person"), ("serial number", "serial"), ("maximum speed", "speed"),
    ("founding year", "year"), ("password", "password"), ("signature colour", "colour"),
    ("mascot", "animal"), ("budget", "money"), ("population", "count"), ("radio frequency", "freq"),
    ("home port", "city"), ("lead scientist", "person"), ("vault number", "code"),
    ("opening date", "date"), ("registered owner", "person"), ("call sign", "serial"),
    ("annual rainfall", "rain"), ("elevation", "height"), ("warranty period", "period"),
]
_STATEMENTS = [
    "The {attr} of {name} is {value}.",
    "{Name}'s {attr} is {value}.",
    "For the record, the {attr} of {name} is {value}.",
    "According to the registry, {name} has {value} as its {attr}.",
    "Note that {value} is the {attr} of {name}.",
    "Records show that the {attr} assigned to {name} is {value}.",
]
_QUESTIONS_TRAIN = [
    "What is the {attr} of {name}?",
    "What is {name}'s {attr}?",
    "Tell me the {attr} of {name}.",
    "Which {attr} does {name} have?",
    "Do you know the {attr} for {name}?",
    "I need the {attr} that belongs to {name}.",
    "{Name}: what is its {attr}?",
    "Look up the {attr} of {name}.",
]
_QUESTIONS_EVAL = [
    "What is the {attr} of {name}?",
    "Can you find the {attr} recorded for {name}?",
    "Please give me {name}'s {attr}.",
    "What {attr} is listed for {name}?",
]
_KINDS = ["station", "project", "company", "vessel", "protocol", "observatory", "foundation", "bridge"]
_SYL_TRAIN = ["vel", "mor", "dak", "rin", "tes", "kor", "lam", "bri", "zan", "qui", "pol", "gar", "hen", "sul"]
_SYL_EVAL = ["ost", "yra", "fen", "cul", "wex", "jor", "nim", "bax", "tho", "ule", "vos", "ker", "iph", "dru"]
# ``names="varied"``: training names from thousands of onset + vowel + coda syllables instead of the 14
# above, so the router learns to match any rare name rather than those 14 syllables' tokens. A word
# that holds an eval syllable anywhere (across syllable boundaries too) is never drawn.
_ONSETS = ["", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z", "br",
           "cr", "dr", "fr", "gr", "kr", "pr", "tr", "bl", "cl", "fl", "gl", "pl", "sl", "sk", "sp", "st", "sh",
           "ch", "th", "qu"]
_VOWELS = ["a", "e", "i", "o", "u", "y", "ae", "ai", "au", "ea", "ee", "ei", "ie", "oa", "oo", "ou"]
_CODAS = ["", "b", "d", "g", "k", "l", "m", "n", "p", "r", "s", "t", "x", "z", "nd", "nt", "rk", "rn", "rt",
          "ld", "lt", "sk", "st", "sh", "ng"]
_SYL_VARIED = sorted({s for s in (o + v + c for o in _ONSETS for v in _VOWELS for c in _CODAS)
                      if not any(e in s for e in _SYL_EVAL)})
FACT_NAMES = ("syllables", "varied")


def check_fact_names(names: str, what: str = "Fact names") -> None:
    """Raise ``ConfigError`` unless ``names`` is one of :data:`FACT_NAMES` (``what`` names the option)."""
    if names not in FACT_NAMES:
        raise ConfigError(f"{what} must be one of {', '.join(FACT_NAMES)}, got {names!r}.")

_CITIES = {"train": ["Lisbon", "Oslo", "Quito", "Perth", "Dakar", "Hanoi", "Lima", "Tunis"],
           "eval": ["Bergen", "Cusco", "Fresno", "Harbin", "Malmo", "Nagoya", "Porto", "Zagreb"]}
_PEOPLE = {"train": ["Ada Morrow", "Ilse Brandt", "Tomas Reyes", "Nina Okafor", "Paul Serrat"],
           "eval": ["Greta Holm", "Omar Castel", "Lena Virtanen", "Jonas Abara", "Rui Mendel"]}
_COLOURS = {"train": ["teal", "amber", "crimson", "olive", "indigo"], "eval": ["magenta", "ochre", "cobalt", "maroon"]}
_ANIMALS = {"train": ["otter", "heron", "lynx", "badger", "falcon"], "eval": ["ibex", "marten", "puffin", "gecko"]}
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
           "October", "November", "December"]


class FactMaker:
    """Makes synthetic facts; ``split`` ("train" or "eval") picks disjoint names and values.

    ``names``: ``"syllables"`` builds names from 14 syllables per split (the recipe of the shipped
    adapters); ``"varied"`` (train only) from the 15,772 syllables of ``_SYL_VARIED``: words of 2–3 of
    them, at most 12 letters, none holding an eval syllable.
    """

    def __init__(self, split: str, seed: int = 0, names: str = "syllables") -> None:
        if split not in ("train", "eval"):
            raise ConfigError(f"FactMaker split must be 'train' or 'eval', got {split!r}.")
        check_fact_names(names)
        if names == "varied" and split != "train":
            raise ConfigError("Varied fact names are for training only: the eval names keep their own 14 syllables.")
        self.split = split
        self.names = names
        self.rng = random.Random(f"{split}-{seed}")
        self._used: set[str] = set()

    def _name(self) -> str:
        if self.names == "varied":
            return self._varied_name()
        syl = _SYL_TRAIN if self.split == "train" else _SYL_EVAL
        for attempt in range(1000):
            # 2-3 syllable words give 23,520 names; a split that has used most of them (a corpus of
            # ~40k facts) moves on to 4 syllables after 50 collisions in a row (the draws before are
            # the same as without this step, so smaller recipes reproduce unchanged)
            n_syl = self.rng.choice((2, 3)) if attempt < 50 else 4
            word = "".join(self.rng.choice(syl) for _ in range(n_syl)).capitalize()
            name = f"the {word} {self.rng.choice(_KINDS)}"
            if name not in self._used:
                self._used.add(name)
                return name
        raise ConfigError("FactMaker ran out of distinct names; use fewer facts per split.")

    def _varied_name(self) -> str:
        for _ in range(1000):
            word = "".join(self.rng.choice(_SYL_VARIED) for _ in range(self.rng.choice((2, 2, 3))))
            if len(word) > 12 or any(e in word for e in _SYL_EVAL):
                continue
            name = f"the {word.capitalize()} {self.rng.choice(_KINDS)}"
            if name not in self._used:
                self._used.add(name)
                return name
        raise ConfigError("FactMaker ran out of distinct names; use fewer facts per split.")

    def _value(self, kind: str) -> str:
        r, s = self.rng, self.split
        odd = s == "eval"  # eval values use other ranges / lists than train values
        if kind == "code":
            return str(r.randrange(5000, 9999) if odd else r.randrange(1000, 4999))
        if kind == "date":
            return f"{r.choice(_MONTHS)} {r.randrange(1, 29)}, {r.randrange(2040, 2060) if odd else r.randrange(2020, 2039)}"
        if kind == "city":
            return r.choice(_CITIES[s])
        if kind == "person":
            return r.choice(_PEOPLE[s])
        if kind == "serial":
            return f"{r.choice('QRSTUVWXYZ' if odd else 'ABCDEFGHJK')}{r.choice('QRSTUVWXYZ' if odd else 'ABCDEFGHJK')}-{r.randrange(100, 999)}"
        if kind == "speed":
            return f"{r.randrange(100, 900)} km/h"
        if kind == "year":
            return str(r.randrange(1700, 1799) if odd else r.randrange(1800, 1899))
        if kind == "password":
            words = ["lantern", "copper", "meadow", "glacier"] if odd else ["harbor", "willow", "ember", "canyon"]
            return f"{r.choice(words)}-{r.randrange(10, 99)}"
        if kind == "colour":
            return r.choice(_COLOURS[s])
        if kind == "animal":
            return r.choice(_ANIMALS[s])
        if kind == "money":
            return f"{r.randrange(2, 90)} million dollars"
        if kind == "count":
            return f"{r.randrange(1000, 99000):,}"
        if kind == "freq":
            return f"{r.randrange(88, 107)}.{r.randrange(1, 9)} MHz"
        if kind == "rain":
            return f"{r.randrange(200, 2400)} millimetres"
        if kind == "height":
            return f"{r.randrange(100, 4800)} metres"
        return f"{r.randrange(2, 12)} years"  # period

    def make(self) -> tuple[str, list[str], str]:
        """One fact: (statement, questions in varied phrasings, answer value)."""
        attr, kind = self.rng.choice(_ATTRS)
        name, value = self._name(), self._value(kind)
        fill = {"attr": attr, "name": name, "Name": name[0].upper() + name[1:], "value": value}
        statement = self.rng.choice(_STATEMENTS).format(**fill)
        pool = _QUESTIONS_TRAIN if self.split == "train" else _QUESTIONS_EVAL
        questions = [q.format(**fill) for q in self.rng.sample(pool, k=min(3, len(pool)))]
        return statement, questions, value


def insert_sentence(passage: str, sentence: str, rng: random.Random) -> str:
    """Insert ``sentence`` at a random sentence boundary of ``passage``."""
    spans = sentences(passage)
    cuts = [0] + [b for _, b in spans[:-1]] + [len(passage)]
    at = rng.choice(cuts)
    left, right = passage[:at].rstrip(), passage[at:].lstrip()
    return " ".join(p for p in (left, sentence, right) if p)


def _ict_sentence(passage: str, rng: random.Random, min_words: int = 6, max_words: int = 45) -> tuple[int, int] | None:
    spans = [(a, b) for a, b in sentences(passage) if min_words <= len(passage[a:b].split()) <= max_words]
    return rng.choice(spans) if len(spans) >= 1 and len(sentences(passage)) >= 3 else None


def build_pairs(
    passages: list[tuple[str, str]],
    *,
    split: str = "train",
    seed: int = 0,
    p_ict: float = 1.0,
    p_remove: float = 0.5,
    p_fact: float = 0.5,
    questions_per_fact: int = 2,
    fact_names: str = "syllables",
) -> PairSet:
    """Turn (source, text) passages into a :class:`PairSet` with inverse-cloze and fact queries.

    Each passage gets at most one inverse-cloze query (probability ``p_ict``; its sentence removed
    with probability ``p_remove``) and at most one inserted fact (probability ``p_fact``) asked with
    ``questions_per_fact`` phrasings; ``fact_names`` is :class:`FactMaker`'s ``names``. The passage
    text stored is the edited one (what must be encoded).
    """
    for name, p in (("p_ict", p_ict), ("p_remove", p_remove), ("p_fact", p_fact)):
        if not 0.0 <= p <= 1.0:
            raise ConfigError(f"{name} must be in [0, 1], got {p!r}.")
    rng = random.Random(f"pairs-{split}-{seed}")
    facts = FactMaker(split, seed, fact_names)
    out = PairSet()
    for source, text in passages:
        i = len(out.passages)
        queries: list[Query] = []
        if rng.random() < p_ict:
            span = _ict_sentence(text, rng)
            if span is not None:
                a, b = span
                sent = text[a:b].strip()
                if rng.random() < p_remove:
                    text = (text[:a].rstrip() + " " + text[b:].lstrip()).strip()
                queries.append(Query(sent, (i,), "ict"))
        if rng.random() < p_fact:
            statement, questions, value = facts.make()
            text = insert_sentence(text, statement, rng)
            queries += [Query(q, (i,), "fact", value) for q in questions[:questions_per_fact]]
        out.passages.append(text)
        out.sources.append(source)
        out.queries += queries
    return out


def load_jsonl(path: str | Path, id_to_index: dict[int, int]) -> list[Query]:
    """Read user pairs: one JSON object per line, ``{"query": str, "positive_ids": [int, ...]}``.

    ``id_to_index`` maps store document ids to passage indices; an unknown id raises ``ConfigError``.
    """
    out: list[Query] = []
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ConfigError(f"Cannot read the pairs file {str(p)!r}: {e}.") from e
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            query, ids = str(obj["query"]), [int(x) for x in obj["positive_ids"]]
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{p}:{n}: expected {{\"query\": str, \"positive_ids\": [int, ...]}}, got {line[:120]!r}.") from e
        missing = [x for x in ids if x not in id_to_index]
        if missing or not ids:
            raise ConfigError(f"{p}:{n}: positive_ids {missing or ids!r} are not live documents of the store; "
                              "use ids from `msa store docs`.")
        out.append(Query(query, tuple(id_to_index[x] for x in ids), "user"))
    return out
