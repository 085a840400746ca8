"""Per-layer routing scores of the default (MSA's query max) and of adapters trained for MSA's other
reducer, ``query_reduce = "last"`` (the question's last token, which has read the whole question), on
bench_quality's haystacks from its feature cache; every combination below is a sum of per-layer scores.

Each query's positive rank is paired with the committed BM25 ranks of the same query set
(``cloze_gap_2026-12-04/bench_quality_cpu_seedN.json``, the same queries, haystacks and BM25) and with the
default's ranks computed here (which must repeat the committed ones: checked and printed).

Usage: python probe_last_layers.py --last NAME=DIR [--last NAME=DIR ...] --seed 0 [--out F.json]
       [--template 'TEXT {q} TEXT' | --suffix TEXT] [--only 'COMBINATION;COMBINATION'] [--aligned-last]
Inference only on cached pooled inputs (no encode); prints a table and one JSON line.
"""
import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_quality as bq  # noqa: E402

COMMITTED = ROOT / "benchmarks" / "results" / "cloze_gap_2026-12-04"
ALL7 = (1, 5, 8, 11, 13, 16, 17)
SHALLOW, DEEP = (1, 5, 8, 11), (13, 16, 17)


def combos(names: list[str]) -> dict[str, list[tuple[str, int]]]:
    """Row name -> the (adapter, layer) scores it sums. ``max`` is the shipped default."""
    out = {"default: max at all 7": [("max", l) for l in ALL7]}
    for n in names:
        out |= {
            f"{n}: last at all 7": [(n, l) for l in ALL7],
            f"{n}: last at 13, 16, 17": [(n, l) for l in DEEP],
            f"{n}: last at 13": [(n, 13)],
            f"max at all 7 + {n}: last at 13, 16, 17": [("max", l) for l in ALL7] + [(n, l) for l in DEEP],
            f"max at all 7 + {n}: last at 13": [("max", l) for l in ALL7] + [(n, 13)],
            f"max at all 7 + {n}: last at all 7": [("max", l) for l in ALL7] + [(n, l) for l in ALL7],
            f"max at 1, 5, 8, 11 + {n}: last at 13, 16, 17": [("max", l) for l in SHALLOW] + [(n, l) for l in DEEP],
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--last", action="append", required=True, help="NAME=ADAPTER_DIR (query_reduce last)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sizes", default="16384,131072,1048576")
    ap.add_argument("--out", default=None)
    ap.add_argument("--template", default=None,
                    help="route the 'last' adapters' layers with each question put into this text at {q} (the "
                         "default's layers keep the bare question), e.g. a PromptEOL-style suffix")
    ap.add_argument("--suffix", default=None,
                    help="route the 'last' adapters' layers with this query suffix appended as the product does "
                         "(tokenized alone after the question: features.query_tokens), e.g. $'\\nThis passage is about'")
    ap.add_argument("--only", default=None, help="semicolon-separated combination names to compute (default: all)")
    ap.add_argument("--aligned-last", action="store_true",
                    help="score the 'last' adapters' layers over the aligned chunk grid alone (default: the default's "
                         "grid, aligned + shifted windows)")
    a = ap.parse_args()
    warnings.simplefilter("ignore")
    from msa_memory.encode import RouterAdapter
    from msa_memory.train.features import extract_queries

    t0 = time.perf_counter()
    sizes = [int(s) for s in a.sizes.split(",")]
    default = RouterAdapter.load("default")
    layers = list(default.config.router_layers)
    assert tuple(layers) == ALL7, layers
    shifted, window = tuple(default.config.shifted_layers), default.config.shifted_window
    adapters = {"max": default}
    for spec in a.last:
        name, path = spec.split("=", 1)
        ad = RouterAdapter.load(path)
        ad = ad.with_shifted_layers([l for l in shifted if l in ad.config.router_layers], window)
        if ad.config.query_reduce != "last":
            raise SystemExit(f"--last {spec}: its query_reduce is {ad.config.query_reduce!r}, not 'last'")
        adapters[name] = ad
    table = {c: parts for c, parts in combos([n for n in adapters if n != "max"]).items()   # each adapter's own layers
             if all(l in adapters[n].config.router_layers for n, l in parts)}
    if a.only:
        keep = [c.strip() for c in a.only.split(";")]
        table = {c: v for c, v in table.items() if c in keep or c.startswith("default")}
    ev = bq.seed_eval(default, a.seed, sizes, ROOT / ".bench" / "quality")
    queries, loaded, plans, x, chunk_doc, grid = (ev[k] for k in ("queries", "loaded", "plans", "x", "chunk_doc",
                                                                   "grid"))
    qx, qoff = extract_queries(loaded, [q.text for q in queries])
    if a.template and a.suffix:
        raise SystemExit("--template or --suffix, not both")
    qx_t, qoff_t = (extract_queries(loaded, [a.template.replace("{q}", q.text) for q in queries]) if a.template else
                    extract_queries(loaded, [q.text for q in queries], suffix=a.suffix) if a.suffix else (qx, qoff))
    committed = json.loads((COMMITTED / f"bench_quality_cpu_seed{a.seed}.json").read_text())
    results, ranks = {}, {}
    for S in sizes:
        rk = {c: {} for c in table}
        for docs, qidx in plans[S]:
            pos_local = [[docs.index(p) for p in queries[i].positives] for i in qidx]
            per = {}
            needed = {p for parts in table.values() for p in parts}
            for name, ad in adapters.items():
                qxa, qoa = (qx, qoff) if name == "max" else (qx_t, qoff_t)
                for l in ad.config.router_layers:
                    if (name, l) not in needed:
                        continue
                    sub = ad.subset([l]).with_shifted_layers([] if a.aligned_last and name != "max" else [l], window)
                    per[(name, l)] = bq.routing_scores(sub, layers, x, chunk_doc, qxa, qoa, docs, qidx, sub.config, grid)
            for c, parts in table.items():
                s = sum(per[p] for p in parts)
                for j, i in enumerate(qidx):
                    rk[c][i] = bq.positive_rank(s[j], pos_local[j])
        ranks[S] = {c: [r[i] for i in range(len(queries))] for c, r in rk.items()}
        cr = committed["results"][str(S)]["_positive_rank"]
        same = sum(x == y for x, y in zip(ranks[S]["default: max at all 7"], cr["routing (trained adapter)"]))
        bm25 = cr["BM25 (bm25s)"]
        out = {}
        for c in table:
            out[c] = {}
            for kind in ("fact", "ict"):
                idx = [i for i, q in enumerate(queries) if q.kind == kind]
                r = ranks[S][c]
                out[c][kind] = {"r1": sum(r[i] <= 1 for i in idx) / len(idx),
                                "r16": sum(r[i] <= 16 for i in idx) / len(idx),
                                "vs_bm25": bq.won_lost(r, bm25, idx),
                                "vs_default": bq.won_lost(r, ranks[S]["default: max at all 7"], idx)}
        idx_ict = [i for i, q in enumerate(queries) if q.kind == "ict"]
        results[S] = {"rows": out, "default_ranks_repeat_committed": f"{same}/{len(queries)}",
                      "bm25_cloze_r16": sum(bm25[i] <= 16 for i in idx_ict) / len(idx_ict)}
        print(f"size {S} done ({time.perf_counter() - t0:.0f}s); default's ranks repeat the committed run's for "
              f"{same}/{len(queries)} queries", file=sys.stderr, flush=True)
    print(f"{'combination':52s} {'needles@16':>22s}   {'cloze@16':>22s}   cloze won/lost vs BM25 | vs default")
    for c in table:
        f = " ".join(f"{results[S]['rows'][c]['fact']['r16']:.2f}" for S in sizes)
        i = " ".join(f"{results[S]['rows'][c]['ict']['r16']:.2f}" for S in sizes)
        wl = " ".join(f"{v['won']}/{v['lost']}" for v in (results[S]["rows"][c]["ict"]["vs_bm25"] for S in sizes))
        wd = " ".join(f"{v['won']}/{v['lost']}" for v in (results[S]["rows"][c]["ict"]["vs_default"] for S in sizes))
        print(f"{c:52s} {f:>22s}   {i:>22s}   {wl} | {wd}")
    print(f"{'BM25 (committed ranks)':52s} {'':>22s}   " +
          " ".join(f"{results[S]['bm25_cloze_r16']:.2f}" for S in sizes))
    out = {"seed": a.seed, "template": a.template, "suffix": a.suffix, "aligned_last": a.aligned_last, "adapters": {n: ad.fingerprint() for n, ad in adapters.items()},
           "seconds": round(time.perf_counter() - t0), "results": {str(S): results[S] for S in sizes},
           "ranks": {str(S): ranks[S] for S in sizes}}
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1))
    print(json.dumps({k: v for k, v in out.items() if k != "ranks"}))


if __name__ == "__main__":
    main()
