"""The seeds' questions in reverse: how many GPUs does a site power, a capital budget, a monthly lease budget or a
deadline allow, and how fast do they train? No torch import.

Limits per GPU come from the one hardware catalog (`specs.hardware`): site watts = (GPU TDP + server overhead) ×
PUE; all-in capital = GPU price × system cost factor; lease = price per GPU-hour × 730 hours a month. A count is
"plannable" when the layout search finds a layout that fits; counts are tried in whole scalable units.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass

from gigafactory.errors import UserError
from gigafactory.plan.search import SearchResult
from gigafactory.specs.hardware import GPUSpec, SiteSpec

HOURS_PER_MONTH = 730.0  # 8,760 h / 12
# A DGX SuperPOD scalable unit: 32 nodes × 8 GPUs on one set of leaf switches (specs/hardware.py). Large fleets
# are bought and cabled in these; below 4 units we count whole 8-GPU nodes.
SCALABLE_UNIT = 256
NODE = 8
MAX_GPUS = 1_000_000  # the deadline search stops here
_TRIES = 12  # counts tried below a cap before giving up

_SCALE = {"": 1.0, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}
_POWER = {"w": 1.0, "kw": 1e3, "mw": 1e6, "gw": 1e9}
_TIME = {"s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}


def _number(text: str, what: str, example: str) -> tuple[float, str]:
    m = re.fullmatch(r"\s*\$?\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*", text.lower())
    if not m:
        raise UserError(f"{what} {text!r} is not a number like {example}")
    value = float(m.group(1))
    if value <= 0:
        raise UserError(f"{what} must be positive, e.g. {example}")
    return value, m.group(2)


def parse_power(text: str) -> float:
    """'100MW', '1.2GW', '5e7W' or a bare number of watts -> watts."""
    value, unit = _number(text, "--power", "100MW")
    if unit and unit not in _POWER:
        raise UserError(f"--power {text!r}: unknown unit {unit!r}; use W, kW, MW or GW (e.g. 100MW)")
    return value * _POWER.get(unit, 1.0)


def parse_money(text: str, what: str) -> float:
    """'6B', '$6B', '250M', '1.5e9' -> dollars."""
    value, unit = _number(text, what, "6B")
    if unit not in _SCALE:
        raise UserError(f"{what} {text!r}: unknown suffix {unit!r}; use k, M, B or T (e.g. 6B)")
    return value * _SCALE[unit]


def parse_duration(text: str, what: str = "--deadline") -> float:
    """'90d', '12w', '2000h' -> seconds."""
    value, unit = _number(text, what, "90d")
    if unit not in _TIME:
        raise UserError(f"{what} {text!r}: unknown unit {unit!r}; use s, min, h, d or w (e.g. 90d)")
    return value * _TIME[unit]


def site_watts_per_gpu(gpu: GPUSpec, site: SiteSpec) -> float:
    return (gpu.tdp_w + site.server_overhead_w_per_gpu) * site.pue


def capex_per_gpu(gpu: GPUSpec, site: SiteSpec) -> float:
    return gpu.price_usd * site.system_cost_factor


def lease_per_gpu_month(gpu: GPUSpec) -> float:
    return gpu.lease_usd_per_h * HOURS_PER_MONTH


def max_gpus(gpu: GPUSpec, site: SiteSpec, power_w: float | None = None, budget_usd: float | None = None,
             lease_usd_month: float | None = None) -> int:
    """The largest GPU count each given limit allows (the smallest of them)."""
    caps = []
    if power_w is not None:
        caps.append(math.floor(power_w / site_watts_per_gpu(gpu, site)))
    if budget_usd is not None:
        caps.append(math.floor(budget_usd / capex_per_gpu(gpu, site)))
    if lease_usd_month is not None:
        caps.append(math.floor(lease_usd_month / lease_per_gpu_month(gpu)))
    return min(caps)


def _unit(cap: int) -> int:
    return SCALABLE_UNIT if cap >= 4 * SCALABLE_UNIT else NODE


def candidate_counts(cap: int) -> list[int]:
    """Counts to try below ``cap``, largest first, in whole units (scalable units for big fleets, nodes
    otherwise): the next few units, then 5 % steps down to a sixteenth of the cap."""
    unit = _unit(cap)
    top = cap // unit * unit
    if top < unit:
        return [cap] if cap >= 1 else []
    out = [top - i * unit for i in range(4) if top - i * unit >= unit]
    n = float(out[-1])
    while n > max(unit, cap / 16):
        n *= 0.95
        c = int(n) // unit * unit
        if c >= unit and c < out[-1]:
            out.append(c)
    return out


def largest_plannable(cap: int, run: Callable[[int], SearchResult],
                      explain: Callable[[int, SearchResult], str]) -> tuple[int, SearchResult]:
    """The largest count ≤ cap (whole units) whose layout search finds a layout that fits: walk down the
    candidates to the first that plans, then bisect (on whole units) up towards the last that did not."""
    if cap < 1:
        raise UserError("the limit does not pay for a single GPU; raise it or pick a cheaper --gpu")
    unit = _unit(cap)
    failed, first_fail = cap + unit, None
    for n in candidate_counts(cap):
        res = run(n)
        if res.ranked:
            break
        failed, first_fail = n, first_fail or (n, res)
    else:
        assert first_fail is not None
        raise UserError(f"no layout fits on {candidate_counts(cap)[-1]:,} to {cap:,} GPUs: "
                        + explain(*first_fail))
    best = (n, res)
    lo, hi = n, failed
    while hi - lo > unit:
        mid = (lo + hi) // 2 // unit * unit
        if mid <= lo:
            break
        r = run(mid)
        if r.ranked:
            lo, best = mid, (mid, r)
        else:
            hi = mid
    return best


def smallest_for_deadline(deadline_s: float, days_of: Callable[[int], float | None]) -> tuple[int, float]:
    """The smallest count (whole units) whose reliability-adjusted training time is within the deadline.

    Doubles from one 8-GPU node until the deadline is met, then bisects on whole units (nodes below 1,024 GPUs,
    scalable units above). ``days_of(n)`` is None when nothing fits on n GPUs (too few: keep growing)."""
    days_max = deadline_s / 86400
    lo, n = 0, NODE
    while True:
        d = days_of(n)
        if d is not None and d <= days_max:
            break
        if n >= MAX_GPUS:
            shown = "no layout fits" if d is None else f"{d:,.1f} days"
            raise UserError(f"even {n:,} GPUs need more than the deadline ({shown} > {days_max:,.1f} days); "
                            f"extend --deadline or lower --tokens")
        lo, n = n, min(2 * n, MAX_GPUS)
    hi, best_days = n, d
    unit = _unit(hi)
    while hi - lo > unit:
        mid = (lo + hi) // 2 // unit * unit
        if mid <= lo:
            break
        dm = days_of(mid)
        if dm is not None and dm <= days_max:
            hi, best_days = mid, dm
        else:
            lo = mid
    return hi, best_days


@dataclass
class Sizing:
    question: str  # power, budget, lease_budget or deadline
    limit: float  # watts, dollars, dollars per month or seconds
    max_gpus_allowed: int | None
    chosen_gpus: int
    site_power_mw: float
    capex_usd: float
    lease_usd_per_month: float
    note: str = ""

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def sizing(question: str, limit: float, cap: int | None, n: int, gpu: GPUSpec, site: SiteSpec) -> Sizing:
    note = ""
    if cap is not None and n < cap:
        note = (f"the limit allows {cap:,} GPUs; {n:,} is the largest count (in whole {_unit(cap)}-GPU units) "
                f"with a layout that fits in memory and a global batch within 2x the target")
    return Sizing(question=question, limit=limit, max_gpus_allowed=cap, chosen_gpus=n,
                  site_power_mw=n * site_watts_per_gpu(gpu, site) / 1e6, capex_usd=n * capex_per_gpu(gpu, site),
                  lease_usd_per_month=n * lease_per_gpu_month(gpu), note=note)
