"""Training configuration: one pydantic model, validated once, saved in the run directory."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gigafactory.errors import UserError


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field("small", description="preset name or a .toml/.json spec file")
    run_dir: Path = Path("runs/default")
    data: Path | None = Field(None, description="UTF-8 text file or folder, or a prepared dataset folder; default: "
                              "the built-in corpus")
    data_mix: str | None = Field(None, description="prepared datasets with weights, e.g. 'a=0.7,b=0.3'")
    tokenizer: Literal["auto", "bpe", "grok-1"] = Field(
        "auto", description="bpe (trained on the corpus), grok-1 (the release's SentencePiece); auto: grok-1 for "
        "the grok-1 preset, else bpe"
    )
    steps: int = Field(300, gt=0, description="length of the run; the learning-rate schedule spans it")
    stop_after: int | None = Field(None, gt=0, description="stop (with a checkpoint) at this step, as a time-boxed job")
    batch_size: int = Field(16, gt=0, description="sequences per optimizer step (global, all ranks together)")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")
    seq_len: int | None = Field(None, gt=1, description="default: the spec's context length")
    lr: float = Field(3e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(30, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    grad_clip: float = Field(1.0, ge=0, description="0 disables clipping")
    lb_loss_weight: float = Field(0.01, ge=0, description="MoE load-balancing loss weight")
    z_loss_weight: float = Field(1e-3, ge=0, description="router z-loss weight")
    moe_capacity_factor: float | None = Field(
        None, gt=0, description="MoE expert capacity: each expert takes at most ceil(f·tokens·top_k/n_experts) "
        "token copies per layer in fixed, zero-padded slots, later tokens beyond it dropped; fixed shapes let "
        "expert parallelism skip its per-layer host sync. Default: dropless (exact, one sync per layer under ep)"
    )
    eval_every: int = Field(100, gt=0)
    eval_windows: int = Field(48, gt=0, description="validation windows of seq_len tokens per evaluation")
    checkpoint_every: int | Literal["auto"] = Field(
        100, description="steps between checkpoints, or 'auto' for Young/Daly from the measured cost and MTBF"
    )
    async_checkpoint: bool = Field(True, description="write checkpoints in the background (DCP async_save)")
    fleet_gpus: int | None = Field(None, gt=0, description="GPU count whose MTBF sets the auto cadence")
    max_bad_steps: int = Field(3, ge=0, description="non-finite steps in a row before a rollback; 0 = never")
    hang_timeout_s: float = Field(600.0, ge=0, description="watchdog: end a rank with no step for this long")
    keep_last: int = Field(3, gt=0)
    peer_snapshot_every: int = Field(0, ge=0, description="steps between snapshots of each rank's state into a peer's "
                                     "host memory, restored after a restart instead of the disk checkpoint; 0 = off")
    seed: int = 0
    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    resume: bool = False
    auto_resume: bool = Field(False, description="resume if the run has a checkpoint, else start (Slurm requeue)")
    layout: str | None = Field(None, description="parallel layout, e.g. 'dp_shard=2,tp=2' (run under torchrun)")

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if isinstance(self.checkpoint_every, int) and self.checkpoint_every <= 0:
            raise ValueError("checkpoint_every must be a positive number of steps or 'auto'")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"grad_accum={self.grad_accum} must divide batch_size={self.batch_size}")
        return self


def option_help(option: str) -> str:
    """A training option's help text, from its one definition here (for the CLI commands that take it)."""
    return TrainConfig.model_fields[option].description or ""


def make_config(**kwargs: object) -> TrainConfig:
    try:
        return TrainConfig(**{k: v for k, v in kwargs.items() if v is not None})
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "config"
        raise UserError(f"invalid training option {where}: {first['msg'].removeprefix('Value error, ')}") from None
