"""The four query sets of probe_last_layers.py together (400 needles, 400 cloze sentences): recall@16 per
combination and size, and cloze won / lost against BM25 and against the default with an exact two-sided sign
test; the same figures in --json.
Usage: python summarize.py probe_last_seed*.json [--json summary.json] > summary.log"""
import argparse
import json
from math import comb
from pathlib import Path


def sign_p(won: int, lost: int) -> float:
    n = won + lost
    if n == 0:
        return 1.0
    tail = sum(comb(n, i) for i in range(0, min(won, lost) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--json", default="summary.json")
    args = ap.parse_args()
    runs = [json.loads(Path(f).read_text()) for f in args.runs]
    sizes = list(runs[0]["results"])
    rows = list(runs[0]["results"][sizes[0]]["rows"])
    summary = {"seeds": [r["seed"] for r in runs], "adapters": runs[0]["adapters"], "sizes": sizes, "rows": {}}
    print(f"{'combination (query sets ' + ','.join(str(r['seed']) for r in runs) + ')':52s} "
          f"{'needles@16':>16s} {'cloze@16':>16s}   1M cloze vs BM25 (p) | vs default (p)")
    for c in rows:
        out = {}
        for S in sizes:
            agg = {}
            for kind in ("fact", "ict"):
                res = [r["results"][S]["rows"][c][kind] for r in runs]
                agg[kind] = {"r16": sum(x["r16"] for x in res) / len(res)}
                for other in ("vs_bm25", "vs_default"):
                    w, l = sum(x[other]["won"] for x in res), sum(x[other]["lost"] for x in res)
                    agg[kind][other] = {"won": w, "lost": l, "p": round(sign_p(w, l), 3)}
            out[S] = agg
        summary["rows"][c] = out
        last = out[sizes[-1]]["ict"]
        print(f"{c:52s} {' '.join(format(out[S]['fact']['r16'], '.3f') for S in sizes):>16s} "
              f"{' '.join(format(out[S]['ict']['r16'], '.3f') for S in sizes):>16s}   "
              f"{last['vs_bm25']['won']}/{last['vs_bm25']['lost']} ({last['vs_bm25']['p']}) | "
              f"{last['vs_default']['won']}/{last['vs_default']['lost']} ({last['vs_default']['p']})")
    bm = {S: sum(r["results"][S]["bm25_cloze_r16"] for r in runs) / len(runs) for S in sizes}
    summary["bm25_cloze_r16"] = bm
    print(f"{'BM25 (committed ranks)':52s} {'':>16s} {' '.join(format(bm[S], '.3f') for S in sizes):>16s}")
    Path(args.json).write_text(json.dumps(summary, indent=1))
    print(f"{args.json} written")


if __name__ == "__main__":
    main()
