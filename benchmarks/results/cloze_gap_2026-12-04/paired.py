"""Pooled paired comparison of routing and BM25 recall@16, from the benchmarks' per-query positive ranks.

Reads bench_quality's ``quality.json`` files (``--cpu``, any seeds) and bench_quality_scale's
``quality_scale.json`` files (``--scale``), prints per file and size the queries each kind routes into the
top 16 where BM25 does not (won) and the reverse (lost), the pooled counts per size and kind, and an exact
two-sided sign test of won against lost. No model runs here.

Usage: python paired.py --cpu A/quality.json --cpu B/quality.json --scale C/quality_scale.json [--out F]

CPU files' kinds are read from their ``_kind`` lists; the scale files' queries are 100 needles, then cloze.
"""
import argparse
import json
import math
from pathlib import Path

ROW = "routing (trained adapter)"
BM25 = "BM25 (bm25s)"


def sign_test(won: int, lost: int) -> float:
    """Two-sided exact binomial p of ``won`` against ``lost`` under p = 1/2 (ties dropped)."""
    n = won + lost
    if n == 0:
        return 1.0
    k = min(won, lost)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def cpu_rows(path: Path) -> list[dict]:
    d = json.loads(path.read_text())
    out = []
    for S, res in d["results"].items():
        r, b, kinds = res["_positive_rank"][ROW], res["_positive_rank"][BM25], res["_kind"]
        out.append({"file": str(path), "bench": f"cpu seed {d.get('seed', 0)}", "size": int(S), "ranks": r,
                    "bm25": b, "kinds": kinds})
    return out


def scale_rows(path: Path, n_needles: int) -> list[dict]:
    """bench_quality_scale's queries are build_eval's: the ``n_needles`` needle facts first, then the cloze."""
    d = json.loads(path.read_text())
    out = []
    for S, res in d["gpu"]["results"].items():
        r, b = res["positive_rank"], d["bm25"][S]["positive_rank"]
        kinds = ["fact"] * n_needles + ["ict"] * (len(r) - n_needles)
        out.append({"file": str(path), "bench": f"H200 haystack {d['digest'][:8]}", "size": int(S), "ranks": r,
                    "bm25": b, "kinds": kinds})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpu", action="append", default=[])
    ap.add_argument("--scale", action="append", default=[])
    ap.add_argument("--needles", type=int, default=100, help="needle queries of the --scale runs (their first)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    rows = [r for p in a.cpu for r in cpu_rows(Path(p))] + [r for p in a.scale for r in scale_rows(Path(p), a.needles)]
    table, pooled = [], {}
    print(f"{'benchmark':<24} {'size':>10} {'kind':<7} {'n':>4} {'routing r@16':>12} {'BM25 r@16':>10} "
          f"{'won':>4} {'lost':>5} {'sign p':>7}")
    for row in rows:
        for kind in ("fact", "ict"):
            idx = [i for i, k in enumerate(row["kinds"]) if k == kind]
            r = sum(row["ranks"][i] <= 16 for i in idx)
            b = sum(row["bm25"][i] <= 16 for i in idx)
            won = sum(row["ranks"][i] <= 16 < row["bm25"][i] for i in idx)
            lost = sum(row["bm25"][i] <= 16 < row["ranks"][i] for i in idx)
            assert r - b == won - lost
            rec = {"bench": row["bench"], "size": row["size"], "kind": kind, "n": len(idx), "routing_r16": r / len(idx),
                   "bm25_r16": b / len(idx), "won": won, "lost": lost, "sign_p": sign_test(won, lost)}
            table.append(rec)
            name = "needles" if kind == "fact" else "cloze"
            print(f"{row['bench']:<24} {row['size']:>10} {name:<7} {len(idx):>4} {r / len(idx):>12.3f} "
                  f"{b / len(idx):>10.3f} {won:>4} {lost:>5} {rec['sign_p']:>7.3f}")
            key = (row["bench"].split()[0], row["size"], kind)
            p = pooled.setdefault(key, {"n": 0, "r": 0, "b": 0, "won": 0, "lost": 0})
            for k2, v in (("n", len(idx)), ("r", r), ("b", b), ("won", won), ("lost", lost)):
                p[k2] += v
    print("\npooled over the query sets of each machine")
    pooled_out = []
    for (machine, size, kind), p in sorted(pooled.items()):
        rec = {"machine": machine, "size": size, "kind": kind, "n": p["n"], "routing_r16": p["r"] / p["n"],
               "bm25_r16": p["b"] / p["n"], "won": p["won"], "lost": p["lost"], "sign_p": sign_test(p["won"], p["lost"])}
        pooled_out.append(rec)
        print(f"{machine:<24} {size:>10} {'needles' if kind == 'fact' else 'cloze':<7} {p['n']:>4} "
              f"{rec['routing_r16']:>12.3f} {rec['bm25_r16']:>10.3f} {p['won']:>4} {p['lost']:>5} {rec['sign_p']:>7.3f}")
    out = {"per_set": table, "pooled": pooled_out, "cpu": a.cpu, "scale": a.scale}
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1))
    print(json.dumps({"pooled": pooled_out}))


if __name__ == "__main__":
    main()
