"""Benchmark: 100,000 GPUs x 90 days x 100 Monte Carlo replicas must take at most 10 s (issue 5).

Run: .venv/bin/python benchmarks/simulate.py [--gpus N --days D --replicas R]
"""

from __future__ import annotations

import argparse
import sys
import time

from gigafactory.sim import make_config, simulate

BUDGET_S = 10.0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--gpus", type=int, default=100_000)
    p.add_argument("--days", type=float, default=90)
    p.add_argument("--replicas", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    cfg = make_config(gpus=a.gpus, days=a.days, replicas=a.replicas, seed=a.seed)
    t0 = time.perf_counter()
    res = simulate(cfg)
    elapsed = time.perf_counter() - t0
    lo, hi = res.goodput_ci95
    events = res.interruptions.sum()
    print(
        f"{a.gpus:,} GPUs x {a.days:g} days x {a.replicas} replicas: {elapsed:.2f} s ({events / elapsed:,.0f} events/s)"
    )
    print(f"  interruptions/day {res.interruptions_per_day:.2f}, goodput {res.goodput_mean:.2%} [{lo:.2%}, {hi:.2%}]")
    print(f"  best interval {res.best_checkpoint_interval_s:.0f} s, Young/Daly {res.young_daly_interval_s:.0f} s")
    if elapsed > BUDGET_S:
        print(f"FAIL: over the {BUDGET_S:g} s budget", file=sys.stderr)
        return 1
    print(f"OK: within the {BUDGET_S:g} s budget")
    return 0


if __name__ == "__main__":
    sys.exit(main())
