"""``msa train-reader``: train a reader adapter (question-side LoRA) that answers from pooled memory.

Arguments and printing only; the work is done by :mod:`msa_memory.train.reader`.
"""

from __future__ import annotations

import shlex
import sys
from typing import Annotated

import typer

from msa_memory.cli.common import JsonOpt, app, emit_json, guard


@app.command("train-reader", epilog="\b\nExamples:\n  msa train-reader --data reader-data/ --out reader/            # built-in recipe, CPU\n"
             "  msa train-reader --data reader-data/ --out reader/ --resume   # go on from reader/checkpoint.pt")
def train_reader_cmd(
    data: Annotated[str, typer.Option("--data", help="Folder of the training corpus, questions and store (made when missing), e.g. reader-data/")],
    out: Annotated[str, typer.Option("--out", "-o", help="Folder for the reader adapter (reader_adapter.json/.safetensors) and its checkpoint")],
    passages: Annotated[int, typer.Option("--passages", help="Training passages (one planted fact each) when --data is made", min=10)] = 1500,
    steps: Annotated[int, typer.Option("--steps", help="Optimizer steps in all (a resumed run counts the steps done)", min=1)] = 800,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Questions per step", min=1)] = 4,
    rank: Annotated[int, typer.Option("--rank", help="LoRA rank", min=1)] = 16,
    alpha: Annotated[float, typer.Option("--alpha", help="LoRA alpha (the update is scaled by alpha/rank)")] = 32.0,
    lr: Annotated[float, typer.Option("--lr", help="AdamW peak learning rate (linear warm-up, cosine decay)")] = 1e-3,
    k: Annotated[int, typer.Option("--k", help="Documents per router layer, as msa ask -k", min=1)] = 4,
    layers: Annotated[str, typer.Option("--layers", help="Decoder layers the reader adapts: all or e.g. 0,1,2")] = "all",
    targets: Annotated[str, typer.Option("--targets", help="Linears the reader adapts: all or a comma list of q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")] = "all",
    seed: Annotated[int, typer.Option("--seed", help="Data and training seed")] = 0,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda or cuda:N")] = "cpu",
    eval_every: Annotated[int, typer.Option("--eval-every", help="Steps between dev evaluations (and checkpoints)", min=1)] = 200,
    n_dev: Annotated[int, typer.Option("--n-dev", help="Held-out dev questions evaluated", min=1)] = 40,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from --out's checkpoint.pt")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Train a reader adapter: a LoRA on the question side that answers from the routed documents' pooled K̄V̄."""

    def body() -> None:
        from msa_memory.train.reader import run_reader_training

        summary = run_reader_training(
            data=data, out=out, passages=passages, steps=steps, batch_size=batch_size, rank=rank, alpha=alpha, lr=lr,
            k=k, layers=layers, targets=targets, seed=seed, device=device, eval_every=eval_every, n_dev=n_dev,
            resume=resume, command="msa " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
            log=(lambda s: None) if json_out else (lambda s: typer.echo(s, err=True)))
        if json_out:
            emit_json(summary)
            return
        d, b = summary["dev"], summary["dev_without_reader"] or {}
        typer.echo(f"saved reader adapter to {summary['out']} ({summary['params']:,} parameters): dev exact match "
                   f"{d.get('em', float('nan')):.3f} (without the reader {b.get('em', float('nan')):.3f})")

    guard(json_out, body)
