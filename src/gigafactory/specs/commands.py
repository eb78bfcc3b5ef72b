"""`gigafactory spec`: a model's hyperparameters, parameter counts and FLOPs per token."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table

from gigafactory.specs.model_spec import load_spec


def spec(
    name: str = typer.Argument("grok-1", help="preset (grok-1, grok-2, tiny, small) or a .toml/.json spec file"),
    seq_len: int | None = typer.Option(None, help="sequence length for the attention FLOPs (default: context)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Show a model spec with its parameter counts and training FLOPs per token."""
    s = load_spec(name)
    info = s.summary(seq_len)
    if as_json:
        print(json.dumps(info, indent=2))
        return
    table = Table(title=f"model spec: {s.name}")
    table.add_column("field")
    table.add_column("value", justify="right")
    for key, value in info["spec"].items():
        table.add_row(key, str(value))
    table.add_section()
    table.add_row("params_total", f"{s.params_total:,} ({s.params_total / 1e9:.2f} B)")
    table.add_row("params_active", f"{s.params_active:,} ({s.params_active / 1e9:.2f} B)")
    table.add_row(f"flops_per_token (seq {info['seq_len']})", f"{info['flops_per_token']:.4g}")
    Console().print(table)


def register(app: typer.Typer) -> None:
    app.command("spec")(spec)
