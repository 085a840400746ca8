"""The retrieval-quality harness that bench_quality, bench_adapt and bench_quality_scale share: the
evaluation set (planted needles and inverse-cloze queries over Python-reference passages), haystacks of
a given memory size, the cached router inputs of the passages, routing scores by the library's
reference scorer (:func:`routing_scores`), BM25, recall@k and the paired comparison.
"""

from __future__ import annotations

import hashlib
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from msa_memory.train.pairs import FactMaker, Query, insert_sentence  # noqa: E402
from msa_memory.train.texts import debian_docs, pack_paragraphs, pydoc_topics, sentences  # noqa: E402

KS = (1, 5, 16)
ALIGNED_ROW = "routing (aligned grid only)"


# ----------------------------------------------------------------------------- data
def query_passage_pool(seed: int = 0):
    """(the shuffled pydoc (source, passage) pool the query passages come from, the rng that goes on to
    build the eval). The first ``n_needles`` of the pool are the needle passages, in order, before
    their fact was inserted."""
    rng = random.Random(f"bench-quality-{seed}")
    py = [(s, p) for s, t in pydoc_topics() for p in pack_paragraphs(t, max_chars=1200)]
    rng.shuffle(py)
    return py, rng


def build_eval(n_needles: int, n_ict: int, seed: int = 0):
    """(passages, sources, queries, n_query_passages): query passages first, then distractors."""
    py, rng = query_passage_pool(seed)
    facts = FactMaker("eval", seed)
    passages, sources, queries = [], [], []
    i = 0
    while len([q for q in queries if q.kind == "fact"]) < n_needles:
        s, text = py[i]
        i += 1
        statement, questions, value = facts.make()
        passages.append(insert_sentence(text, statement, rng))
        sources.append(s)
        queries.append(Query(questions[0], (len(passages) - 1,), "fact", value))
    while len([q for q in queries if q.kind == "ict"]) < n_ict:
        s, text = py[i]
        i += 1
        spans = [(a, b) for a, b in sentences(text) if 8 <= len(text[a:b].split()) <= 40]
        if len(sentences(text)) < 3 or not spans:
            continue
        a, b = rng.choice(spans)
        passages.append((text[:a].rstrip() + " " + text[b:].lstrip()).strip())
        sources.append(s)
        queries.append(Query(text[a:b].strip(), (len(passages) - 1,), "ict"))
    n_q = len(passages)
    rest = py[i:]
    deb = [(s, p) for s, t in debian_docs() if "changelog" not in s.lower() for p in pack_paragraphs(t, max_chars=1200)]
    random.Random(f"deb-{seed}").shuffle(deb)
    for s, p in rest + deb:
        passages.append(p)
        sources.append(s)
    return passages, sources, queries, n_q


def haystacks(n_tokens: np.ndarray, queries: list, n_q: int, size: int, per_group: int | None):
    """[(passage indices, query indices)] covering every query once with haystacks of ~``size`` tokens."""
    qids = list(range(len(queries)))
    if per_group is None:
        groups = [qids]
    else:
        # interleave kinds so each group has both
        by = {k: [i for i in qids if queries[i].kind == k] for k in ("fact", "ict")}
        inter = [x for pair in zip(by["fact"], by["ict"]) for x in pair]
        groups = [inter[s:s + per_group] for s in range(0, len(inter), per_group)]
    out = []
    d_next = n_q
    for g in groups:
        pos = sorted({p for i in g for p in queries[i].positives})
        tot = int(n_tokens[pos].sum())
        docs = list(pos)
        while tot < size and d_next < len(n_tokens):
            docs.append(d_next)
            tot += int(n_tokens[d_next])
            d_next += 1
        if tot < size:
            raise SystemExit(f"not enough passages for a {size}-token haystack (have {tot})")
        out.append((docs, g))
    return out


def plan_haystacks(loaded, passages, queries, n_q: int, sizes, group: int | None):
    """(tokens of each passage as ``loaded`` wraps it, {size: haystacks(...)}, how many passages the
    plans use): every size's haystacks, those of 16K tokens or less holding ``group`` queries each."""
    n_tokens = np.array([len(loaded.wrap_ids(p, 0)) for p in passages])
    plans = {S: haystacks(n_tokens, queries, n_q, S, group if S <= 16384 else None) for S in sizes}
    n_needed = max(max(docs) for S in sizes for docs, _ in plans[S]) + 1
    return n_tokens, plans, n_needed


# ----------------------------------------------------------------------------- features (cached)
def pool_features(loaded, passages, n_needed: int, cache: Path, block: int = 256):
    """x̄ (L, C, E) bf16 and chunk→passage of passages[:n_needed], encoded block-wise and cached; when the
    loaded router shifts some layers, also the shifted grid's (Ls, Cs, E) x̄ and chunk→passage there
    (else None, None): ``(x, cd, xs, cds)``."""
    from msa_memory.train.features import extract_passage_grids

    cache.mkdir(parents=True, exist_ok=True)
    shifted = list(loaded.router.config.shifted_layers)
    xs, cds, xss, cdss = [], [], [], []
    t0 = time.perf_counter()
    for b0 in range(0, n_needed, block):
        f = cache / f"pool_{b0:06d}.pt"
        b1 = min(b0 + block, n_needed)
        d = torch.load(f, weights_only=True) if f.is_file() else None
        # absent, cached for fewer passages than needed now, or made from other texts (other --needles / --ict
        # counts shift the passages; a file of an older version has no digest): encode again
        if d is None or int(d["cd"].max()) + 1 < b1 or d.get("texts_sha256") != _texts_digest(
                passages[b0:int(d["cd"].max()) + 1]):
            x, cd, x_s, cd_s = extract_passage_grids(loaded, [loaded.wrap_ids(p, i)
                                                              for i, p in enumerate(passages[b0:b1])])
            d = {"x": x, "cd": cd + b0, "layers": list(loaded.router_layers),
                 "texts_sha256": _texts_digest(passages[b0:b1])}
            if shifted:
                d.update(xs=x_s, cds=cd_s + b0, shifted_layers=shifted)
            torch.save(d, f)
            print(f"  encoded passages {b0}..{b1} ({time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)
        if d["layers"] != list(loaded.router_layers) or d.get("shifted_layers", []) != shifted:
            raise SystemExit(f"cache {f} has layers {d['layers']} (shifted {d.get('shifted_layers', [])}), wanted "
                             f"{list(loaded.router_layers)} (shifted {shifted}); use another --cache")
        xs.append(d["x"])
        cds.append(d["cd"])
        if shifted:
            xss.append(d["xs"])
            cdss.append(d["cds"])
    x, cd = torch.cat(xs, 1), torch.cat(cds)
    keep = cd < n_needed
    if not shifted:
        return x[:, keep], cd[keep], None, None
    x_s, cd_s = torch.cat(xss, 1), torch.cat(cdss)
    keep_s = cd_s < n_needed
    return x[:, keep], cd[keep], x_s[:, keep_s], cd_s[keep_s]


def cache_tag(layers, shifted=(), window=None) -> str:
    """Folder name of a feature cache: its layers (``L1-5-...``), shifted-grid layers (``-S1-5``) and that
    grid's window when finer than the chunks (``-W32``)."""
    return (f"L{'-'.join(map(str, layers))}" + (f"-S{'-'.join(map(str, shifted))}" if shifted else "")
            + (f"-W{window}" if shifted and window else ""))


def seed_eval(adapter, seed: int, sizes, cache: Path, group: int | None = 10) -> dict:
    """Query set ``seed`` of the CPU benchmark (100 needles + 100 cloze), its haystack plans for ``sizes`` and
    the pooled router-layer inputs of ``adapter``'s layers and grid from ``cache`` (encoded there on a miss), as
    ``main`` builds them with ``--adapter`` that adapter: for probes that score other weights on the same
    haystacks. Returns passages, queries, loaded, plans, x, chunk_doc, grid (for ``routing_scores``)."""
    from msa_memory.encode import load_model

    layers = tuple(adapter.config.router_layers)
    shifted, window = tuple(adapter.config.shifted_layers), adapter.config.shifted_window
    passages, _, queries, n_q = build_eval(100, 100, seed=seed)
    loaded = load_model("default", router_layers=layers)
    loaded.router = loaded.router.with_shifted_layers(shifted, window)
    _, plans, n_needed = plan_haystacks(loaded, passages, queries, n_q, sizes, group)
    tag = cache_tag(layers, shifted, window) + (f"-seed{seed}" if seed else "")
    x, chunk_doc, x_s, cd_s = pool_features(loaded, passages, n_needed, Path(cache) / tag)
    return {"passages": passages, "queries": queries, "loaded": loaded, "plans": plans, "x": x,
            "chunk_doc": chunk_doc, "grid": (list(shifted), x_s, cd_s)}


def _texts_digest(texts) -> str:
    import hashlib

    return hashlib.sha256("\0".join(texts).encode()).hexdigest()


# ----------------------------------------------------------------------------- scorers
def routing_scores(adapter, layers_all, x, chunk_doc, qx, qoff, docs, qidx, shifted=None, suffix_rows=0):
    """(len(qidx), len(docs)) routing scores summed over the adapter's layers, by the library's reference
    scorer (``routing.reference.adapter_doc_scores``). ``shifted``: (shifted layers cached, x̄_s,
    chunk→passage) of the shifted grid; at the adapter's shifted layers a passage scores the max over both
    grids' chunks (what ``runtime.Memory`` routes). ``suffix_rows``: each query's last that many rows of
    ``qx`` are the adapter's query suffix (:func:`query_inputs`); with suffix queries (``suffix_layers``) the
    layers' own queries read the rows before them and the suffix queries the last row, summed, as
    ``runtime.Memory`` routes."""
    from msa_memory.routing.reference import adapter_doc_scores

    rc = adapter.config
    local = torch.full((int(chunk_doc.max()) + 1,), -1, dtype=torch.long)
    local[torch.as_tensor(docs)] = torch.arange(len(docs))
    sel = local[chunk_doc] >= 0
    cdoc = local[chunk_doc[sel]]
    keys, maps = {}, {}
    cut = suffix_rows if rc.suffix_layers else 0     # rows only the suffix queries read
    total = torch.zeros(len(qidx), len(docs))
    with torch.no_grad():
        for l in rc.router_layers:                                           # (C', H, D) keys per layer
            keys[l], maps[l] = adapter.router_k(l, x[layers_all.index(l)][sel].float()), cdoc
            if l in rc.shifted_layers:                                       # both grids' chunks: max over both
                s_layers, x_s, cd_s = shifted
                sel_s = local[cd_s] >= 0
                keys[l] = torch.cat([keys[l], adapter.router_k(l, x_s[s_layers.index(l)][sel_s].float())])
                maps[l] = torch.cat([cdoc, local[cd_s[sel_s]]])
        for s in range(0, len(qidx), 16):
            qs = qidx[s:s + 16]
            lens = [int(qoff[i + 1] - qoff[i]) - cut for i in qs]
            m = torch.zeros(len(qs), max(lens), dtype=torch.bool)
            xq = {l: torch.zeros(len(qs), max(lens), qx.shape[-1]) for l in rc.router_layers}
            for j, i in enumerate(qs):
                m[j, :lens[j]] = True
                for l in rc.router_layers:
                    xq[l][j, :lens[j]] = qx[qoff[i]:qoff[i] + lens[j], layers_all.index(l)].float()
            xs = {l: torch.stack([qx[int(qoff[i + 1]) - 1, layers_all.index(l)].float() for i in qs])[:, None]
                  for l in rc.suffix_layers} if cut else None                # (B, 1, E) at the suffix's last row
            total[s:s + len(qs)] = adapter_doc_scores(adapter, keys, maps, len(docs), xq, m, xs)
    return total


def query_inputs(loaded, adapter, texts, cache):
    """(qx, qoff, suffix rows) of ``texts`` as ``adapter`` routes them: with its query suffix appended (the
    suffix's token count, else 0); ``cache`` (a dict) keeps them per suffix."""
    from msa_memory.routing.query import suffix_tokens
    from msa_memory.train.features import extract_queries

    sfx = adapter.config.query_suffix
    if sfx not in cache:
        qx, qoff = extract_queries(loaded, texts, suffix=sfx)
        cache[sfx] = (qx, qoff, len(suffix_tokens(loaded.tokenizer, sfx)))
    return cache[sfx]


def bm25_scores(texts, queries):
    import bm25s

    r = bm25s.BM25()
    r.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
    k = min(len(texts), 16)
    docs, scores = r.retrieve(bm25s.tokenize(queries, stopwords="en", show_progress=False), k=k, show_progress=False)
    out = torch.full((len(queries), len(texts)), -1e9)
    for i in range(len(queries)):
        out[i, torch.as_tensor(docs[i].astype(np.int64))] = torch.as_tensor(scores[i], dtype=torch.float32) + 1e-6 * (k - torch.arange(k))
    return out


def positive_rank(row, positives) -> int:
    """1 + the passages a query's score row puts above its best-scored positive (1-based rank)."""
    return int((row > row[positives].max()).sum()) + 1


def recall(scores, positives):
    """{k: mean over queries of hit-in-top-k} for single-positive queries."""
    out = {}
    for k in KS:
        top = scores.topk(min(k, scores.shape[1]), dim=1).indices
        out[k] = float(np.mean([bool(set(top[i].tolist()) & set(positives[i])) for i in range(len(positives))]))
    return out


def won_lost(ranks, base, idx, k: int = 16) -> dict:
    """Of queries ``idx``: those whose positive is in the top k by ``ranks`` and not by ``base`` (won), and the
    reverse (lost); ranks are 1-based positive ranks, one per query."""
    return {"won": sum(ranks[i] <= k < base[i] for i in idx), "lost": sum(base[i] <= k < ranks[i] for i in idx)}


def line_style(name: str) -> dict:
    """matplotlib keywords of a row: baselines (BM25, dense) as broad pale bands under the routing rows, so
    that a routing row equal to a baseline (needles: 1.00 beside BM25's) still shows on top of it."""
    if name.startswith(("BM25", "dense")):
        return {"lw": 5, "alpha": 0.4, "zorder": 2, "marker": "s", "ms": 8}
    return {"lw": 1.6, "zorder": 3, "marker": "o", "ms": 4}
