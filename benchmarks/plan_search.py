"""Time the layout search for grok-2 on 20,000 and 100,000 H100s and the reverse questions (power, budget,
deadline), in one run; printed as layouts/s and as ratios to the 100k search (the machine is shared and noisy)."""

from __future__ import annotations

import time

from gigafactory.plan.campaign import campaign
from gigafactory.plan.costmodel import Cluster
from gigafactory.plan.search import search
from gigafactory.plan.sizing import largest_plannable, max_gpus, smallest_for_deadline
from gigafactory.specs.hardware import get_gpu, get_site
from gigafactory.specs.model_spec import PRESETS

BATCH, SEQ = 64 * 2**20, 8192


def _run(n: int):  # noqa: ANN202
    return search(PRESETS["grok-2"], Cluster.of(get_gpu("h100-sxm"), n, "spectrum-x"), BATCH, SEQ)


def main() -> None:
    walls = {}
    for n in (20_000, 100_000):
        t0 = time.perf_counter()
        res = _run(n)
        wall = walls[n] = time.perf_counter() - t0
        print(f"{n:>7,} GPUs: {res.evaluated:,} layouts evaluated ({res.fitting:,} fit) in {wall:.3f} s "
              f"= {res.evaluated / wall:,.0f} layouts/s; best {res.best.layout.short()} MFU {res.best.mfu:.1%}")
    gpu, site = get_gpu("h100-sxm"), get_site()
    for name, cap in (("--power 100MW", max_gpus(gpu, site, power_w=1e8)),
                      ("--budget 6B", max_gpus(gpu, site, budget_usd=6e9))):
        t0 = time.perf_counter()
        n, res = largest_plannable(cap, _run, lambda n, r: "")
        wall = time.perf_counter() - t0
        print(f"{name}: cap {cap:,} GPUs, planned {n:,} (MFU {res.best.mfu:.1%}) in {wall:.2f} s "
              f"= {wall / walls[100_000]:.1f}× the 100k search")

    def days_of(n: int) -> float | None:
        res = _run(n)
        return campaign(res.best, gpu, n, 15e12, site).days if res.ranked else None

    t0 = time.perf_counter()
    n, days = smallest_for_deadline(90 * 86400, days_of)
    wall = time.perf_counter() - t0
    print(f"--deadline 90d: {n:,} GPUs ({days:.1f} days, goodput included) in {wall:.2f} s "
          f"= {wall / walls[100_000]:.1f}× the 100k search")


if __name__ == "__main__":
    main()
