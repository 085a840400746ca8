"""The Snowball English stemmer (Porter2), in pure Python, for the lexical analyzer ``lex2``.

Design note. ``stem(word)`` follows the algorithm published at snowballstem.org/algorithms/english
as Snowball 3.0.0's ``english.sbl`` has it, the version PyStemmer 3.1 bundles: the exceptional forms
(``skis`` → ``ski``, ``skies`` → ``sky``, ``only`` → ``onli``, ``news`` kept, ...), words of fewer than 3
letters kept, an initial apostrophe dropped, ``y`` marked as the consonant ``Y`` at the start of the word
and after a vowel, R1/R2 (R1 after the prefixes ``arsen``, ``commun``, ``emerg``, ``gener``, ``inter``,
``later``, ``organ``, ``past``, ``univers`` when the word starts with one), steps 1a, 1b (with its
invariant ``-ing``/``-eed`` words: ``inning``, ``proceed``, ...; ``dying`` → ``die``), 1c, 2, 3, 4, 5,
and ``Y`` back to ``y``. Step 0 of the published description (the apostrophe suffixes ``'``, ``'s``,
``'s'``) is the start of step 1a here, as in ``english.sbl``. (Snowball 3.0.1's
``english.sbl`` has no ``inter`` prefix and no ``skis`` exception; the reference test would say so the day
PyStemmer moves to it: 12 words of the 30k-word vocabulary differ.)

It works on Unicode code points, as Snowball's UTF-8 stemmers do: the vowels are ``a e i o u y``, and
every other character (digits, ``é``, ``ß``, CJK, an upper-case letter) is a non-vowel that no suffix
names, so a word without ASCII letters or apostrophes comes back unchanged and ``café`` or ``1990s`` are stemmed by the
same rules as ASCII words. Input is expected in lower case, as the analyzer gives it (an upper-case
``Y`` in the input is taken for the marker, as Snowball does). The lexical analyzer never produces an
apostrophe (it splits words at them); the apostrophe rules are kept so ``stem`` is the whole algorithm.

The slow reference is PyStemmer (``Stemmer.Stemmer("english")``, a test and baseline extra, not a
dependency): tests/unit/store/test_stem.py checks every alphabetic entry of a 30k-word vocabulary and
random words against it. ``stem`` is memoised (``functools.lru_cache``), so analysing a corpus stems each
distinct word once.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache

__all__ = ["stem"]

_VOWELS = frozenset("aeiouy")
_V_WXY = _VOWELS | frozenset("wxY")
_AEO = frozenset("aeo")
_VALID_LI = frozenset("cdeghkmnrt")
_DOUBLES = ("bb", "dd", "ff", "gg", "mm", "nn", "pp", "rr", "tt")

#: whole words with a fixed stem (checked before anything else)
_EXCEPTIONS = {"skis": "ski", "skies": "sky", "idly": "idl", "gently": "gentl", "ugly": "ugli", "early": "earli",
               "only": "onli", "singly": "singl",
               "sky": "sky", "news": "news", "howe": "howe", "atlas": "atlas", "cosmos": "cosmos",
               "bias": "bias", "andes": "andes"}
#: R1 starts after these prefixes (longest first)
_R1_PREFIXES = ("univers", "commun", "arsen", "emerg", "gener", "inter", "later", "organ", "past")

# suffix -> replacement, tried longest first; a suffix found is the only one tried (Snowball's among)
_STEP2 = {"ization": "ize", "ational": "ate", "fulness": "ful", "ousness": "ous", "iveness": "ive",
          "tional": "tion", "biliti": "ble", "lessli": "less", "entli": "ent", "ation": "ate", "alism": "al",
          "aliti": "al", "ousli": "ous", "iviti": "ive", "fulli": "ful", "ogist": "og", "enci": "ence",
          "anci": "ance", "abli": "able", "izer": "ize", "ator": "ate", "alli": "al", "bli": "ble",
          "ogi": "og", "li": ""}
_STEP3 = {"ational": "ate", "tional": "tion", "alize": "al", "icate": "ic", "iciti": "ic", "ative": "",
          "ical": "ic", "ness": "", "ful": ""}
_STEP4 = ("ement", "ance", "ence", "able", "ible", "ment", "ant", "ent", "ism", "ate", "iti", "ous", "ive",
          "ize", "ion", "al", "er", "ic")


def _longest(word: str, suffixes: Iterable[str]) -> str | None:
    """The longest of ``suffixes`` that ``word`` ends with, else None."""
    best = None
    for s in suffixes:
        if word.endswith(s) and (best is None or len(s) > len(best)):
            best = s
    return best


def _mark_y(word: str) -> tuple[str, bool]:
    """``y`` at the start and after a vowel become ``Y`` (a consonant), left to right; (word, any marked)."""
    chars = list(word)
    found = False
    for i, ch in enumerate(chars):
        if ch == "y" and (i == 0 or chars[i - 1] in _VOWELS):
            chars[i] = "Y"
            found = True
    return "".join(chars), found


def _after_vc(word: str, start: int) -> int:
    """Index after the first non-vowel that follows a vowel at or after ``start``; len(word) when none."""
    n = len(word)
    i = start
    while i < n and word[i] not in _VOWELS:
        i += 1
    while i < n and word[i] in _VOWELS:
        i += 1
    return i + 1 if i < n else n


def _regions(word: str) -> tuple[int, int]:
    """(p1, p2): R1 = word[p1:], R2 = word[p2:]."""
    prefix = next((p for p in _R1_PREFIXES if word.startswith(p)), None)
    p1 = len(prefix) if prefix is not None else _after_vc(word, 0)
    return p1, _after_vc(word, p1) if p1 < len(word) else len(word)


def _short_syllable(word: str) -> bool:
    """``word`` ends in a short syllable: non-vowel (not w, x, Y), vowel, non-vowel; or vowel, non-vowel as
    the whole word; or ends in ``past``."""
    n = len(word)
    if n >= 3 and word[-1] not in _V_WXY and word[-2] in _VOWELS and word[-3] not in _VOWELS:
        return True
    if n == 2 and word[1] not in _VOWELS and word[0] in _VOWELS:
        return True
    return word.endswith("past")


def _step1a(word: str) -> str:
    for s in ("'s'", "'s", "'"):
        if word.endswith(s):
            word = word[: -len(s)]
            break
    if word.endswith("sses"):
        return word[:-2]
    if word.endswith(("ied", "ies")):
        return word[:-2] if len(word) > 4 else word[:-1]     # ties -> tie, cries -> cri
    if word.endswith(("us", "ss")) or not word.endswith("s"):
        return word
    # 's': delete when a vowel comes before the letter preceding it (gas, this stay; gaps -> gap)
    return word[:-1] if any(c in _VOWELS for c in word[:-2]) else word


def _step1b(word: str, p1: int) -> str:
    suffix = _longest(word, ("eedly", "ingly", "edly", "eed", "ing", "ed"))
    if suffix is None:
        return word
    base = word[: -len(suffix)]
    if suffix in ("eed", "eedly"):
        if base in ("succ", "proc", "exc"):
            return word
        return base + "ee" if len(base) >= p1 else word
    if suffix == "ing":
        if base in ("even", "cann", "inn", "earr", "herr", "out"):
            return word
        if len(base) == 2 and base[1] == "y" and base[0] not in _VOWELS:
            return base[0] + "ie"                               # dying -> die
    if not any(c in _VOWELS for c in base):
        return word
    if base.endswith(("at", "bl", "iz")):
        return base + "e"
    if base.endswith(_DOUBLES):
        return base if len(base) == 3 and base[0] in _AEO else base[:-1]   # add, egg, off stay
    if len(base) == p1 and _short_syllable(base):
        return base + "e"
    return base


def _step1c(word: str) -> str:
    if len(word) >= 3 and word[-1] in "yY" and word[-2] not in _VOWELS:
        return word[:-1] + "i"
    return word


def _replace(word: str, table: dict[str, str], p1: int, p2: int, step: int) -> str:
    suffix = _longest(word, table)
    if suffix is None or len(word) - len(suffix) < p1:
        return word
    base = word[: -len(suffix)]
    if suffix == "li":
        return base if base[-1:] in _VALID_LI else word
    if suffix == "ogi":
        return base + "og" if base.endswith("l") else word
    if step == 3 and suffix == "ative" and len(base) < p2:
        return word
    return base + table[suffix]


def _step4(word: str, p2: int) -> str:
    suffix = _longest(word, _STEP4)
    if suffix is None or len(word) - len(suffix) < p2:
        return word
    base = word[: -len(suffix)]
    if suffix == "ion" and not base.endswith(("s", "t")):
        return word
    return base


def _step5(word: str, p1: int, p2: int) -> str:
    n = len(word)
    if word.endswith("e"):
        base = word[:-1]
        if n - 1 >= p2 or (n - 1 >= p1 and not _short_syllable(base)):
            return base
    elif word.endswith("l") and n - 1 >= p2 and word[-2:-1] == "l":
        return word[:-1]
    return word


@lru_cache(maxsize=1 << 18)
def stem(word: str) -> str:
    """The Snowball English (Porter2) stem of ``word`` (module docstring).

    Parameters
    ----------
    word : str
        One word, lower case as the analyzer gives it; any characters (digits and non-ASCII letters are
        non-vowels to the algorithm).

    Returns
    -------
    str
        Its stem; ``word`` itself when no rule applies (fewer than 3 characters, no ASCII suffix).

    Examples
    --------
    >>> [stem(w) for w in ("running", "generously", "skies", "dying", "café", "1990s")]
    ['run', 'generous', 'sky', 'die', 'café', '1990s']
    """
    if word in _EXCEPTIONS:
        return _EXCEPTIONS[word]
    if len(word) < 3:
        return word
    if word.startswith("'"):
        word = word[1:]
    word, marked = _mark_y(word)
    p1, p2 = _regions(word)
    word = _step1a(word)
    word = _step1b(word, p1)
    word = _step1c(word)
    word = _replace(word, _STEP2, p1, p2, 2)
    word = _replace(word, _STEP3, p1, p2, 3)
    word = _step4(word, p2)
    word = _step5(word, p1, p2)
    return word.replace("Y", "y") if marked else word
