"""Expert parallelism: experts split over the ``ep`` ranks, tokens sent to them with `all_to_all_single`.

Two dispatches, chosen by `MoE.capacity_factor` (the training option ``moe_capacity_factor``):
- Dropless (None, the default): every routed token copy reaches its expert, however uneven the routing, because
  the split sizes are exchanged first (a small all-to-all of per-expert counts) and the token all-to-all uses
  those uneven splits. The host must read those sizes (``.tolist()``): on a GPU that is one device-to-host
  synchronisation per MoE layer per micro-batch (and `bincount`/`repeat_interleave` are data-dependent too).
- Capacity (a factor f): each rank sends every expert exactly C = ⌈f·tokens·top_k/E⌉ zero-padded slots
  (`MoE.capacity_dispatch`, `specs.moe.expert_capacity`), dropping the copies beyond C. Split sizes follow from
  the tokens' shape alone, so `all_to_all_single` (NCCL's included) runs with host-known static splits and the
  layer never waits for the device; the cost is the padding's bytes and compute, and the dropped copies.
Rank r holds experts [r·E/ep, (r+1)·E/ep) as a Shard(0) DTensor over ``ep`` (so checkpoints keep the global
[E, in, out] shape). The math is `MoE.dispatch_compute`'s: sort copies by expert, run the experts, weight by the
gates, scatter back; only where the experts run changes.

Gradient scale: a rank's expert gradient sums the contributions of every rank whose tokens it served, each from a
loss averaged over that rank's share of the batch. Under FSDP over ``efsdp`` the reduce-scatter sums the rest and
divides by the whole data-parallel size (`parallel.fsdp`); without it (dp_shard == ep) the ep ranks *are* all the
data-parallel ranks and the gradient is scaled by 1/ep here.
"""

from __future__ import annotations

import types

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard

from gigafactory.model.grok import GrokModel, MoE, combine
from gigafactory.parallel._local import use_local_params
from gigafactory.parallel.comm import all_to_all
from gigafactory.parallel.tensor import distribute_param


def ep_dispatch_compute(moe: MoE, x: Tensor, gates: Tensor, idx: Tensor, group: dist.ProcessGroup) -> Tensor:
    if moe.capacity_factor is not None:
        return moe.capacity_dispatch(x, gates, idx, lambda rows, cap: _ep_run_slots(moe, rows, cap, group))
    ep = group.size()
    n_local = moe.n_experts // ep
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    token_of = order // moe.top_k
    counts = torch.bincount(flat, minlength=moe.n_experts)
    # recv_counts[j, e]: copies rank j sends to my local expert e
    recv_counts = torch.empty_like(counts)
    dist.all_to_all_single(recv_counts, counts, group=group)
    in_splits = counts.view(ep, n_local).sum(1).tolist()
    recv_counts = recv_counts.view(ep, n_local)
    out_splits = recv_counts.sum(1).tolist()
    recv = all_to_all(x[token_of], out_splits, in_splits, group)
    # Received rows come grouped by source rank, then expert; the experts want them grouped by expert.
    expert_of = torch.repeat_interleave(torch.arange(n_local, device=x.device).repeat(ep), recv_counts.reshape(-1))
    perm = torch.argsort(expert_of, stable=True)
    out_sorted = moe.experts(recv[perm], recv_counts.sum(0).tolist())
    out_recv = torch.empty_like(out_sorted).index_copy(0, perm, out_sorted)
    out = all_to_all(out_recv, in_splits, out_splits, group)
    return combine(out, gates, order)


def _ep_run_slots(moe: MoE, rows: Tensor, cap: int, group: dist.ProcessGroup) -> Tensor:
    """The experts over `group` on slot rows [E·C, d] (expert-major, so rank r's experts are one contiguous block
    of n_local·C rows): equal static splits there and back, no counts exchanged."""
    ep = group.size()
    n_local = moe.n_experts // ep
    splits = [n_local * cap] * ep
    recv = all_to_all(rows, splits, splits, group)  # [ep sources, n_local, C] → grouped by local expert below
    grouped = recv.view(ep, n_local, cap, -1).transpose(0, 1).reshape(n_local * ep * cap, -1)
    out = moe.experts(grouped, torch.full((n_local,), ep * cap, device=rows.device))
    back = out.view(n_local, ep, cap, -1).transpose(0, 1).reshape(ep * n_local * cap, -1)
    return all_to_all(back, splits, splits, group)


def apply_ep(model: GrokModel, mesh: DeviceMesh, grad_scale: float) -> list[nn.Module]:
    """Split the experts over `mesh`; returns the expert modules (under tp × ep they are whole on every tp rank,
    and their gradients still need summing over tp: `Parallelized.clip_grad_norm_` does it once per step)."""
    group = mesh.get_group()
    modules: list[nn.Module] = []
    for moe in model.moe_layers():
        ex = moe.experts
        for name in ("w_gate", "w_up", "w_down"):
            distribute_param(ex, name, mesh, Shard(0))
        use_local_params(ex, [(ex, n) for n in ("w_gate", "w_up", "w_down")], grad_scale=grad_scale)
        modules.append(ex)
        moe.dispatch_compute = types.MethodType(  # type: ignore[method-assign]
            lambda self, x, gates, idx: ep_dispatch_compute(self, x, gates, idx, group), moe
        )
    return modules
