"""Tensor parallelism with sequence parallelism (Megatron-LM style), on the unchanged `model` code.

Between blocks the residual stream is split along the sequence over the ``tp`` ranks, so norms and residual adds
run on 1/tp of the tokens. Each attention and MoE block all-gathers its input sequence, runs on its shard of the
weights (attention: q/k/v by output rows = heads, o by input columns; experts: gate/up by FFN columns, down by FFN
rows; the head counts come from the weights), and reduce-scatters its partial output back to sequence shards. That
is one all-gather and one reduce-scatter of a full activation per block forward, and the reverse in backward.

Weights every rank holds whole (norms, embedding, router) are Replicate DTensors. Where they only see this rank's
tokens their gradient is partial and is summed over ``tp`` in backward. The router is the exception: it runs on
the gathered sequence identically on every rank, so its weight gradient is already complete — provided the gate
gradient, which is partial because each rank holds part of every expert, is summed first; and since every rank
then sends the same router gradient into the gathered input, whose backward sums over ranks, that path is scaled
by 1/tp. Embedding and output head run replicated (no vocabulary split): the embedding output is sliced to this
rank's tokens and the logits come out for this rank's tokens only (`local_targets` slices the labels to match).
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Placement, Replicate, Shard, distribute_tensor

from gigafactory.model.grok import Attention, Block, DenseFFN, GrokModel, MoE, RMSNorm, _AuxLossGrad
from gigafactory.parallel._local import use_local_params, wrap_io
from gigafactory.parallel.comm import all_reduce_grad, gather_seq, scale_grad, scatter_seq


def distribute_param(module: nn.Module, name: str, mesh: DeviceMesh, placement: Placement) -> None:
    """Replace a parameter by a DTensor on `mesh`; every rank holds the same full tensor, so no communication."""
    p = module._parameters[name]
    assert p is not None
    dt = distribute_tensor(p.detach(), mesh, [placement], src_data_rank=None)
    module.register_parameter(name, nn.Parameter(dt, requires_grad=p.requires_grad))


def seq_slice(x: Tensor, group: dist.ProcessGroup, dim: int = 1) -> Tensor:
    n, r = group.size(), group.rank()
    if x.shape[dim] % n:
        raise ValueError(f"sequence length {x.shape[dim]} is not divisible by tp={n}")
    return x.narrow(dim, r * (x.shape[dim] // n), x.shape[dim] // n)


def apply_tp(model: GrokModel, mesh: DeviceMesh, experts_whole: bool = False) -> None:
    """Split `model` over `mesh`. ``experts_whole`` (expert parallelism on as well): experts are not split by tp
    but left to `parallel.expert`, and the MoE block runs on this rank's tokens (`moe_on_local_tokens`)."""
    group = mesh.get_group()
    tp = mesh.size()
    col, row, rep = Shard(0), Shard(1), Replicate()

    # Root: embedding (and head) and the final norm are replicated, read locally for the whole forward because
    # the tied output head reads `embed.weight` outside the embedding module.
    # A pipeline stage holds only some of them (`parallel.pipeline.StageModule`).
    root_params = [(m, "weight") for m in (model.embed, model.norm, model.lm_head) if m is not None]
    for mod, name in root_params:
        distribute_param(mod, name, mesh, rep)
    if root_params:
        use_local_params(model, root_params, reduce_group=group)
    if model.embed is not None:
        wrap_io(model.embed, after=lambda h: seq_slice(h, group))

    for block in model.layers.values():
        assert isinstance(block, Block)
        norms = [m for m in block.children() if isinstance(m, RMSNorm)]
        for norm in norms:
            distribute_param(norm, "weight", mesh, rep)
            use_local_params(norm, [(norm, "weight")], reduce_group=group)

        attn = block.attn
        assert isinstance(attn, Attention)
        for lin, place in ((attn.q_proj, col), (attn.k_proj, col), (attn.v_proj, col), (attn.o_proj, row)):
            distribute_param(lin, "weight", mesh, place)
        use_local_params(attn, [(m, "weight") for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)])
        wrap_io(attn, before=lambda x: gather_seq(x, group), after=lambda y: scatter_seq(y, group))

        moe = block.moe
        assert isinstance(moe, MoE)
        distribute_param(moe.router, "weight", mesh, rep)
        if experts_whole:
            moe.forward = types.MethodType(  # type: ignore[method-assign]
                lambda self, x: moe_on_local_tokens(self, x, group), moe
            )
            use_local_params(moe, [(moe.router, "weight")])
        else:
            ex = moe.experts
            for name, place in (("w_gate", Shard(2)), ("w_up", Shard(2)), ("w_down", Shard(1))):
                distribute_param(ex, name, mesh, place)
            use_local_params(moe, [(moe.router, "weight")] + [(ex, n) for n in ("w_gate", "w_up", "w_down")])
            wrap_io(moe, before=lambda x: gather_seq(x, group), after=lambda y: scatter_seq(y, group))
            _split_router_grads(moe, group, tp)

        if block.dense is not None:
            dense = block.dense
            assert isinstance(dense, DenseFFN)
            for lin, place in ((dense.gate, col), (dense.up, col), (dense.down, row)):
                distribute_param(lin, "weight", mesh, place)
            use_local_params(dense, [(m, "weight") for m in (dense.gate, dense.up, dense.down)])
            wrap_io(dense, before=lambda x: gather_seq(x, group), after=lambda y: scatter_seq(y, group))


def _split_router_grads(moe: MoE, group: dist.ProcessGroup, tp: int) -> None:
    """See the module doc: sum the partial gate gradients, scale the router's input gradient by 1/tp."""
    route, dispatch = moe.route, moe.dispatch_compute

    def tp_route(self: MoE, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return route(scale_grad(x, 1 / tp))

    def tp_dispatch(self: MoE, x: Tensor, gates: Tensor, idx: Tensor) -> Any:
        return dispatch(x, all_reduce_grad(gates, group), idx)

    moe.route = types.MethodType(tp_route, moe)  # type: ignore[method-assign]
    moe.dispatch_compute = types.MethodType(tp_dispatch, moe)  # type: ignore[method-assign]


def moe_on_local_tokens(moe: MoE, x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """`MoE.forward` under tp × ep with whole experts: the router (and its per-sequence auxiliary loss) sees the
    gathered sequence, identically on every tp rank, while only this rank's sequence slice is dispatched to the
    experts, so the output stays sequence-sharded with no reduce-scatter.

    Gradients, as in `_split_router_grads`: the gates' gradient is partial (each rank used its slice) and is
    summed over tp first, which makes the router's weight gradient complete on every rank; the router's input
    gradient, then identical on every rank, is scaled by 1/tp before the gather's backward sums it."""
    tp, r = group.size(), group.rank()
    b, tl, d = x.shape
    full = gather_seq(x, group)
    t = full.shape[1]
    logits, gates, idx = moe.route(scale_grad(full, 1 / tp).reshape(-1, d))
    gates = all_reduce_grad(gates, group)

    def mine(z: Tensor) -> Tensor:
        return z.view(b, t, -1)[:, r * tl : (r + 1) * tl].reshape(b * tl, -1)

    y = moe.dispatch_compute(x.reshape(-1, d), mine(gates), mine(idx)).view(b, tl, d)
    if moe.training and torch.is_grad_enabled() and (moe.lb_weight or moe.z_weight):
        y = _AuxLossGrad.apply(y, moe._aux_loss(logits.view(b, t, -1), idx.view(b, t, -1)))
    return y


def local_targets(y: Tensor, mesh: DeviceMesh | None, cp_mesh: DeviceMesh | None = None) -> Tensor:
    """The labels of this rank's tokens: its context-parallel chunks (`parallel.context.cp_indices`), then its
    slice under sequence parallelism (the logits only cover those)."""
    if cp_mesh is not None and cp_mesh.size() > 1:
        from gigafactory.parallel.context import cp_indices

        y = y[:, cp_indices(y.shape[1], cp_mesh.size(), cp_mesh.get_local_rank(), y.device)]
    return y if mesh is None or mesh.size() == 1 else seq_slice(y, mesh.get_group())
