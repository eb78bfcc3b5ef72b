"""Context parallelism: the sequence split over ``cp`` ranks, attention by all-gathering K/V (Llama 3's method,
which suits grouped-query attention: K/V are the small tensors).

Causal load balance: the sequence is cut into 2·cp chunks and rank r holds chunks r and 2·cp−1−r (mirrored), so
every rank has the same share of the causal triangle (Llama 3, torchtitan). Each rank keeps its tokens' integer
positions; RoPE uses them, so rotary embeddings are exact. Attention sees all keys through `CPKeys`, which plays the
model's KV-cache role (`model.grok.KVCacheLike`): `begin` gathers the key positions and padding flags of the whole
sequence, from which `attend` masks by positions alone — a query attends a key iff (key_pos <= query_pos and the
key is not padding) or key_pos == query_pos — and `update` all-gathers K and V (backward: reduce-scatter of their
gradients). The soft-cap is applied to every score as before. The model code is unchanged.

The MoE's per-sequence load-balancing loss needs statistics of the whole sequence: each rank's per-expert sums are
all-reduced over cp before the loss is formed (`cp_aux_loss`). Parameters are replicated over cp; FSDP shards them
over dp_shard·cp and sums their gradients over cp (`parallel.fsdp`).
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from gigafactory.model.grok import PAD_ID, GrokModel, MoE, routed_counts
from gigafactory.parallel.comm import gather_seq


def cp_indices(seq_len: int, cp: int, rank: int, device: torch.device | None = None) -> Tensor:
    """Sequence positions rank `rank` holds: chunks r and 2·cp−1−r of 2·cp equal chunks."""
    if seq_len % (2 * cp):
        raise ValueError(f"sequence length {seq_len} is not divisible by 2·cp = {2 * cp}")
    c = seq_len // (2 * cp)
    first = torch.arange(rank * c, (rank + 1) * c, device=device)
    second = torch.arange((2 * cp - 1 - rank) * c, (2 * cp - rank) * c, device=device)
    return torch.cat([first, second])


def _gather_plain(t: Tensor, group: dist.ProcessGroup) -> Tensor:
    """All-gather along dim 1 without autograd (positions, padding flags)."""
    parts = [torch.empty_like(t) for _ in range(group.size())]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=1)


class CPKeys:
    """The keys and values of the whole sequence for attention on this rank's queries (see the module doc)."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group

    def begin(self, tokens: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """Positions [B, S] and padding flags [B, S] of all keys; `model.attention.attend` applies the rule."""
        key_pos = _gather_plain(positions, self.group)
        key_ok = _gather_plain((tokens != PAD_ID).to(torch.uint8), self.group).bool()
        return key_pos, key_ok

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return gather_seq(k, self.group, dim=2), gather_seq(v, self.group, dim=2)


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) forward; identity backward: every rank forms the same loss from the sum, and each rank's
    part of the gradient flows into its own summands."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: dist.ProcessGroup) -> Tensor:  # type: ignore[override]
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad, None


def cp_aux_loss(moe: MoE, logits: Tensor, idx: Tensor, group: dist.ProcessGroup) -> Tensor:
    """`MoE._aux_loss` with the per-sequence statistics of the whole sequence. The load-balancing term is
    weighted by cp because FSDP divides the summed gradients by dp·cp; the router z-loss is a per-token mean,
    which that division already averages."""
    cp = group.size()
    n_tok = logits.shape[1] * cp
    probs = logits.softmax(-1)
    counts = routed_counts(idx, moe.n_experts).sum(1)  # [B, E] routed slots of this rank's tokens
    dist.all_reduce(counts, group=group)
    share = counts / (n_tok * moe.top_k)
    mean_prob = _SumOverRanks.apply(probs.sum(1), group) / n_tok
    lb = (moe.n_experts * (share * mean_prob).sum(-1)).mean()
    z = torch.logsumexp(logits, -1).pow(2).mean()
    moe.last_stats = {"lb_loss": lb.detach(), "z_loss": z.detach()}
    return (moe.lb_weight * lb * cp + moe.z_weight * z) * moe.aux_scale


def apply_cp_aux(model: Any, group: dist.ProcessGroup) -> None:
    for moe in model.moe_layers():
        moe._aux_loss = types.MethodType(  # type: ignore[method-assign]
            lambda self, logits, idx: cp_aux_loss(self, logits, idx, group), moe
        )


def apply_cp(model: GrokModel, group: dist.ProcessGroup) -> None:
    """The model takes whole sequences [B, T] and returns logits for this rank's positions
    (`cp_indices`; `local_targets` selects the matching labels)."""
    apply_cp_aux(model, group)
    inner = model.forward
    cp, rank = group.size(), group.rank()

    def forward(self: GrokModel, tokens: Tensor) -> Tensor:
        b, t = tokens.shape
        idx = cp_indices(t, cp, rank, tokens.device)
        return inner(tokens[:, idx], positions=idx.expand(b, -1), cache=CPKeys(group))

    model.forward = types.MethodType(forward, model)  # type: ignore[method-assign]
