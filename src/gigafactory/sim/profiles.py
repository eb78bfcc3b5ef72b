"""Failure-rate profiles: which cluster the failure rates describe, and what its network fabric survives.

Every profile keeps the cause mix of Llama 3's Table 5 (see `failures.py`) and scales its rates so that the
profile reproduces its own published figures; the fabric then removes what it fails over.

- `llama3-h100`: Meta's production H100 cluster running one dedicated, screened 16,384-GPU pre-training job
  (Dubey et al., "The Llama 3 Herd of Models", 2024: 419 unexpected interruptions in 54 days). Used by the planner
  and the trainer's Young/Daly cadence, which plan that kind of job.
- `rsc1-a100`: Meta's Research SuperCluster of A100s running every size of job from one node up (Kokolis et al.,
  "Revisiting Reliability in Large-Scale Machine Learning Research Clusters", HPCA 2025, arXiv:2410.21680: job
  mean time to failure about 1,145 h (47.7 days) at 8 GPUs and 7.9 h at 1,024 GPUs). The per-node rate is the
  mean of the two rates those figures imply; the two agree within 13%, which is what makes a per-node rate
  right. It is about 5.9 times Llama 3's: a shared research cluster, older GPUs, no dedicated screening. The
  default of `gigafactory simulate`, which answers for any job size.

Fabrics: `single-plane` (each NIC on one leaf switch: a switch or cable fault stops the job) and `dual-plane`
(each NIC port pair on two independent planes, as in Alibaba's HPN, Qian et al., SIGCOMM 2024: one plane's fault
fails over to the other, so switch and cable faults no longer interrupt; a NIC fault still does). The dual-plane
effect is our reading of the design, not a published rate.
"""

from __future__ import annotations

from dataclasses import dataclass

from gigafactory.errors import UserError
from gigafactory.sim.failures import (
    LLAMA3_DAYS,
    LLAMA3_GPUS,
    LLAMA3_GPUS_PER_NODE,
    LLAMA3_UNEXPECTED,
    FailureMode,
    default_failure_model,
)

# Published figures the profiles are calibrated on (also checked, with others, in tests/test_sim_published.py).
KOKOLIS_MTTF_8_GPUS_H = 1_145.0
KOKOLIS_MTTF_1024_GPUS_H = 7.9


def _per_node_hour_llama3() -> float:
    return LLAMA3_UNEXPECTED / (LLAMA3_DAYS * 24 * LLAMA3_GPUS / LLAMA3_GPUS_PER_NODE)


def _per_node_hour_rsc1() -> float:
    one = 1.0 / (KOKOLIS_MTTF_8_GPUS_H * 1)
    many = 1.0 / (KOKOLIS_MTTF_1024_GPUS_H * 1024 / 8)
    return (one + many) / 2


@dataclass(frozen=True)
class Profile:
    name: str
    scale: float  # multiplies every rate of the Llama 3 table
    source: str


PROFILES: dict[str, Profile] = {
    "llama3-h100": Profile("llama3-h100", 1.0, "Dubey et al. 2024 (Llama 3), Table 5"),
    "rsc1-a100": Profile("rsc1-a100", _per_node_hour_rsc1() / _per_node_hour_llama3(),
                         "Kokolis et al. 2024 (Meta RSC), job MTTF at 8 and 1,024 GPUs"),
}
FABRICS = ("single-plane", "dual-plane")
DEFAULT_PROFILE = "rsc1-a100"  # the CLI's: any job size on a shared cluster
PLANNER_PROFILE = "llama3-h100"  # the planner's and trainer's: a dedicated pre-training job


def failure_model(profile: str = PLANNER_PROFILE, fabric: str = "single-plane") -> list[FailureMode]:
    """The failure modes of a profile on a fabric."""
    if profile not in PROFILES:
        raise UserError(f"unknown failure profile {profile!r}; choose one of {', '.join(PROFILES)}")
    if fabric not in FABRICS:
        raise UserError(f"unknown fabric {fabric!r}; choose one of {', '.join(FABRICS)}")
    scale = PROFILES[profile].scale
    modes = [m.model_copy(update={"rate_per_day": m.rate_per_day * scale}) for m in default_failure_model()]
    if fabric == "dual-plane":
        modes = [m for m in modes if m.category != "network"]
    return modes
