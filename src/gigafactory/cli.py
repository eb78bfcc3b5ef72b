"""The one `gigafactory` command. Thin: each package registers its own subcommands from its `commands` module,
and heavy imports (torch) happen inside the commands, so `gigafactory plan` stays instant."""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from gigafactory.errors import UserError

app = typer.Typer(
    name="gigafactory",
    help="Plan, train, survive and serve Grok-style mixture-of-experts models on 1 to 100,000+ GPUs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err_console = Console(stderr=True)


def _register() -> None:
    import importlib

    # Each package's `commands` module adds its subcommands; one line per package here.
    for module in (
        "gigafactory.specs.commands",
        "gigafactory.train.commands",
        "gigafactory.sim.commands",
        "gigafactory.plan.commands",
        "gigafactory.train.launch",
        "gigafactory.serve.commands",
    ):
        importlib.import_module(module).register(app)


_register()


@app.callback()
def _root() -> None:
    """Plan, train, survive and serve Grok-style mixture-of-experts models on 1 to 100,000+ GPUs."""


def main() -> None:
    try:
        app()  # click's standalone mode handles usage errors (exit 2) and Ctrl-C
    except UserError as err:
        err_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        sys.exit(2)
