"""The default failure model, derived from Meta's Llama 3 interruption table.

Source: Dubey et al., "The Llama 3 Herd of Models" (arXiv:2407.21783, 2024), section 3.3.4 and Table 5: during a
54-day snapshot of Llama 3 405B pre-training on 16,384 H100 GPUs (2,048 servers of 8) there were 466 job
interruptions, 47 planned (automated maintenance such as firmware upgrades) and 419 unexpected, broken down by root
cause below. (The table prints 30.1% next to "Faulty GPU"; 148 of 419 is 35.3%. We use the counts, which sum to
419.) Effective training time was reported above 90%.

Each cause is turned into a rate per *unit*: per GPU for faults inside the GPU package, per node for host,
network and software faults. Software faults are per node too: a job's code runs on every node, and a crash,
a hang or a bad dependency on any one of them stops the job, so their rate grows with the job's size; a per-job
rate made an 8-GPU job fail every 12.6 h where Kokolis et al. measured about 1,145 h. That choice is ours, not the
paper's; it decides how the table extrapolates from 16k to 100k GPUs and down to one node.

Correlated failures (a rack, a power domain or a leaf switch taking several nodes down at once) use the scope
"domain": `rate_per_day` is per failure domain and `domain_nodes` says how many nodes one event removes. A job
spanning d domains sees d times the rate; each event interrupts it once and needs min(domain_nodes, job nodes)
swaps. Hangs (`hang=True`) are noticed only when the collective watchdog times out, not after `detection_s`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

Scope = Literal["gpu", "node", "job", "domain"]

LLAMA3_GPUS = 16_384
LLAMA3_GPUS_PER_NODE = 8
LLAMA3_DAYS = 54.0
LLAMA3_PLANNED = 47
LLAMA3_UNEXPECTED = 419

# (cause, category, count in 54 days, scope, needs a node swap). "Needs a node swap" marks faults after which the
# failed server leaves the job for repair, so a hot spare (or waiting for the repair) is involved; a software bug
# or a flapping switch port restarts the job on the same servers.
_LLAMA3_TABLE5: tuple[tuple[str, str, int, Scope, bool], ...] = (
    ("faulty GPU", "GPU", 148, "gpu", True),
    ("GPU HBM3 memory", "GPU", 72, "gpu", True),
    ("software bug", "dependency", 54, "node", False),
    ("network switch/cable", "network", 35, "node", False),
    ("host maintenance", "unplanned maintenance", 32, "node", True),
    ("GPU SRAM memory", "GPU", 19, "gpu", True),
    ("GPU system processor", "GPU", 17, "gpu", True),
    ("NIC", "host", 7, "node", True),
    ("NCCL watchdog timeout", "unknown", 7, "node", False),
    ("silent data corruption", "GPU", 6, "gpu", True),
    ("GPU thermal interface/sensor", "GPU", 6, "gpu", True),
    ("SSD", "host", 3, "node", True),
    ("power supply", "host", 3, "node", True),
    ("server chassis", "host", 2, "node", True),
    ("IO expansion board", "host", 2, "node", True),
    ("dependency", "dependency", 2, "node", False),
    ("CPU", "host", 2, "node", True),
    ("system memory", "host", 2, "node", True),
)


class FailureMode(BaseModel):
    """One root cause of unexpected interruptions, with its rate per unit (GPU, node or job) per day."""

    name: str = Field(min_length=1)
    category: str = "other"
    scope: Scope
    rate_per_day: float = Field(gt=0, description="failures per unit per day")
    needs_swap: bool = False
    hang: bool = Field(False, description="noticed only when the collective watchdog times out")
    domain_nodes: int = Field(1, ge=1, description="scope 'domain': nodes one event takes down")

    def units(self, n_gpus: int, gpus_per_node: int) -> int:
        nodes = -(-n_gpus // gpus_per_node)
        if self.scope == "gpu":
            return n_gpus
        if self.scope == "node":
            return nodes
        if self.scope == "domain":
            return -(-nodes // self.domain_nodes)
        return 1

    def nodes_lost(self, n_gpus: int, gpus_per_node: int) -> int:
        """Nodes one event of this mode removes from the job (swaps it needs)."""
        if self.scope != "domain":
            return 1
        return min(self.domain_nodes, -(-n_gpus // gpus_per_node))

    def job_rate_per_s(self, n_gpus: int, gpus_per_node: int) -> float:
        return self.rate_per_day * self.units(n_gpus, gpus_per_node) / 86_400.0


def default_failure_model() -> list[FailureMode]:
    """The 18 causes of Table 5 as per-unit rates, so that 16,384 GPUs over 54 days reproduce the 419 counts."""
    units = {"gpu": LLAMA3_GPUS, "node": LLAMA3_GPUS // LLAMA3_GPUS_PER_NODE, "job": 1}
    return [
        FailureMode(
            name=name,
            category=category,
            scope=scope,
            rate_per_day=count / (LLAMA3_DAYS * units[scope]),
            needs_swap=swap,
            hang=name == "NCCL watchdog timeout",
        )
        for name, category, count, scope, swap in _LLAMA3_TABLE5
    ]


def default_maintenance_interval_s(nodes: int = LLAMA3_GPUS // LLAMA3_GPUS_PER_NODE) -> float:
    """Planned interruptions come from maintenance of the job's nodes (firmware, host upgrades): 47 in 54 days
    for Llama 3's 2,048 nodes, so one node is due every 54 * 2048 / 47 days and a job of n nodes is stopped
    n / 2048 times as often."""
    return LLAMA3_DAYS * 86_400.0 / LLAMA3_PLANNED * (LLAMA3_GPUS // LLAMA3_GPUS_PER_NODE) / max(nodes, 1)


def job_failure_rate_per_s(modes: list[FailureMode], n_gpus: int, gpus_per_node: int = 8) -> float:
    return sum(m.job_rate_per_s(n_gpus, gpus_per_node) for m in modes)
