"""The simulation's inputs, validated once so that bad input becomes a one-line `UserError`."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gigafactory.errors import UserError
from gigafactory.sim.failures import FailureMode, default_maintenance_interval_s
from gigafactory.sim.profiles import FABRICS, PLANNER_PROFILE, PROFILES, failure_model

DAY_S = 86_400.0


class SimConfig(BaseModel):
    """One training campaign to simulate. Times are in seconds unless the name says otherwise."""

    model_config = ConfigDict(extra="forbid")

    gpus: int = Field(gt=0, description="GPUs in the job")
    gpus_per_node: int = Field(8, gt=0)
    days: float = Field(gt=0, description="wall-clock length of the campaign")
    replicas: int = Field(100, ge=2, le=100_000, description="Monte Carlo replicas (2+ for a confidence interval)")
    seed: int = 0
    detection_s: float = Field(60.0, ge=0, description="from a fault to the job noticing it (watchdog, heartbeat)")
    restart_s: float = Field(300.0, ge=0, description="relaunch, communicator set-up and checkpoint load")
    checkpoint_cost_s: float = Field(60.0, ge=0, description="time to write one checkpoint")
    checkpoint_mode: Literal["async", "blocking"] = "async"
    checkpoint_stall_s: float = Field(
        5.0, ge=0, description="async only: pause of the step loop while the state is copied to host memory"
    )
    checkpoint_interval_s: float | None = Field(
        None, gt=0, description="training time between checkpoints; None = the best one found by the sweep"
    )
    spare_nodes: int | None = Field(None, ge=0, description="hot spares; None = 1% of the job's nodes, at least 1")
    repair_h: float = Field(24.0, gt=0, description="time to repair (or replace) a failed node")
    maintenance: bool = True
    maintenance_interval_h: float | None = Field(None, gt=0, description="None = Llama 3's 47 in 54 days")
    maintenance_extra_s: float = Field(0.0, ge=0, description="planned downtime beyond checkpoint + restart")
    rate_scale: float = Field(1.0, gt=0, description="multiplies every failure rate")
    profile: str = Field(PLANNER_PROFILE, description=f"failure-rate profile: {', '.join(PROFILES)}")
    fabric: str = Field("single-plane", description=f"network fabric: {', '.join(FABRICS)}")
    watchdog_s: float = Field(600.0, ge=0, description="collective timeout: when a hang is noticed")
    node_loss: Literal["wait", "elastic"] = Field(
        "wait", description="with no spare ready: wait for the repair, or continue on fewer nodes until it is back"
    )
    failure_modes: list[FailureMode] = Field(
        default_factory=list, description="empty = the profile's modes on the fabric"
    )

    @property
    def campaign_s(self) -> float:
        return self.days * DAY_S

    @property
    def nodes(self) -> int:
        return -(-self.gpus // self.gpus_per_node)

    @property
    def spares(self) -> int:
        if self.spare_nodes is not None:
            return self.spare_nodes
        return max(1, math.ceil(0.01 * self.nodes))

    @property
    def stall_s(self) -> float:
        """Time the training loop stops per checkpoint (the C of Young/Daly)."""
        return self.checkpoint_cost_s if self.checkpoint_mode == "blocking" else self.checkpoint_stall_s

    @property
    def durable_delay_s(self) -> float:
        """From the end of the stall until the checkpoint can be restored from (async writes in the background)."""
        return 0.0 if self.checkpoint_mode == "blocking" else self.checkpoint_cost_s

    @property
    def maintenance_interval_s(self) -> float | None:
        if not self.maintenance:
            return None
        if self.maintenance_interval_h is None:
            return default_maintenance_interval_s(self.nodes)
        return self.maintenance_interval_h * 3600.0

    @model_validator(mode="after")
    def _fill_failure_modes(self) -> SimConfig:
        if self.profile not in PROFILES:
            raise ValueError(f"unknown profile {self.profile!r}; choose one of {', '.join(PROFILES)}")
        if self.fabric not in FABRICS:
            raise ValueError(f"unknown fabric {self.fabric!r}; choose one of {', '.join(FABRICS)}")
        if not self.failure_modes:
            self.failure_modes = failure_model(self.profile, self.fabric)
        return self

    @model_validator(mode="after")
    def _check_interval(self) -> SimConfig:
        tau = self.checkpoint_interval_s
        if tau is not None:
            if tau > self.campaign_s:
                raise ValueError(
                    f"checkpoint interval {tau:g} s is longer than the campaign "
                    f"({self.campaign_s:g} s = {self.days:g} days)"
                )
            if self.checkpoint_mode == "async" and tau < self.durable_delay_s:
                raise ValueError(
                    f"checkpoint interval {tau:g} s is shorter than the async write time {self.durable_delay_s:g} s "
                    "(saves would overlap); lengthen it or use --checkpoint-mode blocking"
                )
        return self


def _one_line(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ()))
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if where and "input" in first and not isinstance(first["input"], dict):
        return f"invalid simulation input: {where}: {msg} (got {first['input']!r})"
    return f"invalid simulation input: {where + ': ' if where else ''}{msg}"


def make_config(**kwargs: Any) -> SimConfig:
    """Build a `SimConfig`, turning validation failures into a one-line `UserError`."""
    try:
        return SimConfig(**kwargs)
    except ValidationError as err:
        raise UserError(_one_line(err)) from None
