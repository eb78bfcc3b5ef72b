"""`Layout`: how one training job is spread over GPUs. Shared by the planner and the trainer; no torch import.

World size = dp_replicate · dp_shard · cp · tp · pp. Expert parallelism borrows ranks from data parallelism as in
torchtitan: experts are split over ``ep`` ranks taken out of dp_shard · cp, while non-expert weights are
FSDP-sharded over dp_shard (and cp, which also shards parameters in torchtitan's mesh).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gigafactory.errors import UserError

if TYPE_CHECKING:
    from gigafactory.specs.model_spec import ModelSpec

_INT_FIELDS = ("dp_replicate", "dp_shard", "tp", "pp", "ep", "cp", "micro_batch", "pp_virtual")


class Layout(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    dp_replicate: int = Field(1, ge=1)
    dp_shard: int = Field(1, ge=1)
    tp: int = Field(1, ge=1)
    pp: int = Field(1, ge=1)
    ep: int = Field(1, ge=1)
    cp: int = Field(1, ge=1)
    micro_batch: int = Field(1, ge=1)
    recompute: Literal["none", "selective", "full"] = "none"
    pp_schedule: Literal["gpipe", "1f1b", "interleaved"] = "1f1b"
    pp_virtual: int = Field(1, ge=1)

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard * self.cp * self.tp * self.pp

    @property
    def dp(self) -> int:
        """Data-parallel degree (batch split): replicate × shard."""
        return self.dp_replicate * self.dp_shard

    def short(self) -> str:
        parts = [f"{k}={getattr(self, k)}" for k in ("dp_replicate", "dp_shard", "tp", "pp", "ep", "cp")
                 if getattr(self, k) != 1]
        parts.append(f"mb={self.micro_batch}")
        if self.recompute != "none":
            parts.append(f"recompute={self.recompute}")
        if self.pp > 1:
            parts.append(self.pp_schedule + (f"×{self.pp_virtual}" if self.pp_virtual > 1 else ""))
        return ",".join(parts)

    @classmethod
    def parse(cls, text: str) -> Layout:
        """Parse ``"dp_shard=2,tp=2,recompute=full"`` (the CLI form)."""
        values: dict[str, int | str] = {}
        for item in (x.strip() for x in text.split(",")):
            if not item:
                continue
            if "=" not in item:
                raise UserError(f"layout item {item!r} is not key=value; e.g. 'dp_shard=8,tp=8'")
            key, _, raw = (s.strip() for s in item.partition("="))
            if key not in cls.model_fields:
                raise UserError(f"unknown layout key {key!r}; known: {', '.join(cls.model_fields)}")
            if key in _INT_FIELDS:
                try:
                    values[key] = int(raw)
                except ValueError:
                    raise UserError(f"layout {key}={raw!r} is not an integer") from None
            else:
                values[key] = raw
        try:
            return cls(**values)  # type: ignore[arg-type]
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ()))
            raise UserError(f"invalid layout {where}: {first['msg']}") from None

    def validate(  # type: ignore[override]  # pydantic's classmethod of the same name is not used on instances
        self, spec: ModelSpec, world_size: int, gpus_per_node: int | None = None
    ) -> Layout:
        """Raise a one-line `UserError` saying what to change if this layout cannot run ``spec``."""
        if self.world_size != world_size:
            raise UserError(
                f"layout degrees dp_replicate·dp_shard·cp·tp·pp = {self.dp_replicate}·{self.dp_shard}·{self.cp}·"
                f"{self.tp}·{self.pp} = {self.world_size}, not the {world_size} GPUs; change a degree so they multiply "
                f"to {world_size}"
            )
        if gpus_per_node is not None and self.tp > gpus_per_node:
            raise UserError(
                f"tp={self.tp} is larger than a node ({gpus_per_node} GPUs share NVLink); use tp <= {gpus_per_node}"
            )
        if spec.n_heads % self.tp or spec.n_kv_heads % self.tp:
            raise UserError(
                f"tp={self.tp} must divide n_heads={spec.n_heads} and n_kv_heads={spec.n_kv_heads}; use tp in "
                f"{_divisors(_gcd(spec.n_heads, spec.n_kv_heads))}"
            )
        if spec.n_experts % self.ep:
            raise UserError(f"ep={self.ep} does not divide n_experts={spec.n_experts}; use ep in "
                            f"{_divisors(spec.n_experts)}")
        if (self.dp_shard * self.cp) % self.ep:
            raise UserError(
                f"ep={self.ep} must divide dp_shard·cp = {self.dp_shard * self.cp} (experts borrow data-parallel "
                f"ranks); raise dp_shard or lower ep"
            )
        stages = self.pp * self.pp_virtual
        if stages > spec.n_layers:
            raise UserError(
                f"pp={self.pp} × pp_virtual={self.pp_virtual} = {stages} stages but the model has only "
                f"{spec.n_layers} layers; use at most {spec.n_layers} stages"
            )
        if self.pp_virtual > 1 and self.pp_schedule != "interleaved":
            raise UserError(f"pp_virtual={self.pp_virtual} needs pp_schedule=interleaved")
        return self

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str) -> Layout:
        try:
            return cls(**json.loads(text))
        except (json.JSONDecodeError, TypeError, ValidationError) as err:
            raise UserError(f"invalid layout JSON: {str(err).splitlines()[0]}") from None


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
