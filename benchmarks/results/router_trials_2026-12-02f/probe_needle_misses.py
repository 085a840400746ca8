"""Needle misses of the shipped default at bench_quality's 1M haystack: each needle's positive rank,
and whether its inserted fact sentence lies inside one 64-token chunk or is cut by a chunk boundary.
Reads bench_quality's cache of pooled inputs (--cache, layers of the default); prints a table and one JSON line."""
import difflib, json, sys
from pathlib import Path
import numpy as np, torch
ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_quality as bq
from msa_memory.encode import RouterAdapter, load_model
from msa_memory.train.features import extract_queries

cache = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / ".bench" / "quality_q200")
adapter = RouterAdapter.load("default")
layers = list(adapter.config.router_layers)
passages, sources, queries, n_q = bq.build_eval(100, 100)
loaded = load_model("default", router_layers=tuple(layers))
_, plans, n_needed = bq.plan_haystacks(loaded, passages, queries, n_q, [1 << 20], None)
(docs, qidx), = plans[1 << 20]
x, chunk_doc = bq.pool_features(loaded, passages, n_needed, cache / ("L" + "-".join(map(str, layers))))
qx, qoff = extract_queries(loaded, [q.text for q in queries])
need = [i for i in qidx if queries[i].kind == "fact"]
sc = bq.routing_scores(adapter, layers, x, chunk_doc, qx, qoff, docs, need, adapter.config)
pool, _ = bq.query_passage_pool(0)
tok = loaded.tokenizer
C = loaded.chunk_tokens
rows = []
for j, i in enumerate(need):
    pos = docs.index(queries[i].positives[0])
    rank = 1 + int((sc[j] > sc[j, pos]).sum())
    orig, text = pool[i][1], passages[i]
    sm = difflib.SequenceMatcher(None, orig, text, autojunk=False)
    ins = [(b1, b2) for tag, a1, a2, b1, b2 in sm.get_opcodes() if tag in ("insert", "replace")]
    a, b = min(s for s, _ in ins), max(e for _, e in ins)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    shift = len(loaded.wrap_ids(text, 0)) - len(enc["input_ids"])       # tokens the wrap puts before the text
    span = [t + shift for t, (s, e) in enumerate(enc["offset_mapping"]) if e > a and s < b]
    first, last = span[0] // C, span[-1] // C
    rows.append({"query": queries[i].text, "rank": rank, "chunks_of_fact": [first, last], "cut": first != last,
                 "passage_chunks": -(-len(loaded.wrap_ids(text, 0)) // C)})
miss = [r for r in rows if r["rank"] > 16]
cut = [r for r in rows if r["cut"]]
print(f"{'rank':>6} {'cut':>4} {'chunks':>7}  query")
for r in sorted(rows, key=lambda r: -r["rank"])[:15]:
    print(f"{r['rank']:>6} {str(r['cut']):>4} {r['passage_chunks']:>7}  {r['query']}")
summary = {"needles": len(rows), "recall@16": 1 - len(miss) / len(rows), "misses": len(miss),
           "misses_cut_by_a_chunk_boundary": sum(r["cut"] for r in miss), "cut_overall": len(cut),
           "recall@16_cut": float(np.mean([r["rank"] <= 16 for r in cut])) if cut else None,
           "recall@16_whole": float(np.mean([r["rank"] <= 16 for r in rows if not r["cut"]])),
           "router_id": adapter.fingerprint(), "rows": rows}
print(json.dumps({k: v for k, v in summary.items() if k != "rows"}))
Path(sys.argv[2] if len(sys.argv) > 2 else "probe_needle_misses.json").write_text(json.dumps(summary, indent=1))
