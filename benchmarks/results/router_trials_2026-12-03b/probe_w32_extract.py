"""Probe (fourteenth session): pooled router inputs x̄ over 32-token windows of bench_quality's passages.

Two grids at every layer of the default adapter, from one forward per batch: W32 (tokens 0-31, 32-63, ...)
and W32s (16-47, 48-79, ...; a passage of at most 16 tokens: one window). The 64-token grids (MSA's aligned
chunks and the shifted grid) are sums of two adjacent W32 windows, so every 64- and 32-token grid can be
scored from this one cache. Kept in float32 so that those sums are exact up to float rounding.
"""
import dataclasses as dc
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
import bench_quality as bq  # noqa: E402
from msa_memory.encode import load_model  # noqa: E402
from msa_memory.train.features import extract_passage_grids  # noqa: E402

out = ROOT / ".bench" / "w32"
out.mkdir(parents=True, exist_ok=True)
loaded = load_model("default")
layers = list(loaded.router_layers)
passages, sources, queries, n_q = bq.build_eval(100, 100)
n_tokens, plans, n_needed = bq.plan_haystacks(loaded, passages, queries, n_q, [16384, 131072, 1048576], 10)
print("layers", layers, "passages needed", n_needed, "tokens", int(n_tokens[:n_needed].sum()), flush=True)
loaded.router.config = dc.replace(loaded.router.config, chunk_tokens=32)
loaded.router = loaded.router.with_shifted_layers(layers)
block = 256
t0 = time.perf_counter()
for b0 in range(0, n_needed, block):
    f = out / f"w32_{b0:06d}.pt"
    if f.is_file():
        continue
    b1 = min(b0 + block, n_needed)
    x, cd, xs, cds = extract_passage_grids(loaded, [loaded.wrap_ids(p, i) for i, p in enumerate(passages[b0:b1])],
                                           dtype=torch.float32)
    torch.save({"x": x, "cd": cd + b0, "xs": xs, "cds": cds + b0, "layers": layers,
                "lens": torch.as_tensor(n_tokens[b0:b1])}, f)
    print(f"passages {b0}..{b1}: {time.perf_counter() - t0:.0f}s", flush=True)
print("done", flush=True)
