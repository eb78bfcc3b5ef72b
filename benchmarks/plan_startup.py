"""Where plain `gigafactory plan` spends its time, in one run on this machine (shared, noisy: read the ratios).

1. The layout search, the old loop against the current one: the old loop built every (micro-batch, recompute)
   copy of every layout with pydantic before testing the batch cap, which depends only on dp, the micro-batch and
   the schedule; the current `search` tests the cap first. Both rank the same layouts (checked here).
2. The whole process, `gigafactory plan` as the user runs it: wall and CPU time (user + sys of the child) over a
   few runs, and what the serving commands' router cost every start-up while they imported it eagerly (fastapi
   and httpx on top of plan's own imports, each timed in a fresh interpreter).
"""

from __future__ import annotations

import math
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from gigafactory.plan.costmodel import MODERN, Cluster, estimate
from gigafactory.plan.search import enumerate_layouts, search
from gigafactory.specs.hardware import get_gpu
from gigafactory.specs.layout import MULTI_STAGE_SCHEDULES
from gigafactory.specs.model_spec import PRESETS

BATCH, SEQ, GPUS = 64 * 2**20, 8192, 100_000
EXE = str(Path(sys.executable).with_name("gigafactory"))


def old_search_loop(cluster: Cluster) -> list[tuple[str, float]]:
    """The search loop before the batch cap moved ahead of the layout copies (same ranking rule)."""
    spec = PRESETS["grok-2"]
    target = max(1, round(BATCH / SEQ))
    ranked, fits_plain = [], set()
    for lay in enumerate_layouts(spec, cluster, SEQ, MODERN):
        unit = lay.dp * lay.micro_batch * (lay.pp if lay.pp_schedule in MULTI_STAGE_SCHEDULES else 1)
        gbs = math.ceil(target / unit) * unit
        if gbs > 2.0 * target:
            continue
        key = (lay.dp_replicate, lay.dp_shard, lay.tp, lay.pp, lay.ep, lay.cp, lay.micro_batch, lay.pp_schedule,
               lay.pp_virtual)
        if lay.recompute != "none" and key in fits_plain:
            continue
        cost = estimate(spec, lay, cluster, gbs, SEQ, MODERN, with_bytes=False)
        if cost.fits:
            ranked.append(cost)
            if lay.recompute == "none":
                fits_plain.add(key)
    ranked.sort(key=lambda c: c.step_time_s / (c.global_batch_seqs * c.seq_len))
    return [(c.layout.short(), c.step_time_s) for c in ranked]


def _best_of(fn, runs: int = 3) -> tuple[float, object]:  # noqa: ANN001
    best, out = math.inf, None
    for _ in range(runs):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _process(args: list[str]) -> tuple[float, float]:
    cpu0, t0 = _child_cpu(), time.perf_counter()
    subprocess.run(args, check=True, capture_output=True)
    return time.perf_counter() - t0, _child_cpu() - cpu0


def main() -> None:
    cluster = Cluster.of(get_gpu("h100-sxm"), GPUS, "spectrum-x")
    old_t, old = _best_of(lambda: old_search_loop(cluster))
    new_t, res = _best_of(lambda: search(PRESETS["grok-2"], cluster, BATCH, SEQ, MODERN))
    new = [(c.layout.short(), c.step_time_s) for c in res.ranked]  # type: ignore[union-attr]
    assert old == new, "the two loops must rank the same layouts"
    print(f"search, grok-2 on {GPUS:,} H100s ({len(new):,} layouts fit): old loop {old_t:.3f} s, current "
          f"{new_t:.3f} s (best of 3): {old_t / new_t:.2f}x faster")

    runs = [_process([EXE, "plan"]) for _ in range(3)]
    walls, cpus = [w for w, _ in runs], [c for _, c in runs]
    print(f"`gigafactory plan`, whole process: wall {min(walls):.2f}-{max(walls):.2f} s (median "
          f"{statistics.median(walls):.2f}), CPU user+sys {min(cpus):.2f}-{max(cpus):.2f} s")
    base = "import gigafactory.plan.commands, gigafactory.sim.api"
    plain = statistics.median(_process([sys.executable, "-c", base])[0] for _ in range(3))
    router = statistics.median(_process([sys.executable, "-c", base + ", gigafactory.serve.router"])[0]
                               for _ in range(3))
    print(f"what the serving router's eager import (fastapi, httpx) added to plan's start-up: {router - plain:.2f} s "
          f"wall ({plain:.2f} s for plan's own imports, {router:.2f} s with the router)")

if __name__ == "__main__":
    main()
