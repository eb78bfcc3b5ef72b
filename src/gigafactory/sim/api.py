"""The two calls other packages make: the job's MTBF (for Young/Daly) and a quick simulated goodput."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from gigafactory.errors import UserError
from gigafactory.sim.config import make_config
from gigafactory.sim.failures import default_failure_model, job_failure_rate_per_s
from gigafactory.sim.montecarlo import simulate


def mtbf_seconds(n_gpus: int, gpus_per_node: int = 8, rate_scale: float = 1.0) -> float:
    """Mean time between unexpected interruptions of a job on `n_gpus`, from the default (Llama 3) failure model.

    Planned maintenance is left out on purpose: the job checkpoints before it, so it loses no work and has no place
    in the Young/Daly trade-off this is meant for. 16,384 GPUs give about 3.1 hours.
    """
    if n_gpus <= 0 or gpus_per_node <= 0:
        raise UserError(f"mtbf_seconds needs a positive GPU count (got {n_gpus} GPUs, {gpus_per_node} per node)")
    if rate_scale <= 0:
        raise UserError(f"failure rate scale must be positive (got {rate_scale})")
    return 1.0 / (rate_scale * job_failure_rate_per_s(default_failure_model(), n_gpus, gpus_per_node))


@dataclass(frozen=True)
class GoodputEstimate:
    goodput_mean: float
    goodput_ci95: tuple[float, float]
    interruptions_mean: float
    best_checkpoint_interval_s: float
    young_daly_interval_s: float
    source: str


def estimate_goodput(
    n_gpus: int,
    checkpoint_cost_s: float,
    restart_s: float | None = None,
    days: float = 30,
    replicas: int = 20,
    seed: int = 0,
    **overrides: Any,
) -> GoodputEstimate:
    """Simulated goodput at the best checkpoint interval, with blocking checkpoints of `checkpoint_cost_s`.

    Blocking by default because a caller's single "checkpoint cost" is the time the job pays per save, which is
    what Young/Daly's C means; pass `checkpoint_mode="async"` (and `checkpoint_stall_s`) to model async saves.
    Any other `SimConfig` field can be overridden by keyword. Takes tens of milliseconds at 100k GPUs.
    """
    frozen = tuple(sorted(overrides.items()))
    try:
        hash(frozen)
    except TypeError:  # e.g. a failure model (a list): not cacheable
        return _estimate(n_gpus, checkpoint_cost_s, restart_s, days, replicas, seed, overrides)
    return _estimate_cached(n_gpus, checkpoint_cost_s, restart_s, days, replicas, seed, frozen)


@lru_cache(maxsize=256)
def _estimate_cached(
    n_gpus: int,
    checkpoint_cost_s: float,
    restart_s: float | None,
    days: float,
    replicas: int,
    seed: int,
    frozen: tuple[tuple[str, Any], ...],
) -> GoodputEstimate:
    # Deterministic in its arguments, and a layout search may ask about the same GPU count many times.
    return _estimate(n_gpus, checkpoint_cost_s, restart_s, days, replicas, seed, dict(frozen))


def _estimate(
    n_gpus: int,
    checkpoint_cost_s: float,
    restart_s: float | None,
    days: float,
    replicas: int,
    seed: int,
    overrides: dict[str, Any],
) -> GoodputEstimate:
    kwargs: dict[str, Any] = {
        "gpus": n_gpus,
        "days": days,
        "replicas": replicas,
        "seed": seed,
        "checkpoint_cost_s": checkpoint_cost_s,
        "checkpoint_mode": "blocking",
    }
    if restart_s is not None:
        kwargs["restart_s"] = restart_s
    kwargs.update(overrides)
    res = simulate(make_config(**kwargs))
    return GoodputEstimate(
        goodput_mean=res.goodput_mean,
        goodput_ci95=res.goodput_ci95,
        interruptions_mean=res.interruptions_mean,
        best_checkpoint_interval_s=res.best_checkpoint_interval_s,
        young_daly_interval_s=res.young_daly_interval_s,
        source=(
            f"gigafactory.sim: {replicas} replicas x {days:g} days, Llama 3 failure rates, "
            f"best checkpoint interval {res.best_checkpoint_interval_s:.0f} s"
        ),
    )
