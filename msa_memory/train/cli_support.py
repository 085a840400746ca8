"""Argument plumbing of ``msa train-router``: turn CLI options into a :func:`recipe.run_training` call.

Kept out of ``msa_memory.cli.router`` so that module stays argument parsing and printing only. Sources of pairs:
the built-in recipe (no ``--corpus``/``--store``), the user's files (``--corpus``), or a store's
documents (``--store``, optionally with ``--pairs`` JSONL over its document ids, plus inverse
cloze and facts built from its texts).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from msa_memory.errors import ConfigError

__all__ = ["train_router_from_cli", "train_router_command", "parse_layers"]


def parse_layers(spec: str) -> Any:
    """``"all"``, ``"lower-half"``, ``"upper-half"`` or ``"0,1,5"`` → what ``load_model`` / recipe take."""
    s = spec.strip().lower()
    if s in ("all", "lower-half", "upper-half"):
        return s
    try:
        out = tuple(sorted({int(x) for x in s.split(",") if x.strip()}))
    except ValueError:
        raise ConfigError(f"--layers must be all, lower-half, upper-half or a comma list of ints, got {spec!r}.") from None
    if not out:
        raise ConfigError(f"--layers {spec!r} names no layer.")
    return out


def _store_pairs(store_path: str, pairs_path: str | None, seed: int, p_remove: float = 0.5,
                 fact_names: str = "syllables") -> tuple[Any, Any, Any]:
    """(train, dev, store_docs): store_docs = (snapshot, doc ids) when the passages are the store's
    texts unchanged (user pairs), so their kept router inputs can be used; else None."""
    import random

    from msa_memory.store import open_store
    from msa_memory.train.pairs import PairSet, load_jsonl
    from msa_memory.train.recipe import self_supervised_pairs

    st = open_store(store_path)
    tab = st.documents(["doc_id", "source_path", "text"]).to_pydict()
    ids = [int(x) for x in tab["doc_id"]]
    if len(ids) < 20:
        raise ConfigError(f"Store {store_path!r} has {len(ids)} documents; router training needs at least 20.")
    docs = list(zip(tab["source_path"], tab["text"]))
    if pairs_path:  # user pairs: passages are the store texts unchanged
        idx = {d: i for i, d in enumerate(ids)}
        qs = load_jsonl(pairs_path, idx)
        random.Random(seed).shuffle(qs)
        n_dev = max(1, len(qs) // 10)
        mk = lambda q: PairSet(list(tab["text"]), list(tab["source_path"]), q)  # noqa: E731
        return mk(qs[n_dev:]), mk(qs[:n_dev]), (st, ids)
    return (*self_supervised_pairs(docs, seed=seed, p_remove=p_remove, fact_names=fact_names), None)


def train_router_command(out: str, corpus: list[str] | None, store: str | None, pairs: str | None, model: str,
                          layers: str, max_layers: int, epochs: int, batch_size: int, lr: float, n_train: int,
                          n_dev: int, max_chars: int, seed: int, cache: str | None, device: str,
                          hard_negatives: str = "bm25", mine_every: int = 1, builtin: str = "stdlib",
                          negatives: int = 32, cloze_remove: float = 0.5, dev_distractors: bool = False,
                          bf16: bool = False, layer_loss: str = "each", query_reduce: str = "max",
                          head_reduce: str = "mean", init_adapter: str | None = None,
                          freeze_layers: str | None = None, fact_names: str = "syllables",
                          keep_layers: bool = False, shifted_layers: str | None = None,
                          shifted_window: int | None = None, query_suffix: str = "", freeze_keys: bool = False,
                          objective: str = "infonce", teacher: str = "minilm", queries: str | None = None,
                          distill_tau: float = 0.1, distill_alpha: float = 0.25, teacher_mined: int = 15,
                          teacher_random: int = 8) -> str:
    """The ``msa train-router`` line that reproduces a run (recorded in the adapter's training.json); options
    at their defaults are left out. Used by the CLI and by ``benchmarks/device_train.py``."""
    parts = ["msa train-router", f"--out {out}"] + [f"--corpus {c}" for c in corpus or []]
    parts += [f"--builtin {builtin}"] if builtin != "stdlib" else []
    parts += [f"--store {store}"] if store else []
    parts += [f"--pairs {pairs}"] if pairs else []
    parts += [f"--model {model}", f"--layers {layers}", f"--max-layers {max_layers}", f"--epochs {epochs}",
              f"--batch-size {batch_size}", f"--lr {lr:g}", f"--n-train {n_train}", f"--n-dev {n_dev}",
              f"--max-chars {max_chars}", f"--seed {seed}", f"--device {device}"]
    parts += [f"--cache {cache}"] if cache else []
    if hard_negatives != "bm25" or mine_every != 1:
        parts += [f"--hard-negatives {hard_negatives}", f"--mine-every {mine_every}"]
    parts += [f"--negatives {negatives}"] if negatives != 32 else []
    parts += [f"--cloze-remove {cloze_remove:g}"] if cloze_remove != 0.5 else []
    parts += ["--dev-distractors"] if dev_distractors else []
    parts += ["--bf16"] if bf16 else []
    parts += [f"--layer-loss {layer_loss}"] if layer_loss != "each" else []
    parts += [f"--query-reduce {query_reduce}"] if query_reduce != "max" else []
    parts += [f"--query-suffix {shell_quote(query_suffix)}"] if query_suffix else []
    parts += [f"--head-reduce {head_reduce}"] if head_reduce != "mean" else []
    parts += [f"--init-adapter {init_adapter}"] if init_adapter else []
    parts += [f"--freeze-layers {freeze_layers}"] if freeze_layers else []
    parts += [f"--fact-names {fact_names}"] if fact_names != "syllables" else []
    parts += ["--keep-layers"] if keep_layers else []
    parts += [f"--shifted-layers {shifted_layers}"] if shifted_layers is not None else []
    parts += [f"--shifted-window {shifted_window}"] if shifted_window is not None else []
    parts += ["--freeze-keys"] if freeze_keys else []
    parts += [f"--queries {queries}"] if queries else []
    if objective != "infonce":
        parts += [f"--objective {objective}", f"--teacher {teacher}", f"--distill-tau {distill_tau:g}",
                  f"--distill-alpha {distill_alpha:g}", f"--teacher-mined {teacher_mined}",
                  f"--teacher-random {teacher_random}"]
    return " ".join(parts)


def shell_quote(text: str) -> str:
    """``text`` as one bash word: ``shlex.quote`` when printable, else ANSI-C quoting (``$'\\n...'``)."""
    import shlex

    if text.isprintable():
        return shlex.quote(text)
    body = "".join(c if c.isprintable() and c not in "\\'" else
                   {"\n": "\\n", "\t": "\\t", "\\": "\\\\", "'": "\\'"}.get(c, f"\\x{ord(c):02x}" if ord(c) < 128
                                                                           else f"\\u{ord(c):04x}" if ord(c) < 65536
                                                                           else f"\\U{ord(c):08x}")
                   for c in text)
    return f"$'{body}'"


def train_config(*, epochs: int, batch_size: int, lr: float, seed: int, device: str, hard_negatives: str = "bm25",
                 mine_every: int = 1, negatives: int = 32, bf16: bool = False, layer_loss: str = "each",
                 query_reduce: str = "max", head_reduce: str = "mean", freeze_layers: str | None = None,
                 query_suffix: str = "", freeze_keys: bool = False, objective: str = "infonce",
                 distill_tau: float = 0.1, distill_alpha: float = 0.25) -> Any:
    """The ``TrainConfig`` of the ``msa train-router`` options of the same names."""
    from msa_memory.train.trainer import TrainConfig

    return TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, device=device,
                       hard_source=hard_negatives, mine_every=mine_every, n_random=negatives, bf16=bf16,
                       layer_loss=layer_loss, query_reduce=query_reduce, head_reduce=head_reduce,
                       frozen_layers=parse_layers(freeze_layers) if freeze_layers else (), query_suffix=query_suffix,
                       freeze_keys=freeze_keys, objective=objective, distill_tau=distill_tau, distill_alpha=distill_alpha)


def train_router_from_cli(*, out: str, corpus: Sequence[str] | None, store: str | None, pairs: str | None,
                          model: str, layers: str, max_layers: int, epochs: int, batch_size: int, lr: float,
                          n_train: int, n_dev: int, seed: int, max_chars: int = 800, cache: str | None, device: str, command: str,
                          log: Callable[[str], None], loaded: Any = None, hard_negatives: str = "bm25",
                          mine_every: int = 1, builtin: Sequence[str] = ("stdlib",), negatives: int = 32,
                          cloze_remove: float = 0.5, dev_distractors: bool = False, bf16: bool = False,
                          layer_loss: str = "each", query_reduce: str = "max",
                          head_reduce: str = "mean", init_adapter: str | None = None,
                          freeze_layers: str | None = None, fact_names: str = "syllables",
                          keep_layers: bool = False, shifted_layers: str | None = None,
                          shifted_window: int | None = None, query_suffix: str = "",
                          freeze_keys: bool = False, objective: str = "infonce", teacher: str = "minilm",
                          queries: str | None = None, distill_tau: float = 0.1, distill_alpha: float = 0.25,
                          teacher_mined: int = 15, teacher_random: int = 8) -> dict[str, Any]:
    """Build the pairs the options ask for and run :func:`msa_memory.train.recipe.run_training`.

    ``queries`` (built-in recipe only): pseudo-query sources (``distill.QUERY_SOURCES``, comma-separated)
    instead of inverse cloze + facts; ``objective="distill"`` distils ``teacher``'s rankings over them."""
    from msa_memory.train.recipe import builtin_pairs, distill_pairs, files_pairs, run_training

    if objective not in ("infonce", "distill"):
        raise ConfigError(f"--objective must be infonce or distill, got {objective!r}.")
    if objective == "distill":
        from msa_memory.train.distill import check_teacher

        check_teacher(teacher)
    if queries and (corpus or store):
        raise ConfigError("--queries chooses the built-in recipe's pseudo-queries; it cannot be combined with "
                          "--corpus or --store.")

    if pairs and not store:
        raise ConfigError("--pairs needs --store: positive_ids are document ids of that store.")
    if freeze_keys and not init_adapter:
        raise ConfigError("--freeze-keys keeps the router keys of the adapter training starts from: give it "
                          "(--init-adapter), e.g. the one your stores were built with.")
    if freeze_layers and not init_adapter:
        raise ConfigError("--freeze-layers keeps layers as they start: give the adapter they start from "
                          "(--init-adapter), or there is nothing trained to keep.")
    if corpus and store:
        raise ConfigError("Give either --corpus or --store, not both.")
    from msa_memory.train.pairs import check_fact_names

    check_fact_names(fact_names, "--fact-names")   # before any text is read
    from msa_memory.routing.config import check_query_suffix

    check_query_suffix(query_suffix, query_reduce, "--query-suffix")
    shifted = None if shifted_layers is None else (parse_layers(shifted_layers) if shifted_layers.strip() else ())
    if (corpus or store) and tuple(builtin) != ("stdlib",):
        raise ConfigError("--builtin chooses the built-in recipe's text; it cannot be combined with --corpus or --store.")
    store_docs = None
    if store:
        train, dev, store_docs = _store_pairs(store, pairs, seed, cloze_remove, fact_names)
    elif corpus:
        train, dev = files_pairs(corpus, seed=seed, max_chars=max_chars, p_remove=cloze_remove, fact_names=fact_names)
    elif queries:
        train, dev = distill_pairs(n_train, n_dev, seed=seed, max_chars=max_chars, sources=tuple(builtin),
                                   queries=queries, p_remove=cloze_remove, docs_cache=cache)
    else:
        train, dev = builtin_pairs(n_train, n_dev, seed=seed, max_chars=max_chars, sources=tuple(builtin),
                                   p_remove=cloze_remove, fact_names=fact_names)
    cfg = train_config(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, device=device,
                       hard_negatives=hard_negatives, mine_every=mine_every, negatives=negatives, bf16=bf16,
                       layer_loss=layer_loss, query_reduce=query_reduce, head_reduce=head_reduce,
                       freeze_layers=freeze_layers, query_suffix=query_suffix, freeze_keys=freeze_keys,
                       objective=objective, distill_tau=distill_tau, distill_alpha=distill_alpha)
    return run_training(out=out, model=model, candidate_layers=parse_layers(layers), max_layers=max_layers,
                        train_pairs=train, dev_pairs=dev, config=cfg, cache_dir=cache, device=device,
                        init_adapter=init_adapter,
                        command=command, log=log, loaded=loaded, dev_distractors=dev_distractors,
                        store_docs=store_docs, keep_layers=keep_layers, shifted_layers=shifted,
                        shifted_window=shifted_window,
                        teacher={"teacher": teacher, "n_mined": teacher_mined, "n_random": teacher_random}
                        if objective == "distill" else None)
