"""`gigafactory import grok-1|hf ...` and `gigafactory export RUN --format hf`."""

from __future__ import annotations

from pathlib import Path

import typer

import_app = typer.Typer(help="Bring weights from another format into a run directory.", no_args_is_help=True)


@import_app.command("grok-1")
def import_grok1(
    ckpt_dir: Path = typer.Argument(..., help="the release's ckpt-0 folder (or the folder holding it)"),
    run_dir: Path = typer.Option(..., help="the run directory to create"),
    model: str = typer.Option("grok-1", help="the spec the checkpoint was written for (preset or .toml/.json)"),
) -> None:
    """Import the released Grok-1 checkpoint (pickled tensors, 8-bit weights); rerun to resume."""
    from gigafactory.interop.runs import import_grok1 as run
    from gigafactory.specs import load_spec

    run(ckpt_dir, run_dir, load_spec(model))


@import_app.command("hf")
def import_hf(
    folder: Path = typer.Argument(..., help="a Hugging Face folder: config.json, *.safetensors, tokenizer"),
    run_dir: Path = typer.Option(..., help="the run directory to create"),
    tokenizer: str | None = typer.Option(None, help="grok-1: use the packaged Grok-1 tokenizer (default: the "
                                         "folder's tokenizer.model or tokenizer.json)"),
) -> None:
    """Import a Grok-1/Grok-2 style Hugging Face checkpoint."""
    from gigafactory.errors import UserError
    from gigafactory.interop.hf import load_hf
    from gigafactory.interop.runs import refuse_existing, write_run
    from gigafactory.tokenizer import GROK1

    if tokenizer not in (None, GROK1):
        raise UserError(f"unknown --tokenizer {tokenizer!r}; give grok-1, or leave it out to use the folder's")
    refuse_existing(run_dir)
    model, spec = load_hf(folder)
    path = write_run(run_dir, model, tokenizer or folder, {"format": "hf", "source": str(folder)})
    print(f"imported {spec.name} ({spec.params_total:,} parameters) into {path}")


def export(
    run_dir: Path = typer.Argument(..., help="a run directory"),
    format: str = typer.Option("hf", "--format", help="hf (sharded safetensors + config.json + tokenizer)"),
    out: Path = typer.Option(..., help="output folder"),
    shard_mb: float = typer.Option(2000.0, min=0.001, help="maximum size of one safetensors shard"),
) -> None:
    """Export a run's newest checkpoint for other tools."""
    from gigafactory.errors import UserError
    from gigafactory.interop.hf import export as run

    if format != "hf":
        raise UserError(f"unknown --format {format!r}; the supported format is hf")
    paths = run(run_dir, out, shard_mb)
    print(f"wrote {len(paths)} shard(s), config.json and the tokenizer to {out}")


def register(app: typer.Typer) -> None:
    app.add_typer(import_app, name="import")
    app.command("export")(export)
