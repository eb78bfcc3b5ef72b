"""Published failure figures of real training jobs and clusters, and the simulator's answer to each.

Each figure names its source, the job it describes and the failure profile it is compared under (see
`profiles.py`: A100 research-cluster figures under `rsc1-a100`, dedicated pre-training jobs under `llama3-h100`).
Two of them (Llama 3's 419 and Kokolis's two MTTFs) calibrate the profiles; the others are checks the profiles
were not fitted to. `gigafactory validate-sim` prints the table; tests/test_sim_published.py holds each within its
tolerance (2x unless the source gives a bound).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from gigafactory.sim.config import make_config
from gigafactory.sim.montecarlo import SimResult, simulate

Kind = Literal["within", "at_least"]


@dataclass(frozen=True)
class Figure:
    key: str
    what: str  # the published statement, in our words
    source: str
    quantity: str  # a SimResult quantity (see `measure`)
    value: float
    scenario: dict[str, Any] = field(default_factory=dict)
    kind: Kind = "within"
    factor: float = 2.0  # "within": the simulated value must lie in [value / factor, value * factor]
    calibrated: bool = False  # a figure a profile was fitted to


LLAMA3 = "Dubey et al., The Llama 3 Herd of Models, arXiv:2407.21783 (2024), sec. 3.3.4 and Table 5"
KOKOLIS = ("Kokolis et al., Revisiting Reliability in Large-Scale Machine Learning Research Clusters, "
           "arXiv:2410.21680 (HPCA 2025)")
OPT = "Zhang et al., OPT: Open Pre-trained Transformer Language Models, arXiv:2205.01068 (2022), sec. 2.5"
BLOOM = "Bekman, The Technology Behind BLOOM Training, Hugging Face blog (2022)"

FIGURES: tuple[Figure, ...] = (
    Figure("llama3-interruptions", "466 job interruptions in 54 days on 16,384 H100s", LLAMA3, "interruptions",
           466, {"gpus": 16_384, "days": 54, "profile": "llama3-h100"}, factor=1.10, calibrated=True),
    Figure("llama3-unexpected", "419 of them unexpected", LLAMA3, "unexpected", 419,
           {"gpus": 16_384, "days": 54, "profile": "llama3-h100"}, factor=1.10, calibrated=True),
    Figure("llama3-ett", "effective training time above 90%", LLAMA3, "goodput", 0.90,
           {"gpus": 16_384, "days": 54, "profile": "llama3-h100"}, kind="at_least"),
    Figure("kokolis-8gpu", "job mean time to failure about 1,145 h (47.7 days) at 8 GPUs", KOKOLIS, "mtti_h", 1145,
           {"gpus": 8, "days": 365, "profile": "rsc1-a100"}, calibrated=True),
    Figure("kokolis-1024gpu", "job mean time to failure 7.9 h at 1,024 GPUs", KOKOLIS, "mtti_h", 7.9,
           {"gpus": 1024, "days": 30, "profile": "rsc1-a100"}, calibrated=True),
    Figure("opt175b-hosts", "over 100 hosts cycled out in about 2 months on 992 A100s", OPT, "node_swaps", 100,
           {"gpus": 992, "days": 60, "profile": "rsc1-a100"}),
    Figure("opt175b-restarts", "at least 35 manual restarts (hardware) in about 2 months on 992 A100s", OPT,
           "interruptions", 35, {"gpus": 992, "days": 60, "profile": "rsc1-a100"}, kind="at_least"),
    Figure("bloom-gpu-failures", "1-2 GPU failures a week on 384 A100s (BLOOM-176B, 3.5 months)", BLOOM,
           "gpu_failures_per_week", 1.5, {"gpus": 384, "days": 117, "profile": "llama3-h100"}),
)


def measure(res: SimResult, quantity: str) -> float:
    if quantity == "interruptions":
        return res.interruptions_mean
    if quantity == "unexpected":
        return res.unexpected_mean
    if quantity == "goodput":
        return res.goodput_mean
    if quantity == "mtti_h":
        return res.mtti_h if res.mtti_h is not None else float("inf")
    if quantity == "node_swaps":
        return res.swaps_mean
    if quantity == "gpu_failures_per_week":
        gpu = {m.name for m in res.config.failure_modes if m.category == "GPU"}
        return sum(v for k, v in res.interruptions_by_cause.items() if k in gpu) / res.config.days * 7
    raise KeyError(quantity)


def holds(fig: Figure, simulated: float) -> bool:
    if fig.kind == "at_least":
        return simulated >= fig.value
    return fig.value / fig.factor <= simulated <= fig.value * fig.factor


def compare(replicas: int = 50, seed: int = 0) -> list[dict[str, Any]]:
    """One row per published figure: the figure, the simulated value, their ratio and whether it holds."""
    rows = []
    cache: dict[tuple[tuple[str, Any], ...], SimResult] = {}
    for fig in FIGURES:
        key = tuple(sorted(fig.scenario.items()))
        if key not in cache:
            cache[key] = simulate(make_config(replicas=replicas, seed=seed, **fig.scenario))
        sim = measure(cache[key], fig.quantity)
        rows.append({"key": fig.key, "what": fig.what, "source": fig.source, "quantity": fig.quantity,
                     "published": fig.value, "simulated": sim, "ratio": sim / fig.value, "kind": fig.kind,
                     "factor": fig.factor, "calibrated": fig.calibrated, "holds": holds(fig, sim),
                     "profile": fig.scenario.get("profile")})
    return rows
