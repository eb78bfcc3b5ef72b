"""`Layout`: how one training job is spread over GPUs. Shared by the planner and the trainer; no torch import.

World size = dp_replicate · dp_shard · cp · tp · pp. Expert parallelism borrows ranks from data parallelism as in
torchtitan: experts are split over ``ep`` ranks taken out of dp_shard · cp, while non-expert weights are
FSDP-sharded over dp_shard (and cp, which also shards parameters in torchtitan's mesh).
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gigafactory.errors import UserError

if TYPE_CHECKING:
    from gigafactory.specs.model_spec import ModelSpec

DPMode = Literal["none", "zero1", "fsdp", "hsdp"]

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
    pp_schedule: Literal["gpipe", "1f1b", "interleaved", "zero_bubble"] = "1f1b"
    pp_virtual: int = Field(1, ge=1)

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard * self.cp * self.tp * self.pp

    @property
    def dp(self) -> int:
        """Data-parallel degree (batch split): replicate × shard."""
        return self.dp_replicate * self.dp_shard

    @property
    def dp_mode(self) -> DPMode:
        """How data parallelism holds the training state, decided here once for the trainer (`parallel.fsdp`)
        and the planner (`plan.costmodel`): dense weights are sharded over dp_shard·cp.

        ``fsdp``: FSDP2 over dp_shard·cp (ZeRO-3: parameters gathered per layer, gradients reduce-scattered).
        ``hsdp``: the same, replicated over dp_replicate (gradient shards all-reduced over it once per step).
        ``zero1``: dp_shard·cp = 1 and dp_replicate > 1: a distributed optimizer (Megatron's, ZeRO-1): fp32
        master weights and Adam state sharded over dp_replicate, bf16 weights and fp32 gradients whole on every
        rank through the step; parameters gathered and gradients reduce-scattered once per step.
        ``none``: one data-parallel rank."""
        if self.dp_shard * self.cp > 1:
            return "hsdp" if self.dp_replicate > 1 else "fsdp"
        return "zero1" if self.dp_replicate > 1 else "none"

    @property
    def expert_fsdp(self) -> bool:
        """Under expert parallelism, whether the experts are an FSDP unit of their own, sharded over the
        data-parallel ranks left beside ep (dp_shard / ep, and dp_replicate)."""
        return self.ep > 1 and self.dp_shard // self.ep * self.dp_replicate > 1

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
        if self.pp_virtual > 1 and self.pp_schedule not in MULTI_STAGE_SCHEDULES:
            raise UserError(f"pp_virtual={self.pp_virtual} needs pp_schedule=interleaved or zero_bubble")
        return self

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str) -> Layout:
        try:
            return cls(**json.loads(text))
        except (json.JSONDecodeError, TypeError, ValidationError) as err:
            raise UserError(f"invalid layout JSON: {str(err).splitlines()[0]}") from None


# Schedules that run several stages per pipeline rank (``pp_virtual`` of them); zero_bubble also runs with one.
MULTI_STAGE_SCHEDULES = ("interleaved", "zero_bubble")

# What the trainer (`gigafactory.parallel`) runs today, stated once. `unsupported_reason` turns it into the one
# answer the planner's search and the trainer's error messages share.
TRAINER_RUNS_CP = True
TRAINER_RUNS_PP_WITH_OTHERS = True
TRAINER_RUNS_EP_WITH_TP = True
TRAINER_SCHEDULES = ("gpipe", "1f1b", "interleaved", "zero_bubble")


def unsupported_reason(layout: Layout, spec: ModelSpec) -> str | None:
    """Why the trainer cannot run `layout` for `spec` (one line saying what to change), or None if it can.

    Only what depends on the trainer: the consistency of degrees with the model and world size is
    `Layout.validate`'s. Torch-free, so the planner's search calls it for every candidate."""
    lay = layout
    if lay.dp_shard % lay.ep:
        return (f"ep={lay.ep} must divide dp_shard={lay.dp_shard} (the trainer takes expert ranks from dp_shard "
                f"only, not from cp); use ep in {_divisors(math.gcd(lay.dp_shard, spec.n_experts))}")
    if lay.ep > 1 and lay.dp_replicate > 1 and lay.dp_shard == lay.ep:
        return "ep with dp_replicate needs dp_shard > ep so experts are FSDP-sharded; raise dp_shard"
    if lay.pp_schedule == "interleaved" and lay.pp > 1 and lay.pp_virtual == 1:
        return "pp_schedule=interleaved needs pp_virtual > 1"
    if lay.pp_virtual > 1 and spec.n_layers % (lay.pp * lay.pp_virtual):
        ok = [p for p in _divisors(spec.n_layers) if spec.n_layers % (p * lay.pp_virtual) == 0]
        return (f"pp={lay.pp} × pp_virtual={lay.pp_virtual} stages must divide n_layers={spec.n_layers} evenly "
                f"with virtual stages; use pp in {ok}")
    if lay.cp > 1 and not TRAINER_RUNS_CP:
        return "cp > 1 (context parallelism) is not implemented by the trainer yet; use cp=1"
    if lay.cp > 1 and lay.ep > 1:
        return "cp > 1 together with ep > 1 is not implemented by the trainer yet; use one of them"
    if lay.pp > 1 and lay.world_size != lay.pp and not TRAINER_RUNS_PP_WITH_OTHERS:
        return f"pp={lay.pp} combined with other degrees is not implemented by the trainer yet; use pp alone"
    if lay.pp > 1 and lay.pp_schedule not in TRAINER_SCHEDULES:
        return (f"pp_schedule={lay.pp_schedule} is not implemented by the trainer yet; use one of "
                f"{', '.join(TRAINER_SCHEDULES)}")
    if spec.vocab_size % lay.tp:
        return (f"tp={lay.tp} must divide vocab_size={spec.vocab_size} (the trainer splits the vocabulary over tp, "
                f"without padding); use tp in {[t for t in _divisors(spec.vocab_size) if t <= 64]}")
    if lay.ep > 1 and lay.tp > 1 and not TRAINER_RUNS_EP_WITH_TP:
        return "ep > 1 together with tp > 1 is not implemented by the trainer yet; use one of them"
    return None


def check_supported(layout: Layout, spec: ModelSpec, world_size: int, gpus_per_node: int | None = None) -> Layout:
    """`Layout.validate` and `unsupported_reason` together: raise a one-line `UserError`, else return the layout.
    The trainer calls this before any process-group work; the planner never proposes a layout it rejects."""
    layout.validate(spec, world_size, gpus_per_node)
    reason = unsupported_reason(layout, spec)
    if reason:
        raise UserError(reason)
    return layout


def is_supported(layout: Layout, spec: ModelSpec, world_size: int, gpus_per_node: int | None = None) -> bool:
    try:
        check_supported(layout, spec, world_size, gpus_per_node)
    except UserError:
        return False
    return True


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
