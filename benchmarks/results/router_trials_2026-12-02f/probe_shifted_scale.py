"""bench_quality_scale's gpu step with extra router keys over half-shifted chunks (tokens 0-31,
32-95, ...) beside the aligned 64-token chunks: each encoded batch is pooled both ways (the second
forward with probe_shifted_chunks.shifted_layout) and every document gets both chunk sets, so the
chunk-max of routing takes the best of either (each document's first shifted chunk, its first HALF
tokens, left out: the "no head" variant). Usage: the gpu step's own arguments, e.g.
probe_shifted_scale.py --step gpu --carry /tmp/scale --adapter default --sizes 1048576,10485760"""
import dataclasses, sys
from pathlib import Path
import torch
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[2]), str(HERE.parents[2] / "benchmarks")]
import msa_memory.encode.encoder as E
import probe_shifted_chunks as P
import bench_quality_scale

_encode = E.Encoder.encode_tokens


def encode_both(self, seqs):
    a = _encode(self, seqs)
    E.chunk_layout = P.shifted_layout
    try:
        s = _encode(self, seqs)
    finally:
        E.chunk_layout = P._aligned_layout
    na = list(a.n_chunks)
    ca, idx, oa, os_, nb = sum(na), [], 0, 0, []
    for j in range(len(seqs)):
        # a document's aligned chunks, then its shifted ones but the first (its first HALF tokens,
        # inside its first aligned chunk: the "no head" variant of probe_shifted_chunks)
        h, r = s.n_chunks[2 * j], s.n_chunks[2 * j + 1]
        idx += list(range(oa, oa + na[j])) + list(range(ca + os_ + h, ca + os_ + h + r))
        oa, os_ = oa + na[j], os_ + h + r
        nb.append(na[j] + r)
    idx = torch.as_tensor(idx, device=a.x.device)
    cat = lambda u, v: torch.cat([u, v], 1).index_select(1, idx)  # noqa: E731
    return dataclasses.replace(a, n_chunks=nb, k=cat(a.k, s.k),
                               v=cat(a.v, s.v), x=cat(a.x, s.x), k_router=cat(a.k_router, s.k_router))


E.Encoder.encode_tokens = encode_both
if __name__ == "__main__":
    bench_quality_scale.main()
