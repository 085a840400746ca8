"""Paired, per query: rows of one probe_last_layers.py adapter against the same rows of another (same query
sets), cloze and needles at each size, won / lost and the exact sign test. Used for the template trial: the
'about' and 'eol' adapters against 'bare', all three trained alike on 3,000 passages (train_template_cpu.py).
Usage: python paired_templates.py A B  (reads probe_tpl_A_seed{0..3}.json, probe_tpl_B_seed{0..3}.json)"""
import json
import sys
from pathlib import Path

from summarize import sign_p

COMMITTED = Path(__file__).resolve().parents[1] / "cloze_gap_2026-12-04"

a, b = sys.argv[1], sys.argv[2]
pairs = [(f"{a}: last at 13, 16, 17", f"{b}: last at 13, 16, 17"), (f"{a}: last at 13", f"{b}: last at 13"),
         (f"max at all 7 + {a}: last at 13, 16, 17", f"max at all 7 + {b}: last at 13, 16, 17"),
         (f"max at all 7 + {a}: last at 13", f"max at all 7 + {b}: last at 13")]
runs = {x: [json.loads(Path(f"probe_tpl_{x}_seed{s}.json").read_text()) for s in range(4)] for x in (a, b)}
print(f"{a} against {b}, 4 query sets: won / lost (p) at each size")
out = {}
for ra, rb in pairs:
    cells = []
    for S in runs[a][0]["ranks"]:
        for kind in ("ict", "fact"):
            w = l = 0
            for s in range(4):
                rka, rkb = runs[a][s]["ranks"][S][ra], runs[b][s]["ranks"][S][rb]
                kinds = json.loads((COMMITTED / f"bench_quality_cpu_seed{s}.json").read_text())["results"][S]["_kind"]
                for i, k in enumerate(kinds):
                    if k == kind:
                        w += rka[i] <= 16 < rkb[i]
                        l += rkb[i] <= 16 < rka[i]
            out.setdefault(ra, {}).setdefault(S, {})[kind] = {"won": w, "lost": l, "p": round(sign_p(w, l), 3)}
            cells.append(f"{'cloze' if kind == 'ict' else 'needles'} {S}: {w}/{l} ({sign_p(w, l):.3f})")
    print(f"{ra}\n  " + "\n  ".join(cells))
print(json.dumps(out))
