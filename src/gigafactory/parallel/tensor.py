"""Tensor parallelism with sequence parallelism (Megatron-LM style), on the unchanged `model` code.

Between blocks the residual stream is split along the sequence over the ``tp`` ranks, so norms and residual adds
run on 1/tp of the tokens. Each attention and MoE block all-gathers its input sequence, runs on its shard of the
weights (attention: q/k/v by output rows = heads, o by input columns; experts: gate/up by FFN columns, down by FFN
rows; the head counts come from the weights), and reduce-scatters its partial output back to sequence shards. That
is one all-gather and one reduce-scatter of a full activation per block forward, and the reverse in backward.

Weights every rank holds whole (norms, router) are Replicate DTensors. Where they only see this rank's
tokens their gradient is partial and is summed over ``tp`` in backward. The router is the exception: it runs on
the gathered sequence identically on every rank, so its weight gradient is already complete — provided the gate
gradient, which is partial because each rank holds part of every expert, is summed first; and since every rank
then sends the same router gradient into the gathered input, whose backward sums over ranks, that path is scaled
by 1/tp.

The vocabulary is split over tp (Megatron-LM's vocab-parallel embedding, head and cross entropy): the embedding
(and an untied head) holds vocabulary rows r·V/tp … (r+1)·V/tp. The embedding looks up the whole sequence's
tokens in its rows (others give zeros) and reduce-scatters the partial sums to sequence shards; the head
all-gathers the final norm's output and computes the logits of every token for its vocabulary columns;
`cross_entropy` combines the shards with all-reduces of a max, a sum of exponentials and the target logit per
token (fp32), and its backward needs no communication. So every tp rank has the loss of all tokens, and the labels
are not sliced over tp (`local_targets`). The multipliers and the final soft-cap act element-wise on the shards.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
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


def apply_tp(model: GrokModel, mesh: DeviceMesh, experts_whole: bool = False) -> None:
    """Split `model` over `mesh`. ``experts_whole`` (expert parallelism on as well): experts are not split by tp
    but left to `parallel.expert`, and the MoE block runs on this rank's tokens (`moe_on_local_tokens`)."""
    group = mesh.get_group()
    tp = mesh.size()
    col, row, rep = Shard(0), Shard(1), Replicate()

    # Root: embedding and head split by vocabulary rows, the final norm replicated; read locally for the whole
    # forward because the tied output head reads `embed.weight` outside the embedding module.
    # A pipeline stage holds only some of them (`parallel.pipeline.StageModule`).
    vocab = [(m, "weight") for m in (model.embed, model.lm_head) if m is not None]
    for mod, name in vocab:
        distribute_param(mod, name, mesh, col)
    if vocab:
        use_local_params(model, vocab)
    if model.norm is not None:
        distribute_param(model.norm, "weight", mesh, rep)
        use_local_params(model, [(model.norm, "weight")], reduce_group=group)
        wrap_io(model.norm, after=lambda h: gather_seq(h, group))  # the head sees every token
    if model.embed is not None:
        model.embed.forward = types.MethodType(  # type: ignore[method-assign]
            lambda self, tokens: vocab_embedding(self.weight, tokens, group), model.embed)

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


def vocab_embedding(weight: Tensor, tokens: Tensor, group: dist.ProcessGroup) -> Tensor:
    """Look up every token in this rank's vocabulary rows `weight` (zeros for the others' tokens), then sum the
    ranks' partial embeddings and keep this rank's sequence slice (one reduce-scatter; all-gather in backward)."""
    rows = weight.shape[0]
    local = tokens - group.rank() * rows
    mine = (local >= 0) & (local < rows)
    h = F.embedding(local.clamp(0, rows - 1), weight) * mine[..., None].to(weight.dtype)
    # contiguous: the residual stream would otherwise keep the reduce-scatter's permuted strides to the pipeline's
    # sends, which need contiguous tensors
    return scatter_seq(h, group).contiguous()


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token cross entropy of logits [N, V/tp] split by vocabulary over `group`, labels [N] (global ids)."""

    @staticmethod
    def forward(ctx: Any, logits: Tensor, target: Tensor, group: dist.ProcessGroup) -> Tensor:  # type: ignore[override]
        cols = logits.shape[-1]
        top = logits.amax(-1)
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        local = target - group.rank() * cols
        mine = (local >= 0) & (local < cols)
        local = local.clamp(0, cols - 1)
        picked = (logits.gather(1, local[:, None])[:, 0] - top) * mine  # the target's shifted logit, or 0
        exp = (logits - top[:, None]).exp_()  # one logit-sized buffer besides the logits (as log_softmax)
        sums = torch.stack([exp.sum(-1), picked])
        dist.all_reduce(sums, group=group)
        exp /= sums[0][:, None]  # this rank's columns of the softmax: all backward needs
        ctx.save_for_backward(exp, local, mine)
        return sums[0].log() - sums[1]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        probs, local, mine = ctx.saved_tensors
        out = probs * grad[:, None]
        out.scatter_add_(1, local[:, None], -(grad * mine)[:, None])
        return out, None, None


def cross_entropy(logits: Tensor, target: Tensor, group: dist.ProcessGroup | None = None,
                  reduction: str = "mean") -> Tensor:
    """Cross entropy of logits [..., V] (or [..., V/tp], this rank's vocabulary columns, with `group` the tp
    group) against global labels [...]: `F.cross_entropy` without tp, the vocab-parallel form with it."""
    logits, target = logits.flatten(0, -2).float(), target.flatten()
    if group is None or group.size() == 1:
        return F.cross_entropy(logits, target, reduction=reduction)
    loss = _VocabParallelCrossEntropy.apply(logits, target, group)
    return loss.sum() if reduction == "sum" else loss.mean()


def local_targets(y: Tensor, cp_mesh: DeviceMesh | None = None) -> Tensor:
    """The labels of this rank's tokens: its context-parallel chunks (`parallel.context.cp_indices`). Under tp
    every rank scores every token (for its vocabulary columns), so nothing is sliced over tp."""
    if cp_mesh is not None and cp_mesh.size() > 1:
        from gigafactory.parallel.context import cp_indices

        y = y[:, cp_indices(y.shape[1], cp_mesh.size(), cp_mesh.get_local_rank(), y.device)]
    return y
