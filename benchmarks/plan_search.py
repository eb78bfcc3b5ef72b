"""Time the full layout search for grok-2 on 100,000 H100s (the planner's 1-second budget)."""

from __future__ import annotations

import time

from gigafactory.plan.costmodel import Cluster
from gigafactory.plan.search import search
from gigafactory.specs.hardware import get_gpu
from gigafactory.specs.model_spec import PRESETS


def main() -> None:
    for n in (20_000, 100_000):
        cluster = Cluster.of(get_gpu("h100-sxm"), n, "spectrum-x")
        t0 = time.perf_counter()
        res = search(PRESETS["grok-2"], cluster, 64 * 2**20, 8192)
        wall = time.perf_counter() - t0
        print(f"{n:>7,} GPUs: {res.evaluated:,} layouts evaluated ({res.fitting:,} fit) in {wall:.3f} s "
              f"= {res.evaluated / wall:,.0f} layouts/s; best {res.best.layout.short()} MFU {res.best.mfu:.1%}")


if __name__ == "__main__":
    main()
