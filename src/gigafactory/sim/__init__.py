"""Reliability simulator: failures by component, detection and restart, checkpoint cadence, spares, goodput.

No torch here (the planner and the CLI import this package for 100k-GPU what-ifs). The small API other packages
use is `mtbf_seconds` (the trainer's `--checkpoint-every auto`) and `estimate_goodput` (the planner).
"""

from __future__ import annotations

from gigafactory.sim.api import GoodputEstimate, estimate_goodput, mtbf_seconds
from gigafactory.sim.config import SimConfig, make_config
from gigafactory.sim.failures import FailureMode, default_failure_model
from gigafactory.sim.montecarlo import SimResult, simulate, young_daly_s

__all__ = [
    "FailureMode",
    "GoodputEstimate",
    "SimConfig",
    "SimResult",
    "default_failure_model",
    "estimate_goodput",
    "make_config",
    "mtbf_seconds",
    "simulate",
    "young_daly_s",
]
