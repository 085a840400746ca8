"""Probe (the scale haystack): BM25 held to MSA's chunk max, 1M / 10M / 100M tokens, beside the H200 routing.

The haystack of the sixteenth session's H200 run with 300 cloze sentences
(``cloze_gap_2026-12-04/bench_quality_scale_h200_cloze300.json``, digest 5d715d9e): rebuilt here exactly
as ``bench_quality_scale.py --step bm25`` rebuilds it (checked against the digest). Scorers, recall@16 per
size and query kind:
- ``whole/sum``: BM25 over whole passages (this implementation; checked query by query against the
  committed bm25s ranks);
- ``A64/sum``: BM25 over the encoder's 64-token chunks (the token ids the gpu step encodes, cut at MSA's
  chunk boundaries, as text), a passage scored by its best chunk (MSA's chunk max);
- the committed routing (the shipped default, its per-query positive ranks from the gpu step) and bm25s.
BM25 as in ``probe_structure.py`` (Lucene idf, k1 1.5, b 0.75; bm25s's default tokenizer: lower case, words
of 2+ word characters, bm25s's English stopwords; a query term said twice counts twice), each size indexed
on its own units.

Run from the repository root (this 2-core CPU: 258 s):
``.venv/bin/python benchmarks/results/msa_structure_2026-12-04/probe_structure_scale.py``.
Writes ``structure_scale.json`` beside this file.
"""
from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_quality as bq  # noqa: E402
import bench_quality_scale as bqs  # noqa: E402
from bm25s.stopwords import STOPWORDS_EN  # noqa: E402

from msa_memory.encode import load_model  # noqa: E402

COMMITTED = HERE.parent / "cloze_gap_2026-12-04" / "bench_quality_scale_h200_cloze300.json"
K1, B = 1.5, 0.75
WORD = re.compile(r"(?u)\b\w\w+\b")
STOP = set(STOPWORDS_EN)


class Terms:
    """bm25s's default tokenization into a growing vocabulary of term ids."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}

    def __call__(self, text: str) -> list[int]:
        v = self.vocab
        return [v.setdefault(w, len(v)) for w in WORD.findall(text.lower()) if w not in STOP]


def tf_matrix(unit_terms_iter, n_units: int) -> sp.csr_matrix:
    indptr, cols, data = [0], [], []
    for ts in unit_terms_iter:
        u, c = np.unique(np.asarray(ts, dtype=np.int64), return_counts=True)
        cols.append(u)
        data.append(c)
        indptr.append(indptr[-1] + len(u))
    cols = np.concatenate(cols) if cols else np.zeros(0, np.int64)
    data = np.concatenate(data).astype(np.float64) if data else np.zeros(0)
    n_voc = int(cols.max()) + 1 if len(cols) else 1
    return sp.csr_matrix((data, cols, np.asarray(indptr)), shape=(n_units, n_voc))


def bm25_weights(tf: sp.csr_matrix, lens: np.ndarray, n_voc: int) -> sp.csr_matrix:
    tf = sp.csr_matrix((tf.data, tf.indices, tf.indptr), shape=(tf.shape[0], n_voc))
    n = tf.shape[0]
    df = np.bincount(tf.indices, minlength=n_voc).astype(np.float64)
    idf = np.log(1.0 + (n - df + 0.5) / (df + 0.5))
    norm = K1 * (1 - B + B * lens / max(float(lens.mean()), 1e-9))
    rows = np.repeat(np.arange(n), np.diff(tf.indptr))
    w = idf[tf.indices] * tf.data * (K1 + 1) / (tf.data + norm[rows])
    return sp.csr_matrix((w, tf.indices, tf.indptr), shape=tf.shape).tocsc()


def ranks_at(W: sp.csc_matrix, starts: np.ndarray, n_docs: int, qmat: sp.csr_matrix, pos: np.ndarray,
             block: int = 32) -> np.ndarray:
    """1 + passages scored above the positive, a passage = its best unit (units of passage d: starts[d]..)."""
    out = np.zeros(qmat.shape[0], dtype=np.int64)
    for a in range(0, qmat.shape[0], block):
        s = (W @ qmat[a:a + block].T).toarray()            # units × queries
        doc = np.maximum.reduceat(s, starts[:n_docs], axis=0)   # docs × queries
        for j in range(doc.shape[1]):
            out[a + j] = int((doc[:, j] > doc[pos[a + j], j]).sum()) + 1
    return out


def main() -> None:
    t0 = time.perf_counter()
    committed = json.loads(COMMITTED.read_text())
    sizes = committed["sizes"]
    passages, _, queries, n_q = bq.build_eval(100, 300)
    tok = load_model("default").tokenizer
    allowed = bqs._vocab(passages, n_q, queries, tok, 19000)
    texts, pool_ids, base, base_len = bqs._pool(passages, n_q, tok, allowed)
    pool_len = np.array([len(x) for x in pool_ids], dtype=np.int64)
    comp, digest = bqs.compose(base, base_len, pool_len, max(sizes) + 1, seed=0)
    assert digest == committed["digest"], "haystack differs from the committed one"
    lens = np.array([1 + int(pool_len[c].sum()) for c in comp], dtype=np.int64)
    q_tokens = sum(len(tok(passages[i], add_special_tokens=False)["input_ids"]) + 1 for i in range(n_q))
    counts = bqs.prefix_counts(lens, q_tokens, sizes)
    n_all = n_q + max(counts.values())
    print(f"haystack {digest[:8]} rebuilt ({time.perf_counter() - t0:.0f} s); passages per size "
          f"{ {S: n_q + n for S, n in counts.items()} }", flush=True)

    # per-token strings: a chunk's text is its tokens' pieces joined ('▁' = a space)
    pieces = {}

    def piece(t: int) -> str:
        if t not in pieces:
            p = tok.convert_ids_to_tokens(int(t))
            m = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", p)   # a byte-fallback piece: its byte (non-ASCII: a space)
            pieces[t] = (" " if p == tok.bos_token else chr(int(m.group(1), 16)) if m and int(m.group(1), 16) < 128
                         else " " if m else p.replace("\u2581", " "))
        return pieces[t]

    terms = Terms()
    whole_terms, a64_terms, a64_lens, a64_start = [], [], [], []
    bos = [int(tok.bos_token_id)]
    for d in range(n_all):
        if d < n_q:
            ids = bq_wrap(tok, passages[d])
            whole_terms.append(terms(passages[d]))
        else:
            c = comp[d - n_q]
            ids = bos + [t for s in c for t in pool_ids[s]]
            whole_terms.append(terms("".join(" " + texts[s] for s in c)))
        a64_start.append(len(a64_terms))
        for s in range(0, len(ids), 64):
            ts = terms("".join(piece(t) for t in ids[s:s + 64]))
            a64_terms.append(ts)
            a64_lens.append(len(ts))
        if d % 50000 == 0:
            print(f"  terms of {d} / {n_all} passages ({time.perf_counter() - t0:.0f} s)", flush=True)
    n_voc = len(terms.vocab)
    q_terms = [terms(q.text) for q in queries]
    qmat = tf_matrix(q_terms, len(queries))
    qmat = sp.csr_matrix((qmat.data, qmat.indices, qmat.indptr), shape=(len(queries), len(terms.vocab)))
    n_voc = len(terms.vocab)
    pos = np.array([q.positives[0] for q in queries])
    kinds = [q.kind for q in queries]
    starts_all = np.array(a64_start + [len(a64_terms)], dtype=np.int64)
    out: dict = {"digest": digest, "sizes": sizes, "kind": kinds, "results": {}}
    for S in sizes:
        n_docs = n_q + counts[S]
        wl = np.array([len(t) for t in whole_terms[:n_docs]], dtype=np.float64)
        Ww = bm25_weights(tf_matrix(whole_terms[:n_docs], n_docs), wl, n_voc)
        r_whole = ranks_at(Ww, np.arange(n_docs + 1), n_docs, qmat, pos)
        del Ww
        n_units = int(starts_all[n_docs])
        Wa = bm25_weights(tf_matrix(a64_terms[:n_units], n_units), np.array(a64_lens[:n_units], dtype=np.float64), n_voc)
        r_a64 = ranks_at(Wa, starts_all[:n_docs + 1], n_docs, qmat, pos)
        del Wa
        g = committed["gpu"]["results"][str(S)]
        routing = np.array(g["positive_rank"])
        bm25s_rank = np.array(committed["bm25"][str(S)]["positive_rank"])
        hits = {"routing (default)": routing <= 16, "BM25 (bm25s, committed)": bm25s_rank <= 16,
                "whole/sum": r_whole <= 16, "A64/sum": r_a64 <= 16}
        differ = int((hits["whole/sum"] != hits["BM25 (bm25s, committed)"]).sum())
        row = {"docs": n_docs, "a64_chunks": n_units, "whole_sum_vs_bm25s_differ": differ,
               "positive_rank": {"whole/sum": r_whole.tolist(), "A64/sum": r_a64.tolist()}, "recall16": {}, "paired": {}}
        for kind in ("fact", "ict"):
            m = np.array([k == kind for k in kinds])
            row["recall16"][kind] = {n: round(float(h[m].mean()), 4) for n, h in hits.items()}
            for a, b in (("routing (default)", "BM25 (bm25s, committed)"), ("routing (default)", "A64/sum"),
                         ("A64/sum", "whole/sum")):
                row["paired"].setdefault(kind, {})[f"{a} vs {b}"] = {
                    "won": int((hits[a] & ~hits[b] & m).sum()), "lost": int((~hits[a] & hits[b] & m).sum())}
        out["results"][str(S)] = row
        print(f"{S}: {n_docs} passages, {n_units} chunks, whole/sum vs bm25s differ on {differ}; "
              f"recall@16 {row['recall16']}; paired {row['paired']} ({time.perf_counter() - t0:.0f} s)", flush=True)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    (HERE / "structure_scale.json").write_text(json.dumps(out, indent=1))
    print(json.dumps({"bench": "msa_structure_probe_scale", "ict_r16": {S: out["results"][str(S)]["recall16"]["ict"]
                                                                        for S in sizes}, "seconds": out["seconds"]}))


def bq_wrap(tok, text: str) -> list[int]:
    """A query passage's tokens as the gpu step encodes them (``LoadedModel.wrap_ids``: BOS + the text)."""
    return [int(tok.bos_token_id)] + list(tok(text, add_special_tokens=False)["input_ids"])


if __name__ == "__main__":
    main()
