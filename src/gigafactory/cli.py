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
        "gigafactory.interop.commands",
        "gigafactory.data.commands",
    ):
        importlib.import_module(module).register(app)


_register()


@app.callback()
def _root() -> None:
    """Plan, train, survive and serve Grok-style mixture-of-experts models on 1 to 100,000+ GPUs."""


def _click_error(name: str) -> type[Exception]:
    """typer vendors click; find its exception classes through the public BadParameter."""
    return next(c for c in typer.BadParameter.__mro__ if c.__name__ == name)


def main() -> None:
    usage_error, click_exception = _click_error("UsageError"), _click_error("ClickException")
    try:
        # not click's standalone mode: its usage errors come as boxed panels; ours are one `error:` line
        rv = app(standalone_mode=False)
    except UserError as err:
        err_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except usage_error as err:
        ctx = getattr(err, "ctx", None)
        cmd = ctx.command_path if ctx else "gigafactory"
        if not err.format_message():  # no arguments: the help was printed
            sys.exit(2)
        err_console.print(f"[bold red]error:[/] {err.format_message()} (see {cmd} --help)", highlight=False,
                          soft_wrap=True)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        err_console.print("aborted")
        sys.exit(130)
    except click_exception as err:
        err_console.print(f"[bold red]error:[/] {err.format_message()}", highlight=False, soft_wrap=True)
        sys.exit(getattr(err, "exit_code", 1))
    if isinstance(rv, int) and rv:
        sys.exit(rv)
