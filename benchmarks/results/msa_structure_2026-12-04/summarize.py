"""The tables of this folder's README, from ``structure.json``, ``structure_scale.json`` and the committed
benchmark runs they were scored beside (no model runs here). Cloze recall@16 per scorer and size, and paired
counts (won: the first scorer has the positive in its top 16 and the second does not; lost: the reverse)
with an exact two-sided sign test. Hits under ties are expectations (``probe_structure.py``); a query
counts as a hit for the paired counts when that expectation is at least 0.5.

Usage (repository root): ``python benchmarks/results/msa_structure_2026-12-04/summarize.py [--out F]``.
"""
import argparse
import importlib.util
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
spec = importlib.util.spec_from_file_location("paired", HERE.parent / "cloze_gap_2026-12-04" / "paired.py")
paired_mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(paired_mod)
sign_test = paired_mod.sign_test
ALIGNED = "routing (aligned grid only)"


def cpu_hits() -> tuple[dict, list]:
    """{scorer: {size: [hit@16 per query, seeds 0-3 in turn]}}, [kind per query]."""
    d = json.loads((HERE / "structure.json").read_text())
    hits: dict = {}
    kinds: list = []
    for seed, s in d["seeds"].items():
        kinds += s["kind"]
        committed = json.loads((HERE.parent / "cloze_gap_2026-12-04" / f"bench_quality_cpu_seed{seed}.json").read_text())
        for S, row in s["sizes"].items():
            for name, h in row["hits"].items():
                hits.setdefault(name, {}).setdefault(int(S), []).extend(h["16"])
            hits.setdefault("routing, aligned grid alone", {}).setdefault(int(S), []).extend(
                float(r <= 16) for r in committed["results"][S]["_positive_rank"][ALIGNED])
    return hits, kinds


def table(hits: dict, kinds: list, names: list, pairs: list, title: str) -> dict:
    sizes = sorted(next(iter(hits.values())))
    print(f"\n## {title}: cloze recall@16 ({sum(k == 'ict' for k in kinds)} queries); needles in brackets\n")
    print("| scorer | " + " | ".join(f"{S >> 10}K" if S < 1 << 20 else f"{S >> 20}M" for S in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    out: dict = {"recall16": {}, "paired": {}}
    for n in names:
        cells = []
        for S in sizes:
            r = {k: sum(h for h, x in zip(hits[n][S], kinds) if x == k) / sum(x == k for x in kinds) for k in ("ict", "fact")}
            out["recall16"].setdefault(n, {})[S] = r
            cells.append(f"{r['ict']:.3f} ({r['fact']:.2f})")
        print(f"| {n} | " + " | ".join(cells) + " |")
    print("\n| cloze, paired | " + " | ".join(f"{S >> 10}K" if S < 1 << 20 else f"{S >> 20}M" for S in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    for a, b in pairs:
        cells = []
        for S in sizes:
            ha, hb = hits[a][S], hits[b][S]
            won = sum(1 for u, v, k in zip(ha, hb, kinds) if k == "ict" and u >= 0.5 > v)
            lost = sum(1 for u, v, k in zip(ha, hb, kinds) if k == "ict" and v >= 0.5 > u)
            p = sign_test(won, lost)
            out["paired"].setdefault(f"{a} vs {b}", {})[S] = {"won": won, "lost": lost, "p": round(p, 3)}
            cells.append(f"{won} / {lost} (p {p:.2f})")
        print(f"| {a} vs {b} | " + " | ".join(cells) + " |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    hits, kinds = cpu_hits()
    result = {"cpu": table(
        hits, kinds,
        ["routing (default)", "routing, aligned grid alone", "BM25 (bm25s, committed)", "whole/sum", "A64/sum",
         "fine/sum", "whole/max", "A64/max", "fine/max", "MiniLM whole (committed)", "MiniLM A64/max"],
        [("routing (default)", "BM25 (bm25s, committed)"), ("A64/sum", "whole/sum"), ("routing (default)", "A64/sum"),
         ("routing, aligned grid alone", "A64/sum"), ("routing (default)", "fine/sum"),
         ("MiniLM A64/max", "MiniLM whole (committed)"), ("MiniLM A64/max", "BM25 (bm25s, committed)"),
         ("routing (default)", "MiniLM A64/max"), ("routing (default)", "A64/max")],
        "CPU, bench_quality's haystacks, query sets 0-3")}
    p = HERE / "structure_scale.json"
    if p.exists():
        d = json.loads(p.read_text())
        committed = json.loads((HERE.parent / "cloze_gap_2026-12-04" / "bench_quality_scale_h200_cloze300.json").read_text())
        sh: dict = {}
        for S, row in d["results"].items():
            S = int(S)
            rr = committed["gpu"]["results"][str(S)]["positive_rank"]
            rb = committed["bm25"][str(S)]["positive_rank"]
            sh.setdefault("routing (default)", {})[S] = [float(r <= 16) for r in rr]
            sh.setdefault("BM25 (bm25s, committed)", {})[S] = [float(r <= 16) for r in rb]
            for n in ("whole/sum", "A64/sum"):
                sh.setdefault(n, {})[S] = [float(r <= 16) for r in row["positive_rank"][n]]
        result["scale"] = table(
            sh, d["kind"], ["routing (default)", "BM25 (bm25s, committed)", "whole/sum", "A64/sum"],
            [("routing (default)", "BM25 (bm25s, committed)"), ("A64/sum", "whole/sum"), ("routing (default)", "A64/sum")],
            f"H200 haystack {d['digest'][:8]} (routing: the H200 run), BM25 on this CPU")
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
