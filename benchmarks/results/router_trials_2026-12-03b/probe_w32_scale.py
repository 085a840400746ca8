"""Probe (fourteenth session): bench_quality_scale's gpu step over 32- and 64-token router-key windows.

One encode of the prepared haystack (``--carry``, the 15dd820e pack and data) whose encoder pools the
router-layer inputs over W32 (tokens 0-31, 32-63, ...) and W32s (16-47, 48-79, ...) at every layer of the
default adapter. MSA's aligned 64-token chunks (A64) and the shipped shifted grid (S64) are count-weighted
means of two adjacent W32 windows, so every grid is scored from the one forward: per (grid, layer) the
(queries, passages) document scores (chunk max over the grid's windows), combined as in the CPU probe (a
layer over several grids: the max; layers summed). The row "A64 + S64@1,5,8,11" is the shipped default.
``--sizes`` need not be prepared sizes (a CPU check runs at a few 10K tokens). Writes $OUT/w32_scale.json.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[3]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
import bench_quality_scale as BQS  # noqa: E402
import device_pack  # noqa: E402
from msa_memory.encode import Encoder, RouterAdapter  # noqa: E402
from msa_memory.encode.encoder import token_batches  # noqa: E402
from msa_memory.encode.model import LoadedModel  # noqa: E402
from msa_memory.train.features import extract_query_tokens  # noqa: E402
from msa_memory.train.scores import chunk_scores, doc_scores  # noqa: E402
import dataclasses as dc  # noqa: E402

ALL = (1, 5, 8, 11, 13, 16, 17)
SH, DEEP = (1, 5, 8, 11), (13, 16, 17)
COMBOS = {
    "A64 (aligned only)": {"A64": ALL},
    "A64 + S64@1,5,8,11 (shipped default)": {"A64": ALL, "S64": SH},
    "A32 + S32 @all (32-token windows only)": {"A32": ALL, "S32": ALL},
    "A64 + A32 + S32 @all": {"A64": ALL, "A32": ALL, "S32": ALL},
    "default + A32,S32@all": {"A64": ALL, "S64": SH, "A32": ALL, "S32": ALL},
    "default + A32,S32@1,5,8,11": {"A64": ALL, "S64": SH, "A32": SH, "S32": SH},
    "default + A32,S32@13,16,17": {"A64": ALL, "S64": SH, "A32": DEEP, "S32": DEEP},
    "A64 + S32 @all": {"A64": ALL, "S32": ALL},
    "A32 @all": {"A32": ALL},
}


def pair_index(lens, shifted: bool):
    """(W32 row -> output window, W32 row weights, windows per passage) of A64 (or S64) built from W32."""
    rows_out, wts, per = [], [], []
    o = 0
    for n in lens:
        m = -(-int(n) // 32)
        cnt = np.minimum(32, int(n) - 32 * np.arange(m))
        if not shifted:
            out = o + np.arange(m) // 2
        elif n <= 32:
            out = np.array([o])
        else:
            out = np.concatenate([[-1], o + (np.arange(1, m) - 1) // 2])
        rows_out.append(out)
        wts.append(cnt)
        k = int(out.max()) - o + 1
        per.append(k)
        o += k
    return np.concatenate(rows_out), np.concatenate(wts).astype(np.float32), per


@torch.inference_mode()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--carry", required=True)
    ap.add_argument("--sizes", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch-tokens", type=int, default=131072)
    ap.add_argument("--q-block", type=int, default=200)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    carry = Path(args.carry)
    meta = json.loads((carry / "meta.json").read_text())
    d = np.load(carry / "data.npz")
    split = lambda flat, off: [flat[off[i]:off[i + 1]] for i in range(len(off) - 1)]  # noqa: E731
    pool = split(d["pool"], d["pool_off"])
    pool_len = np.array([len(x) for x in pool], dtype=np.int64)
    base = split(d["base"], d["base_off"])
    comp, digest = BQS.compose(base, d["base_len"], pool_len, max(meta["sizes"]) + 1, seed=meta["seed"])
    assert digest == meta["digest"], digest
    dev = torch.device(args.device)
    model, _ = device_pack.load_pack(carry / "pack", args.device)
    adapter = RouterAdapter.load("default").to(dev)
    layers = list(adapter.config.router_layers)
    assert tuple(layers) == ALL, layers
    enc_router = RouterAdapter.load("default").to(dev)
    enc_router.config = dc.replace(enc_router.config, chunk_tokens=32)
    enc_router = enc_router.with_shifted_layers(layers)
    loaded = LoadedModel(name="pack", hf_model=model, tokenizer=None, router=enc_router, wrap="plain",
                         model_fingerprint="pack")
    enc = Encoder(loaded, max_batch_tokens=args.batch_tokens)
    qp = [s.tolist() for s in split(d["qp"], d["qp_off"])]
    bos = d["bos"].tolist()
    n_q = len(qp)

    def passage(i):
        return qp[i] if i < n_q else bos + np.concatenate([pool[s] for s in comp[i - n_q]]).tolist()

    lens = np.array([len(x) for x in qp] + [1 + int(pool_len[c].sum()) for c in comp], dtype=np.int64)
    counts = BQS.prefix_counts(lens[n_q:], int(lens[:n_q].sum()), sizes)
    n_docs = n_q + max(counts.values())
    qsplit = split(d["qt"], d["qt_off"])
    qx, qoff = extract_query_tokens(loaded, [(q.tolist(), int(s)) for q, s in zip(qsplit, d["q_skip"])])
    Q = len(qsplit)
    ln = [int(qoff[i + 1] - qoff[i]) for i in range(Q)]
    qmask = torch.zeros(Q, max(ln), dtype=torch.bool, device=dev)
    rqs = []
    for li, l in enumerate(layers):
        q = torch.zeros(Q, max(ln), qx.shape[-1], device=dev)
        for i in range(Q):
            q[i, :ln[i]] = qx[qoff[i]:qoff[i + 1], li].to(dev).float()
            qmask[i, :ln[i]] = True
        rqs.append(adapter.router_q(l, q))
    grids = ("A64", "S64", "A32", "S32")
    totals = {g: torch.zeros(len(layers), Q, n_docs, device=dev) for g in grids}
    cfg = adapter.config
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    t_score = 0.0
    for b, group in enumerate(token_batches(lens[:n_docs].tolist(), args.batch_tokens)):
        pb = enc.encode_tokens([passage(i) for i in group])
        t1 = time.perf_counter()
        glens = lens[group[0]:group[-1] + 1]
        w = {}
        for g, shifted in (("A64", False), ("S64", True)):
            out, wt, per = pair_index(glens, shifted)
            keep = torch.as_tensor(np.flatnonzero(out >= 0), device=dev)
            o = torch.as_tensor(out, device=dev)[keep]
            wt_t = torch.as_tensor(wt, device=dev)[keep]
            x = torch.zeros(len(layers), sum(per), pb.x.shape[-1], device=dev)
            x.index_add_(1, o, pb.x[:, keep] * wt_t[None, :, None])
            tot = torch.zeros(sum(per), device=dev).index_add_(0, o, wt_t)
            w[g] = (x / tot[None, :, None], per)
        w["A32"] = (pb.x, list(pb.n_chunks))
        w["S32"] = (pb.x_s, list(pb.n_chunks_s))
        for g, (x, per) in w.items():
            cd = torch.repeat_interleave(torch.arange(len(group), device=dev), torch.as_tensor(per, device=dev))
            assert cd.shape[0] == x.shape[1]
            for li, l in enumerate(layers):
                keys = adapter.keys_from_pooled(l, x[li]).to(torch.bfloat16).float()
                cs = torch.cat([chunk_scores(rqs[li][s0:s0 + args.q_block], qmask[s0:s0 + args.q_block], keys,
                                             score=cfg.score, head_reduce=cfg.head_reduce,
                                             query_reduce=cfg.query_reduce) for s0 in range(0, Q, args.q_block)])
                totals[g][li, :, group[0]:group[-1] + 1] = doc_scores(cs, cd, len(group), chunk_reduce=cfg.chunk_reduce)
        del pb, w
        t_score += time.perf_counter() - t1
        if b % 100 == 0:
            print(f"batch {b}: {int(lens[:group[-1] + 1].sum())} tokens, {time.perf_counter() - t0:.0f}s", flush=True)
    sync()
    wall = time.perf_counter() - t0
    kinds = [str(x) for x in d["kinds"]]
    pos = torch.as_tensor(d["positives"].tolist(), device=dev)
    res = {}
    for c, spec in COMBOS.items():
        summed = torch.zeros(Q, n_docs, device=dev)
        for li, l in enumerate(layers):
            gs = [g for g, ls in spec.items() if l in ls]
            if gs:
                summed += torch.stack([totals[g][li] for g in gs]).amax(0)
        res[c] = {}
        for S, n in sorted(counts.items()):
            mem = summed[:, : n_q + n]
            at = mem[torch.arange(Q, device=dev), pos]
            rank = (1 + (mem > at[:, None]).sum(1)).cpu().numpy()
            row = {kind: {k: float(np.mean([rank[i] <= k for i in range(Q) if kinds[i] == kind])) for k in (1, 5, 16)}
                   for kind in ("fact", "ict")}
            res[c][str(S)] = {"routing": row, "docs": n_q + n, "tokens": int(lens[: n_q + n].sum()),
                              "positive_rank": rank.tolist()}
    out = {"device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu", "torch": torch.__version__,
           "digest": digest, "router_id": adapter.fingerprint(), "encode_tokens": int(lens[:n_docs].sum()),
           "wall_seconds": round(wall, 1), "score_seconds": round(t_score, 1),
           "combos": {c: {g: list(v) for g, v in s.items()} for c, s in COMBOS.items()}, "results": res}
    od = Path(os.environ.get("OUT", "."))
    od.mkdir(parents=True, exist_ok=True)
    (od / "w32_scale.json").write_text(json.dumps(out, indent=1))
    print(f"\n{'grids':<42} {'kind':<6} " + " ".join(f"{S // 1024:>7}K r@1/5/16" for S in sizes))
    for c in COMBOS:
        for kind in ("fact", "ict"):
            cells = ["{:.2f}/{:.2f}/{:.2f}".format(*(res[c][str(S)]["routing"][kind][k] for k in (1, 5, 16)))
                     for S in sizes]
            print(f"{c:<42} {kind:<6} " + "   ".join(f"{x:>14}" for x in cells))
    print(f"wall {wall:.0f}s, scoring {t_score:.0f}s")


if __name__ == "__main__":
    main()
