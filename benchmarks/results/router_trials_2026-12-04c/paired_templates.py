"""Paired, per query: rows of one probe_last_layers.py adapter against the same rows of another (same query
sets), cloze and needles at each size, won / lost and the exact sign test. Used for the template trial: the
'about' and 'eol' adapters against 'bare', all three trained alike on 3,000 passages (train_template_cpu.py).
Usage: python paired_templates.py A B  (reads probe_tpl_A_seed{0..3}.json, probe_tpl_B_seed{0..3}.json)"""
import json
import sys
from pathlib import Path

from summarize import sign_p

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2] / "benchmarks"))
import bench_quality as bq  # noqa: E402

COMMITTED = HERE.parent / "cloze_gap_2026-12-04"

a, b = sys.argv[1], sys.argv[2]
pairs = [(f"{a}: last at 13, 16, 17", f"{b}: last at 13, 16, 17"), (f"{a}: last at 13", f"{b}: last at 13"),
         (f"max at all 7 + {a}: last at 13, 16, 17", f"max at all 7 + {b}: last at 13, 16, 17"),
         (f"max at all 7 + {a}: last at 13", f"max at all 7 + {b}: last at 13")]
runs = {x: [json.loads(Path(f"probe_tpl_{x}_seed{s}.json").read_text()) for s in range(4)] for x in (a, b)}
kinds = [json.loads((COMMITTED / f"bench_quality_cpu_seed{s}.json").read_text())["results"] for s in range(4)]
print(f"{a} against {b}, 4 query sets: won / lost (p) at each size")
out = {}
for ra, rb in pairs:
    cells = []
    for S in runs[a][0]["ranks"]:
        for kind in ("ict", "fact"):
            w = l = 0
            for s in range(4):
                idx = [i for i, k in enumerate(kinds[s][S]["_kind"]) if k == kind]
                wl = bq.won_lost(runs[a][s]["ranks"][S][ra], runs[b][s]["ranks"][S][rb], idx)
                w, l = w + wl["won"], l + wl["lost"]
            out.setdefault(ra, {}).setdefault(S, {})[kind] = {"won": w, "lost": l, "p": round(sign_p(w, l), 3)}
            cells.append(f"{'cloze' if kind == 'ict' else 'needles'} {S}: {w}/{l} ({sign_p(w, l):.3f})")
    print(f"{ra}\n  " + "\n  ".join(cells))
print(json.dumps(out))
