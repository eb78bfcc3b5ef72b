"""Scale-out: a `Layout` becomes one `DeviceMesh`, and the parallel styles are applied to a `model.GrokModel` in
order — tensor (+ sequence) parallel, expert parallel, activation recompute, FSDP2 — or, for ``pp > 1``, the
model is cut into pipeline stages. The model's math stays in `gigafactory.model`. See docs/parallel.md."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from gigafactory.model.grok import GrokModel
from gigafactory.model.init import materialize
from gigafactory.parallel.comm import CommCounter
from gigafactory.parallel.context import apply_cp
from gigafactory.parallel.expert import apply_ep
from gigafactory.parallel.fsdp import apply_fsdp, apply_recompute
from gigafactory.parallel.mesh import Meshes, build_meshes, check_layout
from gigafactory.parallel.pipeline import Pipeline, split_model
from gigafactory.parallel.tensor import apply_tp, cross_entropy, local_targets

__all__ = ["Parallelized", "apply_layout", "build_meshes", "check_layout", "cross_entropy", "local_targets",
           "parallelize", "CommCounter"]


@dataclass
class Parallelized:
    model: nn.Module
    meshes: Meshes
    fsdp_units: list[FSDPModule] = field(default_factory=list)
    pipeline: Pipeline | None = None
    tp_replicated: list[nn.Module] = field(default_factory=list)  # whole on every tp rank, each saw its tokens

    @property
    def vocab_group(self) -> dist.ProcessGroup | None:
        """The group the logits' vocabulary is split over (`parallel.tensor.cross_entropy`), None if whole."""
        return self.meshes.tp.get_group() if self.meshes.layout.tp > 1 else None

    def targets(self, y: torch.Tensor) -> torch.Tensor:
        """The labels of the tokens this rank's logits cover (its cp chunks; every token under tp)."""
        lay = self.meshes.layout
        return local_targets(y, self.meshes.cp if lay.cp > 1 else None)

    def set_gradient_sync(self, sync: bool) -> None:
        """Gradient accumulation under FSDP: reduce-scatter after every micro-batch (the sharded fp32 gradients
        accumulate) and skip only HSDP's all-reduce over dp_replicate until the last one. Skipping the
        reduce-scatter instead would keep every layer's unsharded fp32 gradient until the last micro-batch: the
        dry run measured 22 GB per rank for grok-1 with 2 of its 64 layers.

        A distributed optimizer (`Layout.dp_mode` ``zero1``) is the other way round: the parameters stay gathered
        and the unsharded gradients accumulate (in fp32 under bf16 mixed precision: FSDP2 upcasts them to its
        reduce dtype) until the last micro-batch, which reduce-scatters them once. (A pipeline schedule does the
        same by itself for the FSDP stages it runs.)"""
        if not self.fsdp_units:
            return
        root = self.fsdp_units[-1]
        if self.meshes.layout.dp_mode == "zero1":
            root.set_requires_gradient_sync(sync, recurse=True)
            root.set_reshard_after_backward(sync, recurse=True)
        else:
            root.set_requires_all_reduce(sync, recurse=True)

    def clip_grad_norm_(self, max_norm: float, counter: CommCounter | None = None) -> float:
        """Sum the gradients still partial over tp (whole experts under tp × ep: once per step, not per
        micro-batch), then the global gradient norm over every rank's shards (each distinct element counted
        once), then clip."""
        self._sum_over_tp(counter)
        skip = self.pipeline.skip_in_norm() if self.pipeline else set()
        params = [p for p in self.model.parameters() if p.grad is not None]
        return clip_grad_norm_(params, max_norm, self.meshes.layout.pp, skip, counter)


    def _sum_over_tp(self, counter: CommCounter | None) -> None:
        if not self.tp_replicated:
            return
        local = [_local(p.grad) for m in self.tp_replicated for p in m.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in local])
        dist.all_reduce(flat, group=self.meshes.tp.get_group())
        parts = flat.split([g.numel() for g in local])
        torch._foreach_copy_(local, [f.view_as(g) for f, g in zip(parts, local, strict=True)])


def _local(g: torch.Tensor) -> torch.Tensor:
    return g._local_tensor if isinstance(g, DTensor) else g


def _copies(grad: torch.Tensor, ranks_per_stage: int) -> int:
    """How many ranks of a pipeline stage hold this same gradient shard."""
    if not isinstance(grad, DTensor):
        return ranks_per_stage
    # Anything neither replicated nor partial splits the tensor (Shard, and FSDP's _StridedShard over tp).
    distinct = math.prod(grad.device_mesh.size(i) for i, pl in enumerate(grad.placements)
                         if not (pl.is_replicate() or pl.is_partial()))
    return ranks_per_stage // distinct


def clip_grad_norm_(params: Iterable[nn.Parameter], max_norm: float, pp: int, skip: set[Any],
                    counter: CommCounter | None = None) -> float:
    per_stage = dist.get_world_size() // pp
    sq = torch.zeros((), dtype=torch.float64)
    grads = []
    for p in params:
        g = p.grad
        assert g is not None
        local = g.to_local() if isinstance(g, DTensor) else g
        grads.append(local)
        if p not in skip:
            sq += local.detach().double().pow(2).sum().cpu() / _copies(g, per_stage)
    device = grads[0].device if grads else torch.device("cpu")
    sq = sq.to(device)
    with counter.bookkeeping() if counter else _null():
        dist.all_reduce(sq)
    norm = float(sq.sqrt())
    coef = max_norm / (norm + 1e-6)
    if coef < 1:
        torch._foreach_mul_(grads, coef)
    return norm


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def parallelize(model: GrokModel, meshes: Meshes, device: torch.device, n_micro: int, micro_batch: int,
                seq_len: int, seed: int = 0, param_dtype: torch.dtype | None = None) -> Parallelized:
    """Apply the layout to `model` in place (or cut it into this rank's pipeline stage). A model built on the
    ``meta`` device is split there and only then gets memory: this rank's shards, initialised from (seed, name,
    global index) by `model.init.materialize`, so every layout starts from one process's weights. `param_dtype`
    bf16: FSDP gathers and computes in bf16 and reduces gradients in fp32 (`fsdp.mixed_precision`)."""
    out = apply_layout(model, meshes, device, n_micro, micro_batch, seq_len, param_dtype)
    materialize(out.model, model.spec, device, seed)
    return out


def apply_layout(model: GrokModel, meshes: Meshes, device: torch.device, n_micro: int, micro_batch: int,
                 seq_len: int, param_dtype: torch.dtype | None) -> Parallelized:
    """`parallelize` without allocating anything: a meta-device model stays on meta (the dry run allocates it
    under fake tensors afterwards)."""
    lay = meshes.layout
    cp_group = meshes.cp.get_group() if lay.cp > 1 else None
    if lay.pp == 1:
        if cp_group is not None:
            apply_cp(model, cp_group)
        units, experts = _apply_styles(model, meshes, device, param_dtype)
        return Parallelized(model, meshes, units, tp_replicated=experts)
    # pp > 1: cut into this rank's stages, then the other styles on each stage
    stages = split_model(model, lay, meshes.pp.get_local_rank(), seq_len)
    experts = []
    units = []
    for stage in stages:
        if cp_group is not None:
            stage.use_cp(cp_group)
        styled = _apply_styles(stage, meshes, device, param_dtype)  # type: ignore[arg-type]
        units += styled[0]
        experts += styled[1]
    # Stages exchange hidden states in the dtype they compute in: FSDP's param_dtype when FSDP applies.
    hidden = param_dtype if units and param_dtype is not None else torch.get_default_dtype()
    pipe = Pipeline(model, stages, lay, meshes, device, n_micro, micro_batch, seq_len, hidden)
    return Parallelized(model, meshes, pipeline=pipe, tp_replicated=experts)


def _apply_styles(model: GrokModel, meshes: Meshes, device: torch.device, param_dtype: torch.dtype | None,
                  ) -> tuple[list[FSDPModule], list[nn.Module]]:
    """Tensor (+ sequence) parallel, expert parallel, recompute, FSDP2, in that order, to a model or a stage.
    Returns the FSDP units and the expert modules whose gradients are still summed over tp (tp × ep)."""
    lay = meshes.layout
    if lay.tp > 1:
        apply_tp(model, meshes.tp, experts_whole=lay.ep > 1)
    experts: list[nn.Module] = []
    if lay.ep > 1:
        experts = apply_ep(model, meshes.ep, grad_scale=1.0 if lay.expert_fsdp else 1 / lay.ep)
    apply_recompute(model, lay.recompute)
    units: list[FSDPModule] = []
    if lay.dp_mode != "none":
        units = apply_fsdp(model, meshes, force_sum=device.type == "cpu", param_dtype=param_dtype)
    return units, experts if lay.tp > 1 else []
