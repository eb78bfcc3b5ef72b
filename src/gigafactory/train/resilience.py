"""Surviving failures: asynchronous checkpoints, non-finite and spike guards, a hang watchdog, straggler
reports, Young/Daly checkpoint cadence, and a fault-injection hook for tests.

Recovery itself is torchrun's elastic agent (`--max-restarts`): when a rank dies or the watchdog ends a hung
one, the agent restarts every rank with TORCHELASTIC_RESTART_COUNT > 0, and the trainer then resumes from the
newest verified checkpoint (`restarted()`), with the data position and RNG states of that step.
"""

from __future__ import annotations

import math
import os
import signal
import statistics
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.utils._python_dispatch import TorchDispatchMode

from gigafactory import checkpoint as ckpt
from gigafactory.checkpoint import CheckpointException
from gigafactory.errors import UserError


def restarted() -> bool:
    """True in a process that torchrun's elastic agent (or `gigafactory launch`) started again after a failure or
    a change of hosts."""
    return (int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
            or int(os.environ.get("GIGAFACTORY_RESTARTS", "0")) > 0)


class Checkpointer:
    """Saves through DCP; in async mode the step loop only waits for the state to be copied to host memory,
    the files are written by a background thread, which then hashes the files this rank wrote, and the
    checkpoint is committed (digests gathered, manifest + rename) at the first step boundary after every rank's
    writes and hashes are done (`poll`). DCP's own collectives and the done-flags use dedicated gloo groups, so
    they never queue behind training collectives. Before each save the free space is checked against the size
    of the last checkpoint (or of the state, for the first), so a full disk is a one-line error, not a crash
    inside a writer thread."""

    def __init__(self, run_dir: Path, keep_last: int, asynchronous: bool) -> None:
        self.run_dir, self.keep_last, self.asynchronous = run_dir, keep_last, asynchronous
        self._pending: tuple[Future[Any], int, dict[str, Any]] | None = None
        self._group = dist.new_group(backend="gloo") if asynchronous and dist.is_initialized() else None
        self._flags = dist.new_group(backend="gloo") if asynchronous and dist.is_initialized() else None
        self._hasher = ThreadPoolExecutor(1, thread_name_prefix="gigafactory-ckpt-hash") if asynchronous else None
        self.last_blocking_s = 0.0  # what the step loop paid for the last save: the "C" of Young/Daly

    def _check_space(self, state: dict[str, Any]) -> None:
        need = ckpt.last_checkpoint_bytes(self.run_dir)
        if need == 0:
            world = dist.get_world_size() if dist.is_initialized() else 1
            need = ckpt.state_bytes(state) * world
        problem = None
        try:
            ckpt.check_free_space(self.run_dir, need)
        except UserError as err:
            problem = str(err)
        # Every rank stops, or none does (a rank alone in a collective save would hang its peers).
        problems = [p for p in ckpt.all_gather_objects(problem, self._group) if p]
        if problems:
            raise UserError(problems[0])

    def save(self, step: int, state: dict[str, Any], meta: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        self.wait()
        self._check_space(state)
        if not self.asynchronous:
            ckpt.save(self.run_dir, step, state, meta, self.keep_last)
        else:
            assert self._hasher is not None
            tmp = ckpt.begin(self.run_dir, step)
            written = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self._group)
            rank = dist.get_rank() if dist.is_initialized() else 0
            future = self._hasher.submit(_write_then_hash, written, tmp, rank)
            self._pending = (future, step, meta)
        self.last_blocking_s = time.perf_counter() - t0

    def poll(self) -> None:
        """Commit the save in flight if every rank has finished writing and hashing (cheap; once per step)."""
        if self._pending is None:
            return
        done = self._pending[0].done()
        if self._flags is not None:
            flag = torch.tensor([int(done)])
            dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self._flags)
            done = bool(flag.item())
        if done:
            self.wait()

    def wait(self) -> None:
        """Finish and commit the save in flight, if any."""
        if self._pending is None:
            return
        future, step, meta = self._pending
        self._pending = None
        try:
            digests = future.result()
        except (Exception, CheckpointException) as err:
            if ckpt.is_disk_full(err):
                raise ckpt.disk_full_error(ckpt.ckpt_root(self.run_dir)) from None
            raise
        ckpt.commit(self.run_dir, step, meta, self.keep_last, digests=digests, group=self._group)


def _write_then_hash(written: Future[Any], tmp: Path, rank: int) -> dict[str, Any]:
    """Background: wait for this rank's DCP writes, then hash the files it wrote (off the step's critical path)."""
    written.result()
    return ckpt.digest_own_files(tmp, rank)


class StepGuard:
    """Decides whether an optimizer step may be applied: a non-finite gradient norm (global, so every rank
    agrees) skips the update; `max_bad` of them in a row ask for a rollback to the last checkpoint."""

    def __init__(self, max_bad: int) -> None:
        self.max_bad = max_bad
        self.bad_in_a_row = 0
        self.skipped = 0

    def allows(self, grad_norm: float) -> bool:
        if math.isfinite(grad_norm):
            self.bad_in_a_row = 0
            return True
        self.bad_in_a_row += 1
        self.skipped += 1
        return False

    @property
    def wants_rollback(self) -> bool:
        return self.max_bad > 0 and self.bad_in_a_row >= self.max_bad


class SpikeDetector:
    """Flags a loss far above its recent history (mean + `sigmas`·std over a window and 20% above the mean),
    the early sign of divergence that large runs watch for."""

    def __init__(self, window: int = 50, sigmas: float = 4.0, warmup: int = 10) -> None:
        self.history: deque[float] = deque(maxlen=window)
        self.sigmas, self.warmup = sigmas, warmup

    def is_spike(self, loss: float) -> bool:
        spike = False
        if len(self.history) >= self.warmup and math.isfinite(loss):
            mean = statistics.fmean(self.history)
            std = statistics.pstdev(self.history)
            spike = loss > mean + self.sigmas * std and loss > 1.2 * mean
        if math.isfinite(loss) and not spike:
            self.history.append(loss)
        return spike


class Watchdog:
    """Ends this process if no step finishes within `timeout_s`: a rank stuck in a collective (a peer died or
    hangs) exits, so the elastic agent can restart the group instead of the job hanging until a human looks."""

    def __init__(self, timeout_s: float, exit_code: int = 70) -> None:
        self.timeout_s, self.exit_code = timeout_s, exit_code
        self._beat = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gigafactory-watchdog", daemon=True)
        self._thread.start()

    def beat(self) -> None:
        self._beat = time.monotonic()

    def _run(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout_s / 4)):
            idle = time.monotonic() - self._beat
            if idle > self.timeout_s:
                print(f"watchdog: no step finished for {idle:.0f} s (limit {self.timeout_s:.0f} s); ending this rank "
                      "so the elastic agent restarts the job", file=sys.stderr, flush=True)
                os._exit(self.exit_code)

    def stop(self) -> None:
        self._stop.set()


class CollectiveClock(TorchDispatchMode):
    """Notes when this rank enters each collective of a step (wall clock) and over which ranks. A rank that is
    slow arrives last; the others wait for it inside the collective, so step times are all alike and only the
    arrival times tell who held the job up (see `straggler_report`)."""

    def __init__(self) -> None:
        super().__init__()
        self.entries: list[tuple[tuple[int, ...], float]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        from gigafactory.parallel.comm import _OPS  # the collectives the byte counter knows: one list

        if func in _OPS:
            ranks = _group_ranks(args)
            if len(ranks) > 1:
                self.entries.append((ranks, time.time()))
        return func(*args, **(kwargs or {}))

    def take(self) -> list[tuple[tuple[int, ...], float]]:
        out, self.entries = self.entries, []
        return out


def _group_ranks(args: tuple[Any, ...]) -> tuple[int, ...]:
    """Global ranks of the process group a c10d op runs on. At the dispatcher the group arrives boxed as a
    `torch.ScriptObject` (`c10d.ProcessGroup`), not as a `dist.ProcessGroup`."""
    for a in args:
        group = a
        if isinstance(a, torch.ScriptObject):
            if not str(a._type().qualified_name()).endswith("c10d.ProcessGroup"):
                continue
            group = dist.ProcessGroup.unbox(a)
        if isinstance(group, dist.ProcessGroup):
            try:
                return tuple(dist.get_process_group_ranks(group))
            except (ValueError, RuntimeError):  # a group this process cannot name: leave it out
                return ()
    return ()


def collective_waits(entries_by_rank: list[list[tuple[tuple[int, ...], float]]]) -> list[float]:
    """Seconds each rank spent waiting for the last arrival, summed over its collectives. The k-th collective a
    rank enters on a group is the k-th of every member (they issue the same sequence on each group)."""
    waits = [0.0] * len(entries_by_rank)
    per_group: dict[tuple[int, ...], dict[int, list[float]]] = {}
    for rank, entries in enumerate(entries_by_rank):
        for ranks, t in entries:
            per_group.setdefault(tuple(ranks), {}).setdefault(rank, []).append(t)
    for ranks, times in per_group.items():
        members = [r for r in ranks if r in times]
        n = min(len(times[r]) for r in members)
        for k in range(n):
            last = max(times[r][k] for r in members)
            for r in members:
                waits[r] += last - times[r][k]
    return waits


def straggler_report(step_s: float, clock: CollectiveClock, group: Any = None) -> dict[str, Any]:
    """Every rank's step time split into compute and collective waits, and the ranks whose compute took more than
    1.5x the median: the stragglers. Collective over all ranks (a small object gather per step)."""
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, (step_s, clock.take()), group=group)
    waits = collective_waits([e for _, e in gathered])
    compute = [max(t - w, 0.0) for (t, _), w in zip(gathered, waits, strict=True)]
    out: dict[str, Any] = {"step_time_max_s": max(t for t, _ in gathered),
                           "compute_time_s": [round(c, 4) for c in compute],
                           "collective_wait_s": [round(w, 4) for w in waits]}
    if slow := stragglers(compute):
        out["stragglers"] = slow
    return out


def stragglers(step_times: list[float], ratio: float = 1.5) -> list[int]:
    """Ranks whose time (compute, not waits) took more than `ratio` × the median of all ranks."""
    if len(step_times) < 2:
        return []
    median = statistics.median(step_times)
    return [r for r, t in enumerate(step_times) if median > 0 and t > ratio * median]


def young_daly_steps(checkpoint_cost_s: float, mtbf_s: float, step_time_s: float, max_steps: int) -> int:
    """Checkpoint interval in steps: the simulator's Young/Daly interval, within [1, max_steps]."""
    from gigafactory.sim.montecarlo import young_daly_s

    interval_s = young_daly_s(max(checkpoint_cost_s, 1e-6), mtbf_s)
    return int(min(max_steps, max(1, round(interval_s / max(step_time_s, 1e-9)))))


class FaultInjector:
    """Test hook, off unless GIGAFACTORY_FAULT is set: `kill:rank=R:step=S` (SIGKILL this rank before step S,
    first attempt only), `nan:step=S` (a non-finite loss at step S: a bad batch, so once; a rollback skips it),
    `hang:rank=R:step=S` (stop responding), `slow:rank=R:step=S:ms=M` (a straggler: M ms of extra work inside
    the step). Without `rank` a fault applies to every rank, without `step` to every step."""

    def __init__(self, spec: str | None = None) -> None:
        self.faults: list[tuple[str, dict[str, int]]] = []
        self.fired: set[tuple[str, int]] = set()
        for item in (spec if spec is not None else os.environ.get("GIGAFACTORY_FAULT", "")).split(","):
            if not item.strip():
                continue
            kind, *args = item.strip().split(":")
            self.faults.append((kind, {k: int(v) for k, v in (a.split("=") for a in args)}))

    def _match(self, kind: str, step: int) -> bool:
        rank = dist.get_rank() if dist.is_initialized() else 0
        return any(
            k == kind and a.get("step", step) == step and a.get("rank", rank) == rank for k, a in self.faults
        )

    def _slow_ms(self, step: int) -> int:
        rank = dist.get_rank() if dist.is_initialized() else 0
        return sum(a.get("ms", 0) for k, a in self.faults
                   if k == "slow" and a.get("step", step) == step and a.get("rank", rank) == rank)

    def before_step(self, step: int) -> None:
        if not restarted() and self._match("kill", step):
            os.kill(os.getpid(), signal.SIGKILL)
        if not restarted() and self._match("hang", step):
            while True:
                time.sleep(3600)

    def poison(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        """Called inside the step, between the forward and the backward (so a `slow` fault is compute, between
        two collectives, as a real straggler's would be)."""
        if self.faults and (ms := self._slow_ms(step)):
            time.sleep(ms / 1000)
        if ("nan", step) in self.fired or not self._match("nan", step):
            return loss
        self.fired.add(("nan", step))
        return loss * float("nan")
