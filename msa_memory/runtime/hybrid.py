"""Hybrid retrieval: reciprocal-rank fusion of routing's ranking and BM25's over the store's lexical index.

Design note. ``Memory.route/search/ask(..., retriever="hybrid")`` scores every live document twice: by
routing (MSA's router, the sum over router layers that ``retriever="routing"`` ranks by) and by BM25
(``store.lexical.LexicalIndex``, built once per ``Memory`` at the first hybrid call from the postings
the store keeps). Each gives a ranking:

- routing's: every document, by routing score (ties: lower dense index, i.e. lower store id, first);
- BM25's: the documents sharing at least one term with the question, by BM25 score (ties: routing's
  order);

cut at ``depth`` (None, the default: not cut). A document's fused score is the sum over the rankings
that hold it of ``1 / (RRF_K + rank)``, ranks from 1, ``RRF_K = 60`` (Cormack et al. 2009); documents are
ordered by fused score, ties broken by routing's order. The scores are not calibrated against
anything but each other: the order is what counts.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from msa_memory.errors import ConfigError

__all__ = ["Retriever", "RETRIEVERS", "RRF_K", "check_retriever", "fuse_rrf"]

Retriever = Literal["routing", "hybrid"]
RETRIEVERS = ("routing", "hybrid")
#: the constant of reciprocal-rank fusion
RRF_K = 60


def check_retriever(retriever: object) -> Retriever:
    """``retriever`` if it is one of ``RETRIEVERS``, else ConfigError."""
    if retriever not in RETRIEVERS:
        raise ConfigError(f"retriever={retriever!r} is not one of {list(RETRIEVERS)}.",
                          hint="Use 'routing' (MSA's router, the default) or 'hybrid' (routing fused with BM25 over "
                               "the store's lexical index).")
    return retriever  # type: ignore[return-value]


def fuse_rrf(routing: np.ndarray, lexical: np.ndarray, *, depth: int | None = None,
             rrf_k: int = RRF_K) -> tuple[np.ndarray, np.ndarray]:
    """(order, fused): every document's dense index, best first, and (N,) fused scores (module docstring).

    ``routing`` and ``lexical`` are (N,) scores of the same documents; a document with ``lexical <= 0``
    shares no term with the question and is not in BM25's ranking.
    """
    routing = np.asarray(routing, dtype=np.float64)
    lexical = np.asarray(lexical, dtype=np.float64)
    n = routing.shape[0]
    if lexical.shape != (n,):
        raise ConfigError(f"fuse_rrf needs scores of the same documents, got shapes {routing.shape} and {lexical.shape}.")
    by_routing = np.argsort(-routing, kind="stable")                       # (N,) routing's ranking
    route_rank = np.empty(n, dtype=np.int64)
    route_rank[by_routing] = np.arange(n)
    hit = np.flatnonzero(lexical > 0)
    by_lexical = hit[np.lexsort((route_rank[hit], -lexical[hit]))]        # BM25's ranking, ties by routing
    cut = n if depth is None else int(depth)
    fused = np.zeros(n, dtype=np.float64)
    for ranking in (by_routing[:cut], by_lexical[:cut]):
        fused[ranking] += 1.0 / (rrf_k + np.arange(1, ranking.size + 1))
    order = np.lexsort((route_rank, -fused))
    return order, fused
