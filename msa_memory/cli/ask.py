"""``msa ask`` and ``msa search``: route a question to the top-k documents of a store (and answer it).

Arguments and printing only; the work is done by :class:`msa_memory.runtime.Memory`.
"""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from msa_memory.cli.common import JsonOpt, StoreArg, VersionOpt, app, emit_json, guard, open_version, progress_enabled
from msa_memory.errors import ConfigError


ModelOpt = Annotated[str, typer.Option("--model", "-m", help="The model the store was built with: 'default' (Gemma 3 270M), an HF folder or an MSA checkpoint")]
AdapterOpt = Annotated[str | None, typer.Option("--adapter", help="Router adapter folder the store was built with, e.g. router/ (default model: not needed for a store built with a shipped adapter, e.g. 'shallow')")]
TokenizerOpt = Annotated[str | None, typer.Option("--tokenizer", help="Tokenizer folder for a --model checkpoint saved without tokenizer files, e.g. Qwen3-4B-Instruct-2507/ (default: the model's own)")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N")]
DevicesOpt = Annotated[str | None, typer.Option("--devices", help="Shard the router keys by document over these devices (Memory Parallel), comma-separated, e.g. cuda:0,cuda:1; the model runs on the first (default: all keys on --device)")]
KOpt = Annotated[int | None, typer.Option("--k", "-k", help="Documents to retrieve (default: the router's top-k, 16 in MSA), e.g. 4", min=1)]
CentreOpt = Annotated[bool, typer.Option("--centre-queries/--no-centre-queries", help="Route with query centring calibrated on the store's own passages (a hubness correction; the first use on a store version computes it, later ones load it from the cache)")]
RetrieverOpt = Annotated[str, typer.Option("--retriever", help="routing (MSA's router) or hybrid (routing fused with BM25 over the store's lexical index; ask: text mode)")]
KeepCaseOpt = Annotated[bool, typer.Option("--keep-case", help="Route a question written in capitals only as typed (default: as the same words in lower case; set it when the documents themselves are in capitals)")]


def _check_retriever(store: str, version: str | None, retriever: str) -> None:
    """Refuse a bad --retriever, or hybrid on a store without a lexical index, before the model loads."""
    from msa_memory.runtime.hybrid import check_retriever
    from msa_memory.store.lexical import check_index

    if check_retriever(retriever) == "hybrid":
        check_index(open_version(store, version))


def _memory(store: str, version: str | None, model: str, adapter: str | None, device: str, json_out: bool,
            tokenizer: str | None = None, devices: str | None = None, centre_queries: bool = False,
            reader: str | None = None, keep_case: bool = False) -> Any:
    """The Memory a command asks for; ``centre_queries``: with query centres from the store's own passages;
    ``reader``: None (the shipped reader if it fits the model), "none", "default" or a folder; ``keep_case``:
    questions in capitals only route as typed (``Memory.fold_shouted_questions`` off)."""
    mem = _open_memory(store, version, model, adapter, device, json_out, tokenizer, devices, _reader_spec(reader))
    mem.fold_shouted_questions = not keep_case
    if centre_queries:
        mem.centre_queries("store")
    return mem


def _reader_spec(reader: str | None) -> Any:
    if reader is None:
        return None
    if reader.lower() == "none":
        return False
    if reader.lower() == "default":
        return True
    from msa_memory.runtime.reader import check_reader_folder

    check_reader_folder(reader)      # before the model loads
    return reader


def _open_memory(store: str, version: str | None, model: str, adapter: str | None, device: str, json_out: bool,
                 tokenizer: str | None, devices: str | None, reader: Any = None) -> Any:
    from msa_memory.runtime import Memory

    shards = [d.strip() for d in devices.split(",") if d.strip()] if devices else None
    if devices is not None and not shards:
        raise ConfigError(f"--devices {devices!r} names no device.", hint="Give a comma-separated list, e.g. cuda:0,cuda:1.")

    if not progress_enabled(json_out):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if shards:
        return Memory(open_version(store, version), model=model, adapter=adapter, tokenizer=tokenizer, devices=shards,
                      device=shards[0] if device == "auto" else device, reader=reader)
    return Memory(open_version(store, version), model=model, adapter=adapter, tokenizer=tokenizer, device=device,
                  reader=reader)


@app.command("ask", epilog="\b\nExamples:\n  msa ask mem.msa \"Who approved the budget?\" --mode text\n"
             "  msa ask mem.msa \"Who approved the budget?\" --mode pooled -k 4 --json\n"
             "  msa ask mem.msa \"Who approved the budget?\" --retriever hybrid")
def ask(
    store: StoreArg,
    question: Annotated[str, typer.Argument(help="The question, e.g. 'Who approved the budget?'", show_default=False)],
    mode: Annotated[str | None, typer.Option("--mode", help="pooled (MSA checkpoints), text (any model) or interleave; default pooled for MSA stores, else text (text with --retriever hybrid)")] = None,
    k: KOpt = None,
    model: ModelOpt = "default",
    adapter: AdapterOpt = None,
    tokenizer: TokenizerOpt = None,
    device: DeviceOpt = "auto",
    devices: DevicesOpt = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Longest answer in tokens, e.g. 128", min=1)] = 64,
    temperature: Annotated[float, typer.Option("--temperature", help="0 = greedy; e.g. 0.7 to sample", min=0.0)] = 0.0,
    rounds: Annotated[int, typer.Option("--rounds", help="Round cap of --mode interleave", min=1)] = 3,
    stream: Annotated[bool, typer.Option("--stream/--no-stream", help="Print the answer as it is generated")] = True,
    retriever: RetrieverOpt = "routing",
    centre_queries: CentreOpt = False,
    reader: Annotated[str | None, typer.Option("--reader", help="Reader adapter of --mode pooled: a `msa train-reader --out` folder, default (the shipped one) or none; unset: the shipped one when it was trained on --model")] = None,
    keep_case: KeepCaseOpt = False,
    version: VersionOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Answer a question from a store (routes to top-k documents, then generates)."""

    def body() -> None:
        _check_retriever(store, version, retriever)
        mem = _memory(store, version, model, adapter, device, json_out, tokenizer, devices, centre_queries, reader, keep_case)
        live = stream and not json_out and sys.stdout.isatty()
        ans = mem.ask(question, mode=mode, k=k, max_new_tokens=max_new_tokens, temperature=temperature,  # type: ignore[arg-type]
                      max_rounds=rounds, on_token=(lambda s: typer.echo(s, nl=False)) if live else None,
                      retriever=retriever)  # type: ignore[arg-type]
        if json_out:
            emit_json({**ans.to_dict(), "retriever": retriever})
            return
        typer.echo("" if live else ans.answer)
        typer.echo(f"sources ({ans.mode}{', hybrid' if retriever == 'hybrid' else ''}, {len(ans.rounds)} round(s)):")
        for d in ans.docs:
            typer.echo(f"  [{d.doc_id}] {d.source_path}#{d.passage_index}  score {d.score:.4g}")
        typer.echo("time    : " + ", ".join(f"{key.removesuffix('_s')} {v * 1000:.0f} ms" for key, v in ans.timings.items()))

    guard(json_out, body)


@app.command("search", epilog="\b\nExamples:\n  msa search mem.msa \"budget approval\" -k 5\n  msa search mem.msa \"budget approval\" --json\n"
             "  msa search mem.msa \"budget approval\" --retriever hybrid")
def search(
    store: StoreArg,
    question: Annotated[str, typer.Argument(help="What to look for, e.g. 'budget approval'", show_default=False)],
    k: Annotated[int, typer.Option("--k", "-k", help="Documents to list, e.g. 5", min=1)] = 10,
    model: ModelOpt = "default",
    adapter: AdapterOpt = None,
    tokenizer: TokenizerOpt = None,
    device: DeviceOpt = "auto",
    devices: DevicesOpt = None,
    retriever: RetrieverOpt = "routing",
    centre_queries: CentreOpt = False,
    keep_case: KeepCaseOpt = False,
    version: VersionOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """List the documents the router picks for a question (no generation)."""

    def body() -> None:
        _check_retriever(store, version, retriever)
        mem = _memory(store, version, model, adapter, device, json_out, tokenizer, devices, centre_queries, keep_case=keep_case)
        rows = mem.search(question, k=k, retriever=retriever).to_pylist()  # type: ignore[arg-type]
        if json_out:
            emit_json({"question": question, "retriever": retriever, "centre_queries": centre_queries, "results": rows})
            return
        for r in rows:
            text = " ".join(str(r["text"]).split())
            typer.echo(f"{r['rank']:>3}. [{r['doc_id']}] {r['score']:.4g}  {r['source_path']}#{r['passage_index']}  "
                       f"{text[:90]}{'…' if len(text) > 90 else ''}")

    guard(json_out, body)
