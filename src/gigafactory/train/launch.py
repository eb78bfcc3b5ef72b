"""`gigafactory launch --nproc N <subcommand> ...`: run a gigafactory command on N local ranks with torchrun."""

from __future__ import annotations

import os
import subprocess
import sys

import typer

from gigafactory.errors import UserError


def launch(
    ctx: typer.Context,
    nproc: int = typer.Option(..., "--nproc", min=1, help="processes (ranks) on this machine"),
    port: int = typer.Option(0, help="rendezvous port (0 = pick a free one)"),
    max_restarts: int = typer.Option(0, min=0, help="restarts of failed ranks (the trainer resumes by itself)"),
) -> None:
    """Start N local ranks with torchrun, e.g. `gigafactory launch --nproc 4 train --layout dp_shard=2,tp=2`."""
    args = list(ctx.args)
    if not args:
        raise UserError("launch needs a command to run, e.g. `gigafactory launch --nproc 2 train --layout dp_shard=2`")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}"]
    cmd += ["--standalone"] if port == 0 else ["--master-addr=127.0.0.1", f"--master-port={port}"]
    cmd += ["-m", "gigafactory", *args]
    # CPU ranks share the cores: one thread each avoids oversubscription (torchrun would warn and do the same).
    # TORCH_DISABLE_SHARE_RDZV_TCP_STORE: with the rendezvous store shared, ranks restarted by --max-restarts can
    # be handed their dead peers' addresses and fail to reconnect (pytorch/pytorch#135712).
    env = {"OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", **os.environ}
    raise typer.Exit(subprocess.call(cmd, env=env))


def register(app: typer.Typer) -> None:
    app.command("launch", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(launch)
