"""`gigafactory launch`: run a gigafactory command on this host's ranks with torchrun, alone or as one host of
many, and keep it running through failures.

    gigafactory launch --nproc 4 train ...                                   # one host, 4 ranks
    gigafactory launch --nproc 8 --nnodes 1:4 --rdzv-endpoint head:29400 \\
        --max-restarts 3 --restart-window 1h train --auto-resume ...          # this host of up to 4

Several hosts: run the same command on each; torchrun's c10d rendezvous (hosted at `--rdzv-endpoint`, on the host
whose address that is) forms the job from whichever hosts join, between the two bounds of `--nnodes MIN:MAX`.

Restarts: torchrun's own `--max-restarts` counts over the job's whole life, so at large-cluster failure rates any
budget runs out within hours. Here torchrun runs with no restarts of its own; when it fails, this launcher starts
it again, at most `--max-restarts` times within any `--restart-window`, and the trainer resumes from the newest
checkpoint (`GIGAFACTORY_RESTARTS` > 0). A new rendezvous after a failure forms the job from the hosts that are
still there (a lost host: a smaller world, the checkpoint resharded to it, the same global batch); a host that
joins while the job runs makes torchrun restart the workers into the larger world.

Orphans: the launcher's torchrun and torchrun's workers get a parent-death signal (Linux `prctl`), so killing the
agent (or this launcher) also ends the workers instead of leaving them writing into the run directory.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable

import typer

from gigafactory.errors import UserError

_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """'90', '90s', '30m', '1h', '2d' -> seconds; 0 means no window (a budget over the job's whole life)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if m is None:
        raise UserError(f"--restart-window {text!r} is not a duration; write e.g. 90s, 30m, 1h or 2d")
    return float(m.group(1)) * _UNITS[m.group(2)]


class RestartBudget:
    """At most `max_restarts` restarts within any `window_s` seconds (0 = over the whole life)."""

    def __init__(self, max_restarts: int, window_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_restarts, self.window_s, self.clock = max_restarts, window_s, clock
        self.recent: deque[float] = deque()

    def allow(self) -> bool:
        now = self.clock()
        while self.window_s > 0 and self.recent and self.recent[0] <= now - self.window_s:
            self.recent.popleft()
        if len(self.recent) >= self.max_restarts:
            return False
        self.recent.append(now)
        return True


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask Linux to send `sig` to this process when its parent dies (prctl PR_SET_PDEATHSIG). False elsewhere."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(1, int(sig), 0, 0, 0) == 0  # 1 = PR_SET_PDEATHSIG


def die_with_parent() -> None:
    """In a worker that torchrun started: die when the agent dies (a SIGKILLed agent cannot stop its workers). If
    the agent is already gone (re-parented to init before the prctl took effect), exit now."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    set_parent_death_signal()
    if os.getppid() == 1:
        os._exit(75)


def _torchrun_child() -> None:
    """preexec_fn of the torchrun process: it dies with this launcher."""
    set_parent_death_signal()


def torchrun_command(nproc: int, nnodes: str, rdzv_endpoint: str | None, rdzv_id: str, port: int,
                     join_wait_s: int, args: list[str], local_addr: str | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--max-restarts=0"]
    if rdzv_endpoint:
        conf = f"last_call_timeout={join_wait_s}"
        if local_addr:  # this host's address: it hosts the rendezvous exactly when the endpoint is that address
            conf += f",is_host={str(rdzv_endpoint.rsplit(':', 1)[0] == local_addr).lower()}"
            cmd += [f"--local-addr={local_addr}"]
        cmd += [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}",
                f"--rdzv-id={rdzv_id}", f"--rdzv-conf={conf}"]
    elif nnodes not in ("1", "1:1"):
        raise UserError(f"--nnodes {nnodes} needs --rdzv-endpoint HOST:PORT (the host that hosts the rendezvous)")
    elif port == 0:
        cmd += ["--standalone"]
    else:
        cmd += ["--master-addr=127.0.0.1", f"--master-port={port}"]
    return [*cmd, "-m", "gigafactory", *args]


def launch(
    ctx: typer.Context,
    nproc: int = typer.Option(..., "--nproc", min=1, help="processes (ranks) on this host"),
    nnodes: str = typer.Option("1", "--nnodes", help="hosts in the job: N, or MIN:MAX to run on whichever join"),
    rdzv_endpoint: str | None = typer.Option(None, "--rdzv-endpoint", help="HOST:PORT of the rendezvous (multi-host)"),
    rdzv_id: str = typer.Option("gigafactory", "--rdzv-id", help="job id shared by all hosts"),
    join_wait: int = typer.Option(30, "--join-wait", min=0, help="seconds a rendezvous waits for more than MIN hosts"),
    local_addr: str | None = typer.Option(
        None, "--local-addr", help="this host's address on the job's network (hosts with several, or one name)"
    ),
    port: int = typer.Option(0, help="single host: rendezvous port (0 = pick a free one)"),
    max_restarts: int = typer.Option(0, min=0, help="restarts allowed within --restart-window (the trainer resumes)"),
    restart_window: str = typer.Option("1h", "--restart-window", help="e.g. 30m, 1h, 1d; 0 = over the whole job"),
) -> None:
    """Start this host's ranks with torchrun, e.g. `gigafactory launch --nproc 4 train --layout dp_shard=2,tp=2`."""
    args = list(ctx.args)
    if not args:
        raise UserError("launch needs a command to run, e.g. `gigafactory launch --nproc 2 train --layout dp_shard=2`")
    window = parse_duration(restart_window)
    cmd = torchrun_command(nproc, nnodes, rdzv_endpoint, rdzv_id, port, join_wait, args, local_addr)
    budget = RestartBudget(max_restarts, window)
    # CPU ranks share the cores: one thread each avoids oversubscription (torchrun would warn and do the same).
    # TORCH_DISABLE_SHARE_RDZV_TCP_STORE: with the rendezvous store shared, ranks restarted in place can be handed
    # their dead peers' addresses and fail to reconnect (pytorch/pytorch#135712).
    env = {"OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", **os.environ}
    restarts = 0
    while True:
        env["GIGAFACTORY_RESTARTS"] = str(restarts)
        code = subprocess.call(cmd, env=env, preexec_fn=_torchrun_child)  # noqa: PLW1509 - prctl needs it
        if code == 0:
            raise typer.Exit(0)
        if not budget.allow():
            where = f"within {restart_window}" if window > 0 else "over the job's life"
            raise UserError(f"the job failed (exit code {code}) and has used its {max_restarts} restarts {where}; "
                            "fix the cause (see the log above), or raise --max-restarts / shorten --restart-window")
        restarts += 1
        print(f"launch: the job failed (exit code {code}); restart {len(budget.recent)} of {max_restarts} within "
              f"{restart_window}: starting again, the trainer resumes from its newest checkpoint",
              file=sys.stderr, flush=True)


def register(app: typer.Typer) -> None:
    app.command("launch", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(launch)
