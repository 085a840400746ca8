"""bench_quality runs of several query sets pooled: recall@16 per row, kind and size, and paired won / lost
(queries one row puts into the top 16 and the other does not) with an exact two-sided sign test, against
BM25 and against a base row of the same runs. No model runs here.

Usage: python pooled.py quality_seed0.json quality_seed1.json ... [--base 'routing (default)'] [--json F]
"""
import argparse
import json
import math
from pathlib import Path

BM25 = "BM25 (bm25s)"


def sign_p(won: int, lost: int) -> float:
    n = won + lost
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(won, lost) + 1)) / 2 ** n)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--base", default="routing (default)", help="the row every other row is paired with too")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    runs = [json.loads(Path(f).read_text()) for f in a.runs]
    sizes = list(runs[0]["results"])
    rows = list(runs[0]["results"][sizes[0]]["_positive_rank"])
    out = {"runs": [{"file": f, "seed": r.get("seed"), "router_id": r.get("router_id"), "commit": r.get("commit")}
                    for f, r in zip(a.runs, runs)], "sizes": sizes, "rows": {}}
    print(f"{'row (query sets ' + ','.join(str(r.get('seed')) for r in runs) + ')':44s} {'kind':6s} "
          + " ".join(f"{int(S) // 1024:>6d}K" for S in sizes)
          + "   at the largest: vs BM25 won/lost (p) | vs base (p)")
    for row in rows:
        out["rows"][row] = {}
        for kind in ("fact", "ict"):
            rec, vs_b, vs_base = [], None, None
            for S in sizes:
                r = [x for run in runs for x, k in zip(run["results"][S]["_positive_rank"][row], run["results"][S]["_kind"])
                     if k == kind]
                b = [x for run in runs for x, k in zip(run["results"][S]["_positive_rank"][BM25], run["results"][S]["_kind"])
                     if k == kind]
                base = [x for run in runs for x, k in zip(run["results"][S]["_positive_rank"].get(a.base, []),
                                                           run["results"][S]["_kind"]) if k == kind]
                rec.append(sum(x <= 16 for x in r) / len(r))
                vs_b = (sum(x <= 16 < y for x, y in zip(r, b)), sum(y <= 16 < x for x, y in zip(r, b)))
                vs_base = ((sum(x <= 16 < y for x, y in zip(r, base)), sum(y <= 16 < x for x, y in zip(r, base)))
                           if base else (0, 0))
            out["rows"][row][kind] = {"r16": dict(zip(sizes, rec)), "n": len(r), "largest_vs_bm25": vs_b,
                                      "largest_vs_base": vs_base}
            print(f"{row:44s} {kind:6s} " + " ".join(f"{v:7.3f}" for v in rec)
                  + f"   {vs_b[0]}/{vs_b[1]} ({sign_p(*vs_b):.3f}) | {vs_base[0]}/{vs_base[1]} ({sign_p(*vs_base):.3f})")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
