"""End-to-end router training: data → features → train → choose layers → saved adapter.

``run_training`` is what ``msa train-router`` calls. Data (issue 6):

- built-in corpus (default): standard-library docstrings (``corpus.stdlib_docstrings``) packed
  into passages, with inverse-cloze and synthetic-fact queries (``pairs.build_pairs``); a dev
  split of held-out passages (its own facts) reports recall@k after every epoch;
- a user corpus: text files / folders (``--corpus``), same pair building;
- a store (``--store``): its live documents are the passages (encoded again with the candidate
  layers), plus optional user pairs (``--pairs`` JSONL over the store's document ids).

Hard negatives (``TrainConfig.hard_source``): "bm25", the top BM25 (``bm25s``) passages of each
query that are not its positives; "routing", the top-scoring non-positive passages under the
router being trained (``trainer.mine_routing_negatives``; with ``--store`` these are the store's
own documents, so the negatives are what the store's routing confuses), re-mined every
``mine_every`` epochs or once; or "both".
Layer choice: train every candidate layer (each layer's loss only moves its own projections),
then keep the greedy subset whose summed scores rank best on the dev queries.
What this module does not do: print (it calls ``log``) or parse arguments (``msa_memory.cli.router`` does).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from msa_memory.errors import ConfigError
from msa_memory.train.bm25_negatives import bm25_hard_negatives
from msa_memory.train.texts import man_pages, pack_paragraphs, package_docstrings, stdlib_docstrings
from msa_memory.train.pairs import PairSet, build_pairs

__all__ = ["BUILTIN_SOURCES", "builtin_passages", "builtin_pairs", "distill_pairs",
           "files_pairs", "adapter_from_projections", "run_training"]

Log = Callable[[str], None]


def _shuffled_passages(docs: list[tuple[str, str]], seed: int, max_chars: int) -> list[tuple[str, str]]:
    ps = [(src, p) for src, text in docs for p in pack_paragraphs(text, max_chars=max_chars)]
    random.Random(seed).shuffle(ps)
    return ps


BUILTIN_SOURCES = {"stdlib": stdlib_docstrings, "man": man_pages, "packages": package_docstrings}
"""Built-in training text by name: standard-library docstrings, English man pages, docstrings of the
installed third-party packages (``corpus``)."""


def builtin_passages(sources: Sequence[str] = ("stdlib",), *, seed: int = 0, max_chars: int = 800) -> list[tuple[str, str]]:
    """(source, passage) pairs of the named built-in sources, packed and shuffled with ``seed``."""
    unknown = [s for s in sources if s not in BUILTIN_SOURCES]
    if unknown or not sources:
        raise ConfigError(f"Unknown built-in training source(s) {unknown or list(sources)!r}; "
                          f"choose from {sorted(BUILTIN_SOURCES)}.")
    docs = [d for name in dict.fromkeys(sources) for d in BUILTIN_SOURCES[name]()]
    return _shuffled_passages(docs, seed, max_chars)


def builtin_pairs(n_train: int = 500, n_dev: int = 100, *, seed: int = 0, max_chars: int = 800,
                  sources: Sequence[str] = ("stdlib",), p_remove: float = 0.5,
                  fact_names: str = "syllables") -> tuple[PairSet, PairSet]:
    """Train and dev pair sets from the built-in ``sources`` (disjoint passages).

    ``n_train=0`` takes every passage the sources give after the ``n_dev`` dev passages;
    ``p_remove`` is the probability that an inverse-cloze sentence is cut out of its passage;
    ``fact_names`` how the synthetic facts' names are made (``pairs.FactMaker``).
    """
    ps = builtin_passages(sources, seed=seed, max_chars=max_chars)
    if n_train == 0:
        n_train = len(ps) - n_dev
    if len(ps) < n_train + n_dev or n_train < 1:
        raise ConfigError(f"The built-in corpus ({'+'.join(sources)}) has {len(ps)} passages; asked for "
                          f"{n_train} + {n_dev}.", hint="lower --n-train / --n-dev, or add a source with --builtin.")
    train = build_pairs(ps[:n_train], split="train", seed=seed, p_fact=0.6, p_remove=p_remove, fact_names=fact_names)
    dev = build_pairs(ps[n_train:n_train + n_dev], split="train", seed=seed + 1000, p_fact=0.6, p_remove=p_remove,
                      fact_names=fact_names)
    return train, dev


def distill_pairs(n_train: int = 4000, n_dev: int = 400, *, seed: int = 0, max_chars: int = 800,
                  sources: Sequence[str] = ("stdlib",), queries: Sequence[str] = ("summary", "name", "first-sentence"),
                  p_remove: float = 0.5, docs_cache: str | Path | None = None) -> tuple[PairSet, PairSet]:
    """Train and dev pair sets of pseudo-queries (``distill.pseudo_query_pairs``: docstring summaries, man NAME
    lines, first sentences, inverse cloze) over the built-in ``sources``; dev and train passages come from
    disjoint documents (dev: the first documents of a seeded shuffle, up to ``n_dev`` passages).
    ``n_train=0``: every passage the remaining documents give. ``docs_cache``: a folder where each source's
    documents are kept as ``docs-NAME.json`` after the first read (rendering every man page takes minutes)."""
    from msa_memory.train.distill import parse_query_sources, pseudo_query_pairs

    queries = parse_query_sources(queries)
    unknown = [x for x in sources if x not in BUILTIN_SOURCES]
    if unknown or not sources:
        raise ConfigError(f"Unknown built-in training source(s) {unknown or list(sources)!r}; "
                          f"choose from {sorted(BUILTIN_SOURCES)}.")
    docs = [tuple(d) for name in dict.fromkeys(sources) for d in _cached_docs(name, docs_cache)]
    random.Random(f"distill-split-{seed}").shuffle(docs)
    n_passages, cut = 0, 0
    while cut < len(docs) and n_passages < n_dev:
        n_passages += len(pack_paragraphs(docs[cut][1], max_chars=max_chars))
        cut += 1
    dev = pseudo_query_pairs(docs[:cut], queries, seed=seed + 1000, max_chars=max_chars, max_passages=n_dev,
                             p_remove=p_remove)
    train = pseudo_query_pairs(docs[cut:], queries, seed=seed, max_chars=max_chars, max_passages=n_train or None,
                               p_remove=p_remove)
    if len(train.queries) < 1 or len(dev.queries) < 1:
        raise ConfigError(f"The pseudo-query sources {list(queries)} gave {len(train.queries)} training and "
                          f"{len(dev.queries)} dev queries over {'+'.join(sources)}.",
                          hint="add a source (--queries ...,ict) or more text (--builtin stdlib,man,packages).")
    return train, dev


def _cached_docs(name: str, cache: str | Path | None) -> list[tuple[str, str]]:
    if cache is None:
        return BUILTIN_SOURCES[name]()
    f = Path(cache) / f"docs-{name}.json"
    if f.is_file():
        return [tuple(d) for d in json.loads(f.read_text(encoding="utf-8"))]
    docs = BUILTIN_SOURCES[name]()
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps(docs), encoding="utf-8")
    return docs


def self_supervised_pairs(docs: Sequence[tuple[str, str]], *, seed: int = 0, p_remove: float = 0.5,
                          fact_names: str = "syllables") -> tuple[PairSet, PairSet]:
    """Train/dev pair sets from (source, text) documents taken whole, as ``msa train-router --store``
    builds them from a store's texts: shuffled with ``seed``, a tenth (at least 10) held out as dev,
    inverse cloze + inserted facts (``build_pairs``) on each."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_dev = max(10, len(docs) // 10)
    if len(docs) < 2 * n_dev:
        raise ConfigError(f"{len(docs)} documents are too few for self-supervised router training (at least 20).")
    return (build_pairs([docs[i] for i in order[n_dev:]], split="train", seed=seed, p_remove=p_remove,
                        fact_names=fact_names),
            build_pairs([docs[i] for i in order[:n_dev]], split="train", seed=seed + 1000, p_remove=p_remove,
                        fact_names=fact_names))


def files_pairs(paths: Sequence[str | Path], *, n_dev_fraction: float = 0.1, seed: int = 0,
                max_chars: int = 1200, max_passages: int | None = None, p_remove: float = 0.5,
                fact_names: str = "syllables") -> tuple[PairSet, PairSet]:
    """Train/dev pair sets from the user's own text files or folders (inverse cloze + facts)."""
    from msa_memory.encode.scan import scan_corpus

    docs = [(s.key, s.text) for s in scan_corpus([str(p) for p in paths]).sources]
    ps = _shuffled_passages(docs, seed, max_chars)
    if max_passages:
        ps = ps[:max_passages]
    n_dev = max(1, int(len(ps) * n_dev_fraction))
    if len(ps) < 2 * n_dev or len(ps) < 20:
        raise ConfigError(f"{list(map(str, paths))} give only {len(ps)} passages; router training needs at least 20.")
    return (build_pairs(ps[n_dev:], split="train", seed=seed, p_remove=p_remove, fact_names=fact_names),
            build_pairs(ps[:n_dev], split="train", seed=seed + 1000, p_remove=p_remove, fact_names=fact_names))


def adapter_from_projections(proj: Any, template: Any, *, layers: Sequence[int] | None = None,
                             extra: dict[str, Any] | None = None, score: str = "cosine",
                             train_config: Any = None) -> Any:
    """A ``RouterAdapter`` with the trained weights of ``layers`` (default all) of ``proj``.

    ``template`` is a ``RouterConfig`` giving head layout / pooling; the score and the head /
    query / chunk reducers are the ones the projections were trained with (``train_config``, a
    ``TrainConfig``), else ``score`` and the template's reducers.
    """
    import dataclasses

    from msa_memory.encode import RouterAdapter

    layers = tuple(sorted(int(x) for x in (layers or proj.layers)))
    how: dict[str, Any] = {"score": score}
    if train_config is not None:
        how = {k: getattr(train_config, k) for k in ("score", "head_reduce", "query_reduce", "chunk_reduce",
                                                     "query_suffix")}
    shifted = tuple(l for l in template.shifted_layers if l in layers)   # an --init-adapter's shifted grid, kept
    # an --init-adapter's suffix queries are not trained here: the saved adapter has none
    how.setdefault("query_suffix", template.query_suffix if template.query_reduce == "last" else "")
    how["suffix_layers"] = ()
    cfg = dataclasses.replace(template, router_layers=layers, shifted_layers=shifted, source="adapter",
                              shifted_window=template.shifted_window if shifted else None,
                              extra=dict(extra or {}), **how)
    ad = RouterAdapter(cfg)
    tensors = {}
    for l in layers:
        i = proj.layers.index(l)
        tensors[f"model.layers.{l}.self_attn.router_q_proj.0.weight"] = proj.q[i].detach().float().cpu()
        tensors[f"model.layers.{l}.self_attn.router_k_proj.0.weight"] = proj.k[i].detach().float().cpu()
    ad.load_tensors(tensors, where="trained projections")
    return ad


def _features(loaded: Any, pairs: PairSet, hard: int, cache: Path | None, name: str, log: Log,
              store_docs: tuple[Any, Sequence[int]] | None = None, query_suffix: str = "") -> Any:
    from msa_memory.train.features import build_features, load_features, save_features, store_features

    if query_suffix:   # queries read with a suffix are other features: cached apart
        name += "-suffix-" + hashlib.sha256(query_suffix.encode()).hexdigest()[:8]
    if cache is not None:
        f = cache / f"{name}.pt"
        if f.is_file():
            log(f"features: reusing {f}")
            return load_features(str(f))
    negs = bm25_hard_negatives(pairs.passages, pairs.queries, hard) if hard else None
    feats = None
    if store_docs is not None:  # passages are the store's documents unchanged: read their kept x̄
        feats = store_features(loaded, store_docs[0], store_docs[1], pairs.queries, hard_negatives=negs, log=log,
                               query_suffix=query_suffix)
    if feats is None:
        log(f"features: {name}: encoding {len(pairs.passages)} passages, {len(pairs.queries)} queries")
        feats = build_features(loaded, pairs.passages, pairs.queries, hard_negatives=negs, log=log,
                               query_suffix=query_suffix)
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        save_features(feats, str(cache / f"{name}.pt"))
    return feats


def run_training(*, out: str | Path, model: str = "default", candidate_layers: Any = "all",
                 max_layers: int = 9, train_pairs: PairSet | None = None, dev_pairs: PairSet | None = None,
                 config: Any = None, cache_dir: str | Path | None = None, init_adapter: str | Path | None = None,
                 device: str = "cpu", command: str = "", log: Log = print, loaded: Any = None,
                 dev_distractors: bool = False, store_docs: tuple[Any, Sequence[int]] | None = None,
                 features: tuple[Any, Any] | None = None, keep_layers: bool = False,
                 shifted_layers: Sequence[int] | None = None, shifted_window: int | None = None,
                 teacher: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train router projections and save the chosen adapter to ``out``; returns a summary dict.

    Parameters
    ----------
    out : path
        Directory for ``router_adapter.json`` / ``.safetensors`` (+ ``training.json``); when the
        chosen layers are fewer than the candidates, ``out/candidates`` holds the adapter of every
        trained layer (to choose another subset later without training again).
    model : str, default "default"
        What :func:`msa_memory.encode.load_model` takes.
    candidate_layers : "all", "lower-half", "upper-half" or sequence of int
        Layers whose projections are trained and measured.
    max_layers : int, default 9
        Most layers the saved adapter keeps (greedy selection on dev recall@16).
    keep_layers : bool, default False
        Keep every candidate layer instead (no selection; ``max_layers`` is not used): e.g. to fine-tune
        an adapter to a store's own text and re-key that store in place, which needs the same layers.
    shifted_layers : sequence of int, optional
        Candidate layers whose saved adapter also keys the shifted chunk grid (``RouterConfig.shifted_layers``;
        those of them the selection keeps). None: ``init_adapter``'s, else none. Training scores the aligned
        chunks either way (training over both grids gained nothing on the dev set).
    shifted_window : int, optional
        That grid's windows when finer than the chunks (``RouterConfig.shifted_window``: an even W < P at a
        stride of W/2). None: ``init_adapter``'s when ``shifted_layers`` is None too, else P-token windows.
    train_pairs, dev_pairs : PairSet, optional
        Default: :func:`builtin_pairs`.
    config : TrainConfig, optional
    cache_dir : path, optional
        Where extracted features are cached (``train.pt``, ``dev.pt``; with a query suffix
        ``train-suffix-HASH.pt``, ``dev-suffix-HASH.pt``, HASH the suffix's sha256, 8 hex digits).
    init_adapter : path, optional
        Start from this adapter's weights (its layers must cover the candidates) instead of q/k copies.
    dev_distractors : bool, default False
        Measure held-out recall (per epoch, layer choice) against the dev passages *and* every
        training passage, i.e. in a memory the size of the training corpus, not just the dev set's.
    store_docs : (MemoryStore, doc ids), optional
        The train and dev passages are these store documents, texts unchanged (``--store --pairs``):
        their router inputs are read from the store when it kept them for the candidate layers
        (``features.store_features``), so the corpus is not encoded again.
    features : (Features, Features), optional
        Train and dev features already extracted with ``loaded``'s backbone (e.g. on another
        machine from pre-tokenized pairs: ``benchmarks/device_train.py``); the pairs are then not
        needed and the counts recorded are the features' own.
    teacher : dict, optional
        With ``config.objective == "distill"``: ``{"teacher": "minilm" | "bm25" | "fusion", "n_mined": int,
        "n_random": int}`` for ``distill.teacher_lists`` over the training pairs (cached beside the features
        as ``teacher-NAME-MINED-RANDOM-SEED.pt``). Default: minilm, 15 mined, 8 random.
    loaded : LoadedModel, optional
        An already loaded model (its router layers must include the candidates; it is not modified
        except that its ``router`` is replaced by the candidate subset; with ``init_adapter`` a copy
        carrying that adapter is used instead). Saves a reload.
    """
    from msa_memory.train.trainer import RouterProjections, TrainConfig, evaluate, select_layers, train_router

    cfg = config or TrainConfig(device=device)
    t0 = time.perf_counter()
    if features is None and (train_pairs is None or dev_pairs is None):
        train_pairs, dev_pairs = builtin_pairs()
    layers_arg: Any = candidate_layers
    if candidate_layers == "lower-half":
        layers_arg = None  # resolved below once the model is known
    loaded = _candidate_model(model, loaded, init_adapter, candidate_layers, layers_arg, device)
    rc = _with_grid(loaded.router.config, shifted_layers, shifted_window)
    if features is not None:
        train_f, dev_f = features  # the trainer takes the candidate layers out of them
        counts = (train_f.counts(), dev_f.counts())
    else:
        counts = (train_pairs.counts(), dev_pairs.counts())
    log(f"model {loaded.name}: candidate router layers {list(rc.router_layers)}; train {counts[0]}, dev {counts[1]}")
    if features is None:
        cache = Path(cache_dir) if cache_dir else None
        train_f = _features(loaded, train_pairs, cfg.n_hard if cfg.hard_source in ("bm25", "both") else 0, cache,
                            "train", log, store_docs, cfg.query_suffix)
        dev_f = _features(loaded, dev_pairs, 0, cache, "dev", log, store_docs, cfg.query_suffix)
    if cfg.objective == "distill" and train_f.teacher_cands is None:
        train_f = _with_teacher(train_f, train_pairs, dict(teacher or {}), cfg.seed,
                                Path(cache_dir) if cache_dir and features is None else None, log)
    if dev_distractors and store_docs is not None:
        log("dev: --dev-distractors ignored: with --store --pairs the dev queries already face every store document")
    elif dev_distractors:  # held-out queries against dev + training passages: recall at the corpus's size
        dev_f = dev_f.with_distractors(train_f)
        log(f"dev: {dev_f.n_queries} queries against {dev_f.n_docs} passages (dev + training passages)")
    proj = RouterProjections.from_adapter(loaded.router)

    def on_epoch(rec: dict[str, Any]) -> None:
        r = rec.get("recall", {})
        log(f"epoch {rec['epoch']}: loss {rec['loss']:.4f}  dev recall@1/5/16 "
            f"{r.get(1, float('nan')):.3f}/{r.get(5, float('nan')):.3f}/{r.get(16, float('nan')):.3f}  "
            f"({rec['seconds']:.0f}s)")

    history = train_router(proj, train_f, dev_f, cfg, log=on_epoch)
    if keep_layers:  # no selection: the one held-out evaluation is of every layer
        chosen, trace = tuple(proj.layers), []
        final = evaluate(proj, dev_f, cfg, per_layer=False)
    else:
        ev = evaluate(proj, dev_f, cfg)
        chosen, trace = select_layers(ev["layer_scores"], ev["positive"], proj.layers, max_layers=max_layers)
        final = evaluate(proj.subset(chosen), dev_f, cfg, per_layer=False)
    log(f"layers {'kept' if keep_layers else 'chosen on dev'}: {list(chosen)}; dev recall@1/5/16 "
        + "/".join(f"{final['recall'][k]:.3f}" for k in (1, 5, 16)))
    summary = {
        "command": command, "model": loaded.name, "model_fingerprint": loaded.model_fingerprint,
        "candidate_layers": list(rc.router_layers), "router_layers": list(chosen),
        "train": counts[0], "dev": counts[1], "config": asdict(cfg),
        "dev_memory_passages": dev_f.n_docs,
        "history": [{k: v for k, v in h.items()} for h in history], "selection": trace,
        "dev_recall": final["recall"], "dev_recall_by_kind": {k[7:]: v for k, v in final.items() if k.startswith("recall_")},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if cfg.objective == "distill":
        summary["teacher"] = {"teacher": "minilm", "n_mined": 15, "n_random": 8, **dict(teacher or {})}
    return _save(Path(out), proj, rc, chosen, cfg, _provenance(cfg, summary, final, command, loaded), summary)


def _provenance(cfg: Any, summary: dict[str, Any], final: dict[str, Any], command: str, loaded: Any) -> dict[str, Any]:
    """What the saved adapter records of its training (``RouterConfig.extra``)."""
    return {"trained_by": "msa train-router",
            "loss": "INFONCE_DECOUPLE" if cfg.objective == "infonce" else
            f"listwise KL to {summary['teacher']['teacher']} + {cfg.distill_alpha:g} x INFONCE_DECOUPLE",
            "tau": cfg.tau,
            "dev_recall": {str(k): v for k, v in final["recall"].items()}, "command": command,
            "model_fingerprint": loaded.model_fingerprint}  # reindex refuses stores of another backbone


def _candidate_model(model: Any, loaded: Any, init_adapter: Any, candidate_layers: Any, layers_arg: Any,
                     device: str) -> Any:
    """The model to train on, its router cut to the candidate layers: ``loaded`` (started from
    ``init_adapter``'s weights when given) or ``model`` loaded with every candidate layer."""
    import warnings

    from msa_memory.encode import RouterAdapter, UntrainedRouterWarning, load_model

    adapter = RouterAdapter.load(init_adapter) if init_adapter else None
    if loaded is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UntrainedRouterWarning)
            if adapter is not None:
                loaded = load_model(model, adapter=adapter, device=device)
            else:
                loaded = load_model(model, router_layers="all" if layers_arg is None else layers_arg, device=device)
    elif adapter is not None:  # the given model, started from init_adapter's weights (not the router it has)
        loaded = loaded.with_router(adapter)
    if candidate_layers == "lower-half":
        loaded.router = loaded.router.subset(range(loaded.n_layers // 2))
    elif candidate_layers == "upper-half":
        loaded.router = loaded.router.subset(range(loaded.n_layers // 2, loaded.n_layers))
    elif not isinstance(candidate_layers, str) and tuple(candidate_layers) != loaded.router_layers:
        loaded.router = loaded.router.subset(int(x) for x in candidate_layers)
    return loaded


def _with_grid(rc: Any, shifted_layers: Sequence[int] | None, shifted_window: int | None) -> Any:
    """``rc`` with the shifted grid the saved adapter keys (``--shifted-layers`` / ``--shifted-window``)."""
    if shifted_layers is not None:
        bad = sorted(set(int(l) for l in shifted_layers) - set(rc.router_layers))
        if bad:
            raise ConfigError(f"--shifted-layers {bad} are not among the candidate layers {list(rc.router_layers)}.",
                              hint="Name some of the --layers layers, e.g. the shallow ones.")
        return dataclasses.replace(rc, shifted_layers=tuple(sorted(int(l) for l in shifted_layers)),
                                   shifted_window=shifted_window if shifted_layers else None)
    if shifted_window is not None:
        raise ConfigError("--shifted-window sets the windows of the shifted grid: name its layers too (--shifted-layers).")
    return rc


def _save(out: Path, proj: Any, rc: Any, chosen: Sequence[int], cfg: Any, extra: dict[str, Any],
          summary: dict[str, Any]) -> dict[str, Any]:
    """Save the chosen layers' adapter to ``out`` (every trained layer's to ``out/candidates`` when fewer were
    chosen) and ``training.json``; returns ``summary`` with the router id and folder."""
    ad = adapter_from_projections(proj, rc, layers=chosen, train_config=cfg, extra=extra)
    ad.save(out)
    if tuple(chosen) != tuple(proj.layers):  # every trained layer too, to choose another subset later
        extra_all = {**extra, "note": f"all candidate layers; the adapter one folder up keeps {list(chosen)}"}
        adapter_from_projections(proj, rc, train_config=cfg, extra=extra_all).save(out / "candidates")
        summary["candidates_adapter"] = str(out / "candidates")
    (out / "training.json").write_text(json.dumps(_jsonable(summary), indent=1, sort_keys=True))
    summary["router_id"] = ad.fingerprint()
    summary["out"] = str(out)
    return summary


def _with_teacher(train_f: Any, pairs: PairSet | None, teacher: dict[str, Any], seed: int, cache: Path | None,
                  log: Log) -> Any:
    """``train_f`` with the teacher's candidate lists over ``pairs`` (``distill.teacher_lists``), cached."""
    from msa_memory.train.distill import check_teacher, teacher_lists

    name, n_mined, n_random = teacher.get("teacher", "minilm"), int(teacher.get("n_mined", 15)), int(teacher.get("n_random", 8))
    check_teacher(name)
    f = cache / f"teacher-{name}-{n_mined}-{n_random}-{seed}.pt" if cache is not None else None
    if f is not None and f.is_file():
        d = torch.load(f, weights_only=True)
        if int(d["cands"].shape[0]) == train_f.n_queries:
            log(f"teacher: reusing {f}")
            return train_f.with_teacher(d["cands"], d["scores"])
    if pairs is None:
        raise ConfigError("Distillation needs the training pairs' texts for the teacher, or features that carry its "
                          "candidate lists (Features.with_teacher).")
    t0 = time.perf_counter()
    cands, scores = teacher_lists(pairs.passages, pairs.queries, name, n_mined=n_mined, n_random=n_random, seed=seed,
                                  log=log)
    log(f"teacher {name}: {cands.shape[0]} candidate lists of {cands.shape[1]} ({time.perf_counter() - t0:.0f}s)")
    if f is not None:
        f.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"cands": torch.from_numpy(cands), "scores": torch.from_numpy(scores)}, f)
    return train_f.with_teacher(cands, scores)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, float) and x != x:
        return None
    return x
