"""The lexical index of a store: the analyzer, per-shard postings files, and BM25 over live documents.

Design note. Hybrid retrieval (``Memory.search(..., retriever="hybrid")``) fuses routing with BM25, so
the store keeps, per shard, the postings of its documents' text: one Parquet table of (doc_id,
term_hash, tf) rows, sorted by doc_id then term_hash, one row per distinct term of a document. A
document's length is the sum of its tf (its token count after stopword removal; a document with no
tokens has no rows and length 0). Terms are stored as the first 8 bytes of their blake2b digest, so
the table needs no vocabulary and shards built apart agree on every term.

Analyzers. ``lex1`` (NFKC, lower case, runs of letters/digits, English stopwords dropped) and ``lex2``
(``lex1``, then every term reduced to its Snowball English stem, ``store/_stem.py``). This release writes
``ANALYZER = "lex2"``; it reads both (``ANALYZERS``), so stores encoded before (``lex1`` postings) keep
answering hybrid questions: a version's index uses one analyzer for every shard, ``lex2`` when every
shard has ``lex2`` postings, else ``lex1`` when every shard has ``lex1`` ones, and the question is
analysed with it (``LexicalIndex.analyzer``). A version with some shards of only ``lex1`` and others of
only ``lex2`` (a ``lex1`` store that msa-encode appended to, or compacted in part) has no common
analyzer: ``check_index`` refuses it in one line naming ``msa store reindex-lexical STORE``, which writes
``lex2`` postings for the ``lex1`` shards (no re-encoding), as it upgrades a ``lex1`` store.

Where the postings live (docs/store-format.md, section 13):
- ``write_shard`` writes ``postings.lex2.parquet`` into the shard itself, so the shard record's size
  and crc32c cover it; msa-encode and compaction therefore build it for every shard they write;
- ``rekey.reindex_lexical`` gives a version whose shards lack postings of ``ANALYZER`` (a store encoded
  without them, or with ``lex1``) a sidecar ``lexical/SHARD.lex2.HEX.parquet`` per such shard, named from
  the shard's manifest entry (``"lexical"``), published as a new version through the usual commit point;
  shards are never modified. A sidecar wins over in-shard postings of its analyzer.

Liveness is the version's: deleted documents' rows stay in the files and are dropped when the index
is built (the live mask of the shard, as for router keys). The analyzer's name is in the file name and
in the Parquet metadata (``msa_lexical_analyzer``), and a file is read only as the analyzer its name
says; postings of an analyzer this release does not know are not used, and ``check_index`` says how to
rebuild them.

BM25 (Robertson/Sparck Jones with Lucene's idf): for a question with distinct terms t,
``score(d) = Σ_t idf(t) · tf(t,d)·(k1+1) / (tf(t,d) + k1·(1 − b + b·|d|/avgdl))`` with
``idf(t) = ln(1 + (N − df(t) + 0.5) / (df(t) + 0.5))``, k1 = 1.2, b = 0.75, N the live documents,
df over live documents, |d| the document's length and avgdl the mean length of the live documents.
numpy only (no torch, no scipy): the index is a term-major sparse matrix (CSC of documents × terms).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from msa_memory.errors import ConfigError, ShardCorruptError, ShardMissingError
from msa_memory.store._layout import LEXICAL_DIR, check_files, read_parquet
from msa_memory.store._stem import stem
from msa_memory.store.backend import Backend


class _Snapshot(Protocol):
    """What this module reads of a ``reader.Snapshot`` (not imported: the reader imports this module)."""

    backend: Backend
    root: Any
    version: int
    manifest: dict[str, Any]

    def _view(self, shard_id: str) -> Any: ...

    def _live_mask(self, shard_id: str) -> np.ndarray: ...

    def documents(self, columns: Sequence[str] | None = None) -> Any: ...

__all__ = ["ANALYZER", "ANALYZERS", "STOPWORDS", "BM25_K1", "BM25_B", "analyze", "term_hash", "postings_file",
           "postings_bytes", "read_postings", "LexicalSource", "lexical_source", "check_index", "verify_postings",
           "sidecar_paths", "LexicalIndex"]

#: the analyzer this release writes (name + version); stored with every postings file
ANALYZER = "lex2"
#: the analyzers this release reads, preferred first
ANALYZERS: tuple[str, ...] = ("lex2", "lex1")
BM25_K1 = 1.2
BM25_B = 0.75

#: English stopwords (the usual function words; tokens split at apostrophes, so contraction pieces too)
STOPWORDS: frozenset[str] = frozenset("""
a about above after again against all am an and any are aren as at be because been before being below
between both but by can cannot could couldn d did didn do does doesn doing don down during each few for
from further had hadn has hasn have haven having he her here hers herself him himself his how i if in into
is isn it its itself just ll m ma me might mightn more most must mustn my myself needn no nor not now o of
off on once only or other ought our ours ourselves out over own re s same shall shan she should shouldn so
some such t than that the their theirs them themselves then there these they this those through to too
under until up upon us ve very was wasn we were weren what when where which while who whom whose why will
with won would wouldn y yet you your yours yourself yourselves
""".split())

_TOKEN_RE = re.compile(r"[^\W_]+")
_POSTINGS_RE = re.compile(r"^postings\.([A-Za-z0-9]+)\.parquet$")
_META_KEY = b"msa_lexical_analyzer"


def _words(text: str) -> list[str]:
    """Analyzer ``lex1``: Unicode NFKC, lower case, runs of letters/digits (``[^\\W_]+``), stopwords dropped."""
    return [t for t in _TOKEN_RE.findall(unicodedata.normalize("NFKC", text).lower()) if t not in STOPWORDS]


def _check_analyzer(analyzer: str | None) -> str:
    """``analyzer`` (default ``ANALYZER``) if this release knows it, else ConfigError."""
    name = ANALYZER if analyzer is None else analyzer
    if name not in ANALYZERS:
        raise ConfigError(f"Lexical analyzer {name!r} is not one this release knows ({list(ANALYZERS)}).",
                          hint=f"Use {ANALYZER!r} (what msa-encode writes) or 'lex1' (stores encoded before it).")
    return name


def analyze(text: str, analyzer: str | None = None) -> list[str]:
    """Terms of ``text`` in order under ``analyzer``.

    Parameters
    ----------
    text : str
        Any text (a document, a question).
    analyzer : str, optional
        ``"lex2"`` (the default, ``ANALYZER``) or ``"lex1"``. ``lex1``: Unicode NFKC, lower case, runs of
        letters/digits (``[^\\W_]+``), English stopwords dropped, no stemming. ``lex2``: the ``lex1`` terms,
        each replaced by its Snowball English stem (``_stem.stem``; stopwords are dropped before stemming).

    Returns
    -------
    list of str

    Raises
    ------
    ConfigError
        For an analyzer this release does not know.

    Examples
    --------
    >>> analyze("The runners were running"), analyze("The runners were running", "lex1")
    (['runner', 'run'], ['runners', 'running'])
    """
    if _check_analyzer(analyzer) == "lex1":
        return _words(text)
    return [stem(t) for t in _words(text)]


def _term_counts(text: str, analyzer: str) -> Counter[str]:
    """Counter(analyze(text, analyzer)), stemming each distinct word once."""
    words = Counter(_words(text))
    if analyzer == "lex1":
        return words
    out: Counter[str] = Counter()
    for w, n in words.items():
        out[stem(w)] += n
    return out


def term_hash(term: str) -> int:
    """Stable 64-bit id of a term: the first 8 bytes of blake2b(UTF-8), little-endian."""
    return int.from_bytes(hashlib.blake2b(term.encode("utf-8"), digest_size=8).digest(), "little")


def postings_file(analyzer: str | None = None) -> str:
    """Name of a shard's postings file of ``analyzer`` (default ``ANALYZER``; in the shard folder)."""
    return f"postings.{analyzer or ANALYZER}.parquet"


def _schema(analyzer: str) -> Any:
    from msa_memory.schemas.arrow import POSTINGS_SCHEMA

    return POSTINGS_SCHEMA.with_metadata({**(POSTINGS_SCHEMA.metadata or {}), _META_KEY: analyzer.encode()})


def postings_bytes(doc_ids: np.ndarray, texts: Sequence[str], analyzer: str | None = None) -> bytes:
    """The postings Parquet file of documents ``doc_ids`` with ``texts`` under ``analyzer`` (default
    ``ANALYZER``; rows by doc_id, then term_hash)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    analyzer = _check_analyzer(analyzer)
    hashes: dict[str, int] = {}
    rows_d: list[int] = []
    rows_t: list[int] = []
    rows_f: list[int] = []
    for d, text in sorted(zip((int(x) for x in doc_ids), texts), key=lambda p: p[0]):
        counts = _term_counts(text, analyzer)
        for t in counts.keys() - hashes.keys():
            hashes[t] = term_hash(t)
        pairs = sorted((hashes[t], n) for t, n in counts.items())
        rows_d.extend([d] * len(pairs))
        rows_t.extend(h for h, _ in pairs)
        rows_f.extend(n for _, n in pairs)
    tab = pa.table({"doc_id": np.asarray(rows_d, dtype=np.int64), "term_hash": np.asarray(rows_t, dtype=np.uint64),
                    "tf": np.asarray(rows_f, dtype=np.int32)}, schema=_schema(analyzer))
    sink = pa.BufferOutputStream()
    pq.write_table(tab, sink, compression="zstd", write_page_checksum=True)
    return bytes(sink.getvalue().to_pybytes())


def read_postings(be: Backend, key: str, analyzer: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(doc_id int64, term_hash uint64, tf int32) of the postings file ``key`` (page checksums verified; the
    analyzer in its metadata must be ``analyzer``, default ``ANALYZER``: the one its name says)."""
    want = ANALYZER if analyzer is None else analyzer
    where = key
    tab = read_parquet(be, key, f"Lexical postings {where}",
                       "Run `msa store verify STORE`; `msa store reindex-lexical STORE` writes them anew.")
    got = (tab.schema.metadata or {}).get(_META_KEY, b"").decode(errors="replace")
    if got != want or [f.name for f in tab.schema] != ["doc_id", "term_hash", "tf"]:
        raise ShardCorruptError(f"Lexical postings {where} say analyzer {got!r} and columns "
                                f"{[f.name for f in tab.schema]}, not {want!r} and doc_id, term_hash, tf.",
                                hint="Run `msa store verify STORE`; `msa store reindex-lexical STORE` writes them anew.")
    return (tab.column("doc_id").to_numpy().astype(np.int64, copy=False),
            tab.column("term_hash").to_numpy().astype(np.uint64, copy=False),
            tab.column("tf").to_numpy().astype(np.int32, copy=False))


# ----------------------------------------------------------------------------- where a shard's postings are


@dataclass(frozen=True)
class LexicalSource:
    """Where a version reads one shard's postings."""

    path: str
    """Store-relative path of the postings file."""
    analyzer: str
    sidecar: bool
    """True: ``lexical/...`` named by the manifest entry; False: inside the shard (its record covers it)."""


def _sources(store: _Snapshot, entry: dict[str, Any]) -> dict[str, LexicalSource]:
    """Every postings file of shard ``entry`` by analyzer: the shard's own, and its sidecar (which wins)."""
    sid = entry["shard_id"]
    out = {m.group(1): LexicalSource(f"shards/{sid}/{f}", m.group(1), False)
           for f in store._view(sid).record.files if (m := _POSTINGS_RE.match(f))}
    sc = entry.get("lexical")
    if sc is not None:
        out[sc["analyzer"]] = LexicalSource(sc["path"], sc["analyzer"], True)
    return out


def lexical_source(store: _Snapshot, entry: dict[str, Any], analyzer: str | None = None) -> LexicalSource | None:
    """Shard ``entry``'s postings of ``analyzer`` (its sidecar, else its own file; None when it has none).
    Without ``analyzer``: of the first of ``ANALYZERS`` it has, else of any other analyzer (for messages),
    else None."""
    found = _sources(store, entry)
    if analyzer is not None:
        return found.get(analyzer)
    for name in ANALYZERS:
        if name in found:
            return found[name]
    return found[min(found)] if found else None


def check_index(store: _Snapshot) -> str:
    """The analyzer of the version's lexical index: the first of ``ANALYZERS`` that every shard has postings
    of. Else ConfigError (one line, naming the store and ``msa store reindex-lexical STORE``)."""
    have = {e["shard_id"]: set(_sources(store, e)) for e in store.manifest["shards"]}
    for name in ANALYZERS:
        if all(name in got for got in have.values()):
            return name
    n = len(have)
    none = [sid for sid, got in have.items() if not got]
    unknown = {sid: min(got) for sid, got in have.items() if got and not got & set(ANALYZERS)}
    old = [sid for sid, got in have.items() if got & set(ANALYZERS) and ANALYZER not in got]
    what = []
    if none:
        what.append(f"no lexical index for {len(none)} of its {n} shards (e.g. {none[0]!r})")
    if unknown:
        sid, name = next(iter(unknown.items()))
        what.append(f"lexical postings of analyzer {name!r} for {len(unknown)} of its {n} shards (e.g. {sid!r}), "
                    f"which this release does not read (it reads {' and '.join(map(repr, ANALYZERS))})")
    if old and not none and not unknown:   # lex1 on some shards, ANALYZER on the others: no common analyzer
        name = next(a for a in ANALYZERS if a in have[old[0]])
        what.append(f"lexical postings of analyzer {name!r} for {len(old)} of its {n} shards (e.g. {old[0]!r}) "
                    f"and of {ANALYZER!r} for the other {n - len(old)}")
    root = str(store.root)
    raise ConfigError(f"Store {root!r} (version {store.version}) has {', and '.join(what)}; retriever='hybrid' "
                      "needs postings of one analyzer for every shard.",
                      hint=f"Add {ANALYZER!r} postings without re-encoding: `msa store reindex-lexical {root}` (a new "
                           "version; msa-encode builds them for the documents it adds).")


def verify_postings(store: _Snapshot, entry: dict[str, Any], shard_ok: bool) -> tuple[list[tuple[str, str]], int, int]:
    """(problems, files, bytes) of shard ``entry``'s postings: a sidecar's size and crc32c, and for each
    postings file of an analyzer this release reads (in-shard ones only when ``shard_ok``: the record's
    checks passed; a sidecar only when its size and crc32c are right) that it parses, is of the analyzer its
    name says and names only documents of the shard."""
    be = store.backend
    problems: list[tuple[str, str]] = []
    n_files = n_bytes = 0
    sc = entry.get("lexical")
    if sc is not None:
        name = sc["path"].split("/", 1)[1]
        problems += check_files(be, LEXICAL_DIR, {name: {"size": sc["size"], "crc32c": sc["crc32c"]}})
        n_files, n_bytes = 1, int(sc["size"])
    sidecar_ok = not problems
    for src in _sources(store, entry).values():
        if src.analyzer not in ANALYZERS or not (sidecar_ok if src.sidecar else shard_ok):
            continue
        try:
            docs, _, _ = read_postings(be, src.path, src.analyzer)
        except (ShardCorruptError, ShardMissingError) as e:
            problems.append((src.path, str(e)))
            continue
        stray = np.setdiff1d(docs, store._view(entry["shard_id"]).record.doc_ids)
        if stray.size:
            problems.append((src.path, f"names documents {stray[:10].tolist()} that shard {entry['shard_id']!r} "
                                       "does not hold; `msa store reindex-lexical STORE` writes the postings anew"))
    return problems, n_files, n_bytes


def sidecar_paths(manifest: dict[str, Any]) -> set[str]:
    """Store-relative paths of the lexical sidecars a manifest names."""
    return {e["lexical"]["path"] for e in manifest["shards"] if "lexical" in e}


# ----------------------------------------------------------------------------- BM25 over a version


class LexicalIndex:
    """BM25 over the live documents of a version (module docstring for the formula).

    ``doc_ids`` (N,) are the documents in score order (sorted store ids by default, as ``Memory.doc_ids``);
    ``analyzer`` is the postings' (``scores`` analyses the question with it);
    the postings are a term-major sparse matrix: ``terms`` (T,) sorted term hashes, ``indptr`` (T+1,),
    ``rows`` (P,) dense document index, ``weights`` (P,) the BM25 tf part of each posting (float64), and
    ``idf`` (T,).
    """

    def __init__(self, doc_ids: np.ndarray, rows: np.ndarray, term_hashes: np.ndarray, tf: np.ndarray, *,
                 analyzer: str | None = None, k1: float = BM25_K1, b: float = BM25_B) -> None:
        self.analyzer = _check_analyzer(analyzer)
        self.doc_ids = np.asarray(doc_ids, dtype=np.int64)
        self.k1, self.b = float(k1), float(b)
        n = self.n_docs = int(self.doc_ids.size)
        rows = np.asarray(rows, dtype=np.int64)
        tf64 = np.asarray(tf, dtype=np.float64)
        self.terms, col = np.unique(np.asarray(term_hashes, dtype=np.uint64), return_inverse=True)
        order = np.lexsort((rows, col))
        self.rows = rows[order]
        self.indptr = np.concatenate([[0], np.cumsum(np.bincount(col, minlength=self.terms.size))]).astype(np.int64)
        self.doc_len = np.bincount(rows, weights=tf64, minlength=n)           # (N,) tokens after stopwords
        self.avgdl = float(self.doc_len.sum() / n) if n else 0.0
        df = np.diff(self.indptr).astype(np.float64)
        self.idf = np.log1p((n - df + 0.5) / (df + 0.5))
        t = tf64[order]
        norm = self.k1 * (1.0 - self.b + self.b * self.doc_len[self.rows] / (self.avgdl or 1.0))
        self.weights = t * (self.k1 + 1.0) / (t + norm)

    def __repr__(self) -> str:
        return (f"LexicalIndex(analyzer={self.analyzer!r}, docs={self.n_docs}, terms={self.terms.size}, "
                f"postings={self.rows.size}, avgdl={self.avgdl:.1f}, k1={self.k1}, b={self.b})")

    def scores(self, text: str) -> np.ndarray:
        """(N,) float64 BM25 score of every document for the distinct terms of ``text`` (under ``analyzer``)."""
        out = np.zeros(self.n_docs, dtype=np.float64)
        terms = set(analyze(text, self.analyzer))
        hashes = np.unique(np.asarray([term_hash(t) for t in terms], dtype=np.uint64))
        if not hashes.size or not self.terms.size:
            return out
        cols = np.minimum(np.searchsorted(self.terms, hashes), self.terms.size - 1)
        for c in cols[self.terms[cols] == hashes]:                       # the question's terms the store has
            a, z = self.indptr[c], self.indptr[c + 1]
            out[self.rows[a:z]] += self.idf[c] * self.weights[a:z]      # a document once per column
        return out

    @classmethod
    def from_store(cls, store: _Snapshot, doc_ids: np.ndarray | None = None) -> LexicalIndex:
        """The index of ``store``'s version over its live documents (``doc_ids``: their order, default sorted
        ids), from the postings of the analyzer ``check_index`` chooses (ConfigError when there is none)."""
        analyzer = check_index(store)
        if doc_ids is None:
            doc_ids = np.sort(store.documents(["doc_id"]).column("doc_id").to_numpy())
        doc_ids = np.asarray(doc_ids, dtype=np.int64)
        sorter = np.argsort(doc_ids, kind="stable")
        sorted_ids = doc_ids[sorter]
        rows, terms, tfs = [], [], []
        for e in store.manifest["shards"]:
            src = lexical_source(store, e, analyzer)
            assert src is not None
            d, t, f = read_postings(store.backend, src.path, analyzer)
            live = store._view(e["shard_id"]).record.doc_ids[store._live_mask(e["shard_id"])]
            keep = np.isin(d, live)
            d, t, f = d[keep], t[keep], f[keep]
            if d.size and not doc_ids.size:
                raise ConfigError(f"doc_ids given to LexicalIndex.from_store miss live documents of version "
                                  f"{store.version} of {str(store.root)!r}; pass every live id.")
            i = np.minimum(np.searchsorted(sorted_ids, d), max(doc_ids.size - 1, 0))
            if d.size and not np.array_equal(sorted_ids[i], d):
                raise ConfigError(f"doc_ids given to LexicalIndex.from_store miss live documents of version "
                                  f"{store.version} of {str(store.root)!r}; pass every live id.")
            rows.append(sorter[i] if d.size else np.zeros(0, np.int64))
            terms.append(t)
            tfs.append(f)
        cat = (lambda parts, dt: np.concatenate(parts) if parts else np.zeros(0, dt))
        return cls(doc_ids, cat(rows, np.int64), cat(terms, np.uint64), cat(tfs, np.int32), analyzer=analyzer)
