"""Cost of `msa store reindex-router` (a new version of the same store) vs re-encoding (issue 6).

Regime: the default model (Gemma 3 270M, the shipped router adapter, bf16 store that keeps its
router inputs), real text (Python language-reference topics packed into ~1,200-character
passages) up to ``--tokens`` tokens, written as ``--shards`` shards and committed. Baseline, in
the same run: encoding + writing + committing those documents (what a new router costs without
kept router inputs). Measured: ``reindex_router(store, other_adapter)``, i.e. reading every
shard's x_router, one fp32 matmul per layer, writing the new key arrays (fsynced) and publishing
the version. The other adapter is the untrained q/k copy on the same layers.
Also checks the result: the new version's keys equal a fresh encode's up to bf16 rounding, and
the old version still reads its old keys. Prints a table and one final JSON line.

Run under the benchmark lock: ``flock /tmp/msa_bench.lock .venv/bin/python benchmarks/bench_reindex.py``.

Measured (2-core CPU, 2026-12-05, idle, 1-min load 1.3; the default adapter, layers 1, 5, 8, 11,
13, 16, 17 with their 32-token grid; benchmarks/results/bench_reindex_cpu.json): 65,738 tokens (283 docs, 1,169
chunks, 4 shards): encode + write + commit 53.2 s (1,236 tok/s), reindex in place 0.595 s (0.233 s of it
computing keys): 89x cheaper; keys within 0.002 of a fresh encode's; old version unchanged. Re-encoding grows with the model and the layers the encode runs through; reindexing grows with the
kept router inputs only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--shards", type=int, default=4)
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    import torch

    from msa_memory.encode import Encoder, load_model
    from msa_memory.schemas.records import Passage, to_float32
    from msa_memory.store import create_store, open_store, write_shard
    from msa_memory.train.texts import pack_paragraphs, pydoc_topics
    from msa_memory.train.reindex import reindex_router

    torch.set_num_threads(os.cpu_count() or 1)
    m = load_model("default")
    texts = [p for _, t in pydoc_topics() for p in pack_paragraphs(t, max_chars=1200)]
    n_tok, chosen = 0, []
    for t in texts:
        chosen.append(t)
        n_tok += len(m.wrap_ids(t, 0))
        if n_tok >= args.tokens:
            break
    tmp = Path(tempfile.mkdtemp(prefix="bench-reindex-"))
    root = tmp / "mem.msa"
    enc = Encoder(m, keep_router_inputs=True)
    t0 = time.perf_counter()
    store = create_store(root, enc.identity())
    ids = store.reserve_ids(len(chosen))
    ps = [Passage(t, f"p{i}.txt", 0) for i, t in enumerate(chosen)]
    cut = -(-len(ps) // args.shards)
    recs = [write_shard(root, f"s{j}", ps[j * cut:(j + 1) * cut], enc.encode(ids[j * cut:(j + 1) * cut],
                                                                            ps[j * cut:(j + 1) * cut]))
            for j in range(args.shards) if ps[j * cut:(j + 1) * cut]]
    store = store.commit(add=recs)
    t_encode = time.perf_counter() - t0
    # the other router: the untrained q/k copy on the same layers
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        other = load_model("default", router_layers="all").router.subset(m.router_layers).with_shifted_layers(
            m.router.config.shifted_layers, m.router.config.shifted_window)   # a version keeps its shifted grid
    t0 = time.perf_counter()
    new, stats = reindex_router(store, other)
    t_reindex = time.perf_counter() - t0
    # checks: new keys ≈ a fresh encode with the other router; the old version keeps its keys

    m2 = m.with_router(other)
    sample = ps[:8]
    fresh = Encoder(m2, keep_router_inputs=True).encode(ids[:8], sample)
    n8 = int(fresh.n_chunks.sum())
    err = max(float(np.abs(to_float32(new.router_keys(p)[0][:n8], "bfloat16")
                           - to_float32(fresh.k_router[p], "bfloat16")).max()) for p in range(new.identity.n_layers))
    old = open_store(root, version=store.version)
    old_same = all(np.array_equal(old.router_keys(p)[0], store.router_keys(p)[0]) for p in range(old.identity.n_layers))
    s = store.stats()
    print(f"\n{'what':<44} {'seconds':>9} {'tokens/s':>12}")
    print(f"{'encode + write + commit (baseline)':<44} {t_encode:>9.2f} {s['n_tokens'] / t_encode:>12,.0f}")
    print(f"{'reindex-router in place (new version)':<44} {t_reindex:>9.3f} {s['n_tokens'] / t_reindex:>12,.0f}")
    print(f"ratio: reindex is {t_encode / t_reindex:,.0f}x cheaper; {s['n_docs']} docs, {s['n_chunks']} chunks, "
          f"{len(recs)} shards, layers {list(m.router_layers)}; max |key - fresh encode| {err:.3g}; "
          f"old version unchanged: {old_same}")
    try:
        load1 = os.getloadavg()[0]
    except OSError:
        load1 = None
    print(json.dumps({"bench": "reindex", "device": f"cpu ({platform.machine()}, {os.cpu_count()} cores)",
                      "load_1min": load1, "tokens": int(s["n_tokens"]), "docs": int(s["n_docs"]),
                      "chunks": int(s["n_chunks"]), "shards": len(recs), "router_layers": list(m.router_layers),
                      "encode_write_commit_s": round(t_encode, 3), "reindex_s": round(t_reindex, 4),
                      "reindex_keys_s": stats["seconds_keys"], "speedup": round(t_encode / t_reindex, 1),
                      "max_abs_key_diff_vs_fresh_encode": err, "old_version_unchanged": old_same,
                      "new_version": new.version}))


if __name__ == "__main__":
    main()
