"""Activation checkpointing and FSDP2 (`fully_shard`) over the data-parallel mesh dimensions.

Each block is one FSDP unit (its parameters are gathered just before it runs and freed after), the root holds the
embedding and the final norm. Experts under expert parallelism are their own unit over ``efsdp``: their ``ep``
split is already a DTensor dimension, and FSDP shards the rest.

With dp_shard·cp = 1 and dp_replicate > 1 (`Layout.dp_mode` ``zero1``) FSDP2 over dp_replicate, with parameters
kept gathered from the first forward to the last backward of a step, is a distributed optimizer (ZeRO-1, as
Megatron-LM's): bf16 weights and fp32 gradients whole through the step, fp32 master weights and Adam state
sharded, one gather and one reduce-scatter per step.

Gradient reduction is pinned down explicitly rather than left to defaults: sums on the wire with one division by
the data-parallel size afterwards. On gloo the averaging path has silently produced wrong gradients in some
releases; the multi-process tests compare gradients with a single process to catch any such regression.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Shard
from torch.utils.checkpoint import checkpoint

from gigafactory.model.grok import DenseFFN, Experts, GrokModel, RMSNorm
from gigafactory.parallel.mesh import Meshes


def apply_recompute(model: GrokModel, mode: str) -> None:
    """``full``: recompute each block in backward. ``selective``: what the planner's ``selective`` models under a
    fused attention (Megatron-Core's ``--recompute-modules layernorm moe_act``, docs/plan.md): each RMSNorm (eager in
    fp32, it would keep two fp32 copies of its input) and each gated activation (`model.grok.gated_gelu`) are redone
    in backward from their inputs. Attention is not recomputed: every attention path keeps memory linear in the
    sequence (fused, block-wise; `model.attention`), so recomputing its core would save ~2 bytes per head
    dimension for an extra attention forward, and recomputing the whole module (as this did before) re-ran its
    projections and, under tensor parallelism, its sequence all-gather in every backward (docs/train.md)."""
    if mode == "none":
        return
    for block in model.layers.values():
        if mode == "full":
            _checkpoint_forward(block)
            continue
        for module in block.modules():
            if isinstance(module, RMSNorm):
                _checkpoint_forward(module)
            elif isinstance(module, (Experts, DenseFFN)):
                module.recompute_act = True


def _checkpoint_forward(module: nn.Module) -> None:
    inner = module.forward

    def forward(self: nn.Module, *args: Any) -> Any:
        return checkpoint(inner, *args, use_reentrant=False)

    module.forward = types.MethodType(forward, module)  # type: ignore[method-assign]


def mixed_precision(param_dtype: torch.dtype | None) -> MixedPrecisionPolicy:
    """bf16 training: parameters gathered and computed in bf16, gradients reduced in fp32 into fp32 master
    weights (the optimizer never sees bf16). fp32 training: FSDP's default (no casts)."""
    if param_dtype is None or param_dtype == torch.float32:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)


def expert_shard_dims(model: GrokModel, shards: int) -> Callable[[nn.Parameter], Shard | None]:
    """FSDP shards expert weights along d_model, not dimension 0, when d_model splits evenly over the `shards`
    ranks (FSDP2 shards other dimensions only evenly). Dimension 0 is the expert count (8 for Grok, 2 per rank
    under ep=4): sharding it over many ranks leaves each holding a whole expert or nothing, which the dry run
    measured as ~100× the planner's per-rank expert bytes for grok-2 at 20,000 GPUs. d_model is never split by
    tensor parallelism (gate/up split the FFN columns, down the FFN rows)."""
    dims: dict[nn.Parameter, Shard] = {}
    for m in model.modules():
        if isinstance(m, Experts) and m.w_gate.dim() == 3 and m.w_gate.shape[1] % shards == 0:
            dims[m.w_gate] = dims[m.w_up] = Shard(1)  # [E, d_model, ffn]
            dims[m.w_down] = Shard(2)  # [E, ffn, d_model]
    return lambda p: dims.get(p)


def flatten_experts(experts: Experts, shards: int) -> None:
    """Where d_model does not split evenly over the `shards` ranks (grok-2's seed plans: 8,192 over 250), store
    the expert weights 2-D, each [E·d_model, ffn] (w_down transposed), so that FSDP shards their dimension 0:
    FSDP2 (torch 2.13) pads an uneven dimension 0 (here by 0.7%) but refuses uneven shards of any other dimension.
    The rows of one expert stay contiguous, so expert parallelism's Shard(0) still gives each ep rank whole
    experts, and tensor parallelism splits dimension 1 (ffn) of all three. `Experts.forward` views them back;
    `model.init` fills them with the 3-D weights' values. Checkpoints of such a layout hold the 2-D shapes."""
    if experts.w_gate.dim() != 3 or experts.w_gate.shape[1] % shards == 0:
        return
    for name in ("w_gate", "w_up", "w_down"):
        p = experts._parameters[name]
        assert p is not None
        w = p.detach().transpose(1, 2) if name == "w_down" else p.detach()
        experts.register_parameter(name, nn.Parameter(w.flatten(0, 1).contiguous(), requires_grad=p.requires_grad))


def apply_fsdp(model: GrokModel, meshes: Meshes, force_sum: bool,
               param_dtype: torch.dtype | None = None) -> list[FSDPModule]:
    mp = mixed_precision(param_dtype)
    lay = meshes.layout
    dp = lay.dp_replicate * lay.dp_shard * lay.cp  # cp ranks each scored their own part of the tokens
    units: list[FSDPModule] = []
    expert_fsdp = lay.expert_fsdp
    # zero1: parameters gathered once per step and kept through every micro-batch's backward (`Parallelized.
    # set_gradient_sync` keeps them and the unsharded gradients until the last one), only the fp32 master
    # weights and the optimizer state sharded
    keep = {"reshard_after_forward": False} if lay.dp_mode == "zero1" else {}
    expert_params: set[nn.Parameter] = set()
    for block in model.layers.values():
        if lay.ep > 1:
            ex = block.moe.experts  # type: ignore[union-attr]
            if expert_fsdp:
                mesh = meshes.fsdp(experts=True)
                flatten_experts(ex, mesh.shape[-1])  # type: ignore[arg-type]
                units.append(fully_shard(ex, mesh=mesh, mp_policy=mp,
                                         shard_placement_fn=expert_shard_dims(model, mesh.shape[-1])))
            else:
                expert_params.update(ex.parameters())  # type: ignore[arg-type]
    dense_mesh = meshes.fsdp()
    for block in model.layers.values():
        if lay.ep == 1:
            flatten_experts(block.moe.experts, dense_mesh.shape[-1])  # type: ignore[union-attr,arg-type]
        units.append(fully_shard(block, mesh=dense_mesh, ignored_params=expert_params or None, mp_policy=mp,
                                 shard_placement_fn=expert_shard_dims(model, dense_mesh.shape[-1]), **keep))
    units.append(fully_shard(model, mesh=dense_mesh, ignored_params=expert_params or None, mp_policy=mp, **keep))
    for unit in units:
        unit.set_gradient_divide_factor(float(dp))
        if force_sum:
            unit.set_force_sum_reduction_for_comms(True)
    return units
