"""Routing with extra router keys over half-shifted chunks (tokens 0-31, 32-95, 96-159, ...) beside
MSA's aligned 64-token chunks, at bench_quality's haystacks, with the shipped default's trained weights
(no retraining: a shifted chunk mean is a 64-token mean like any other). A document scores the max over
its aligned chunks (MSA), its shifted chunks, or both. Usage: probe_shifted_chunks.py CACHE OUT.json
(CACHE: bench_quality's --cache, holding the aligned L1-5-8-11-13-16-17 x̄; the shifted x̄ are encoded
once into CACHE/shifted-L... here). Prints a table and one JSON line."""
import json, sys, time
from pathlib import Path
import torch
ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_quality as bq
import msa_memory.encode.encoder as encmod
from msa_memory.encode import Encoder, RouterAdapter, load_model
from msa_memory.encode.encoder import token_batches
from msa_memory.train.features import extract_queries

HALF = 32
_aligned_layout = encmod.chunk_layout


def shifted_layout(lens, chunk_tokens, device="cpu"):
    """Each document as two pieces, its first HALF tokens and the rest: the rest's 64-token chunks are
    the document's chunks shifted by HALF."""
    split = [p for n in lens for p in (min(HALF, n), max(0, n - HALF))]
    return _aligned_layout(split, chunk_tokens, device=device)


def shifted_features(loaded, passages, n_needed, cache: Path, block=256):
    cache.mkdir(parents=True, exist_ok=True)
    enc = Encoder(loaded, max_batch_tokens=8192, keep_router_inputs=True)
    xs, cds, t0 = [], [], time.perf_counter()
    for b0 in range(0, n_needed, block):
        f = cache / f"shifted_{b0:06d}.pt"
        b1 = min(b0 + block, n_needed)
        if f.is_file():
            d = torch.load(f, weights_only=True)
        else:
            seqs = [loaded.wrap_ids(p, i) for i, p in enumerate(passages[b0:b1], start=b0)]
            bx, counts = [], []
            encmod.chunk_layout = shifted_layout
            try:
                for group in token_batches([len(s) for s in seqs], 8192):
                    pb = enc.encode_tokens([seqs[i] for i in group])
                    bx.append(pb.x.to(torch.bfloat16).cpu())
                    n = list(pb.n_chunks)
                    counts += [n[2 * j] + n[2 * j + 1] for j in range(len(group))]
            finally:
                encmod.chunk_layout = _aligned_layout
            d = {"x": torch.cat(bx, 1), "cd": torch.repeat_interleave(torch.arange(b0, b1), torch.tensor(counts)),
                 "texts_sha256": bq._texts_digest(passages[b0:b1])}
            torch.save(d, f)
            print(f"  shifted passages {b0}..{b1} ({time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)
        assert d["texts_sha256"] == bq._texts_digest(passages[b0:b1]), f
        xs.append(d["x"]); cds.append(d["cd"])
    return torch.cat(xs, 1), torch.cat(cds)


def main():
    cache, out = Path(sys.argv[1]), Path(sys.argv[2])
    adapter = RouterAdapter.load("default")
    layers = list(adapter.config.router_layers)
    tag = "L" + "-".join(map(str, layers))
    passages, _, queries, n_q = bq.build_eval(100, 100)
    loaded = load_model("default", router_layers=tuple(layers))
    sizes = [16384, 131072, 1048576]
    _, plans, n_needed = bq.plan_haystacks(loaded, passages, queries, n_q, sizes, 10)
    xa, cda = bq.pool_features(loaded, passages, n_needed, cache / tag)
    xs, cds = shifted_features(loaded, passages, n_needed, cache / f"shifted-{tag}")
    qx, qoff = extract_queries(loaded, [q.text for q in queries])
    # each document's first shifted chunk is its first HALF tokens (BOS and template among them), all
    # inside its first aligned chunk: "no head" leaves it out
    first = torch.ones_like(cds, dtype=torch.bool)
    first[1:] = cds[1:] != cds[:-1]
    xsh, cdsh = xs[:, ~first], cds[~first]
    variants = {"aligned (MSA)": (xa, cda), "shifted": (xs, cds),
                "aligned + shifted": (torch.cat([xa, xs], 1), torch.cat([cda, cds])),
                "aligned + shifted, no head": (torch.cat([xa, xsh], 1), torch.cat([cda, cdsh]))}
    res = {}
    for S in sizes:
        for name, (x, cd) in variants.items():
            acc = {}
            for docs, qidx in plans[S]:
                s = bq.routing_scores(adapter, layers, x, cd, qx, qoff, docs, qidx, adapter.config)
                for kind in ("fact", "ict"):
                    m = [j for j, i in enumerate(qidx) if queries[i].kind == kind]
                    if m:
                        r = bq.recall(s[m], [[docs.index(p) for p in queries[qidx[j]].positives] for j in m])
                        acc.setdefault(kind, []).append((len(m), r))
            res.setdefault(str(S), {})[name] = {k: {kk: sum(n * r[kk] for n, r in v) / sum(n for n, _ in v)
                                                    for kk in bq.KS} for k, v in acc.items()}
    print(f"{'size':>8} {'chunks':<28} {'needles r@1/5/16':>18} {'cloze r@1/5/16':>18}")
    for S, rows in res.items():
        for name, r in rows.items():
            f = lambda d: "/".join(f"{d[k]:.2f}" for k in bq.KS)  # noqa: E731
            print(f"{S:>8} {name:<28} {f(r['fact']):>18} {f(r['ict']):>18}")
    summary = {"probe": "shifted_chunks", "router_id": adapter.fingerprint(), "half": HALF,
               "chunks_aligned": int(xa.shape[1]), "chunks_shifted": int(xs.shape[1]), "chunks_shifted_no_head": int(xsh.shape[1]), "results": res}
    out.write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
