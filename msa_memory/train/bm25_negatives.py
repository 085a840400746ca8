"""BM25 hard negatives of router training: for every query, the top BM25 (``bm25s``) passages that are not
its positives (``TrainConfig.hard_source`` "bm25" / "both"), scored a block of queries at a time
(:func:`bm25_topk`; ``benchmarks/bench_mining.py`` measures it against bm25s's own retrieve).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from msa_memory.errors import ConfigError

__all__ = ["bm25_hard_negatives", "bm25_topk"]


def bm25_hard_negatives(passages: Sequence[str], queries: Sequence[Any], n: int = 8) -> list[tuple[int, ...]]:
    """Per query, the ``n`` best BM25 passages that are not among its positives."""
    try:
        import bm25s
    except ImportError as e:
        raise ConfigError("Hard-negative mining needs the package bm25s.",
                          hint="pip install 'msa-memory[train]' (or bm25s).") from e
    if not passages or not queries:
        return [() for _ in queries]
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(list(passages), stopwords="en", show_progress=False), show_progress=False)
    k = min(len(passages), n + max(len(q.positives) for q in queries))
    docs = bm25_topk(retriever, bm25s.tokenize([q.text for q in queries], stopwords="en", return_ids=False,
                                               show_progress=False), k)
    out = []
    for q, row in zip(queries, docs):
        pos = set(q.positives)
        out.append(tuple(int(d) for d in row if int(d) not in pos)[:n])
    return out


def bm25_topk(retriever: Any, query_tokens: Sequence[Sequence[str]], k: int, block: int = 256) -> np.ndarray:
    """(Q, k) passage indices of the ``k`` best BM25 scores of each query, best first.

    The scores are bm25s's own (``BM25.get_scores``: the sum of the index's precomputed per-token
    document scores over the query's tokens, repeats counted, tokens outside the index dropped),
    computed for a block of ``block`` queries as one sparse product (query-token counts × the
    index's token × passage scores, scipy) instead of bm25s's one ``np.add.at`` per query token and
    a top-k over every passage (speed: ``benchmarks/bench_mining.py``). Ties rank the lower passage index first (bm25s leaves
    their order to ``argpartition``); a query without a known token scores 0 everywhere. Only the
    passages sharing a token with the query are ranked; the rest score 0, which assumes positive
    per-token scores (bm25s's default "lucene" method, what :func:`bm25_hard_negatives` builds).
    """
    import itertools

    try:
        from scipy import sparse
    except ImportError as e:
        raise ConfigError("Hard-negative mining needs the package scipy.",
                          hint="pip install 'msa-memory[train]' (or scipy).") from e
    sc = retriever.scores
    n_docs, vocab = int(sc["num_docs"]), len(sc["indptr"]) - 1
    k = min(int(k), n_docs)
    index = sparse.csr_matrix((sc["data"], sc["indices"], sc["indptr"]), shape=(vocab, n_docs))
    out = np.empty((len(query_tokens), k), dtype=np.int64)
    for b0 in range(0, len(query_tokens), block):
        ids = [retriever.get_tokens_ids(list(q)) for q in query_tokens[b0:b0 + block]]
        rows = np.repeat(np.arange(len(ids)), [len(x) for x in ids])
        cols = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=len(rows))
        counts = sparse.csr_matrix((np.ones(len(rows), dtype=index.dtype), (rows, cols)), shape=(len(ids), vocab))
        scores = (counts @ index).tocsr()          # (B, N) sparse: only passages sharing a token score > 0
        scores.eliminate_zeros()
        for i in range(len(ids)):
            lo, hi = scores.indptr[i], scores.indptr[i + 1]
            docs, vals = scores.indices[lo:hi].astype(np.int64), scores.data[lo:hi]
            if len(vals) > k:                      # keep the k best: all above the k-th score, ties by index
                kth = np.partition(vals, len(vals) - k)[len(vals) - k]
                above = vals > kth
                tied = np.sort(docs[vals == kth])[:k - int(above.sum())]
                docs, vals = np.concatenate([docs[above], tied]), np.concatenate([vals[above], np.full(len(tied), kth)])
            order = np.lexsort((docs, -vals))                                 # score desc, then index asc
            best = docs[order]
            if len(best) < k:                      # fewer scoring passages than k: zero-score ones, lowest index
                rest = np.setdiff1d(np.arange(min(n_docs, k + len(best))), best, assume_unique=True)[:k - len(best)]
                best = np.concatenate([best, rest])
            out[b0 + i] = best
    return out
