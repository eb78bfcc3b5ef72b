"""Pipeline parallelism with `torch.distributed.pipelining`: one stage per ``pp`` rank, GPipe or 1F1B.

A stage is the same `GrokModel` object with the layers of other stages deleted (layers are a ModuleDict keyed by
layer number, so parameter names — and checkpoints — do not change) and its forward replaced by the slice of the
model's forward it runs. With tied embeddings the last stage keeps its own copy of the embedding for the output
head; the two copies' gradients are summed after backward so they stay identical (Megatron-LM does the same).

Later stages rebuild the causal mask from the shape alone: training windows are corpus text, which never holds
the padding id, so the mask the first stage would send is exactly causal. The MoE auxiliary-loss gradients are
injected inside each stage's backward (`model.grok._AuxLossGrad`), so stages exchange hidden states only.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from gigafactory.model.grok import GrokModel, key_positions, rope_tables
from gigafactory.specs.layout import Layout


def stage_layers(n_layers: int, pp: int, stage: int) -> list[int]:
    """Contiguous, as even as possible; earlier stages take the remainder (the last also runs the head)."""
    base, extra = divmod(n_layers, pp)
    start = stage * base + min(stage, extra)
    return list(range(start, start + base + (1 if stage < extra else 0)))


def make_stage(model: GrokModel, stage: int, pp: int) -> GrokModel:
    first, last = stage == 0, stage == pp - 1
    keep = {str(i) for i in stage_layers(model.spec.n_layers, pp, stage)}
    for name in list(model.layers.keys()):
        if name not in keep:
            del model.layers[name]
    tied = model.lm_head is None
    if not first and not (last and tied):
        model.embed = None  # type: ignore[assignment]
    if not last:
        model.norm = None  # type: ignore[assignment]
        model.lm_head = None

    def forward(self: GrokModel, x: Tensor) -> Tensor:
        if first:
            keys = key_positions(x)
            h = self.embed(x) * self.spec.embedding_multiplier
        else:
            keys = key_positions(torch.ones(x.shape[:2], dtype=torch.long, device=x.device))
            h = x
        cos, sin = rope_tables(keys.q_pos, self.spec.head_dim, self.spec.rope_theta)
        for block in self.layers.values():
            h = block(h, cos, sin, keys, None)
        return self.output(h) if last else h

    model.forward = types.MethodType(forward, model)  # type: ignore[method-assign]
    return model


class Pipeline:
    """The stage, its schedule, and the tied-embedding group for one pp rank."""

    def __init__(self, model: GrokModel, layout: Layout, group: dist.ProcessGroup, device: torch.device,
                 n_micro: int, micro_batch: int, seq_len: int) -> None:
        self.pp, self.stage_index = group.size(), group.rank()
        self.first, self.last = self.stage_index == 0, self.stage_index == self.pp - 1
        self.group = group
        self.n_micro = n_micro
        self.model = make_stage(model, self.stage_index, self.pp)
        spec = model.spec
        # Hidden states are marked as needing gradients, or the stages exchange none in backward.
        hidden = torch.empty(micro_batch, seq_len, spec.d_model, device=device, requires_grad=True)
        inp = torch.zeros(micro_batch, seq_len, dtype=torch.long, device=device) if self.first else hidden
        out = torch.empty(micro_batch, seq_len, spec.vocab_size, device=device) if self.last else hidden
        # Shapes given up front: no shape-inference round trip on the first step.
        self.stage = PipelineStage(self.model, self.stage_index, self.pp, device, input_args=(inp,),
                                   output_args=(out,), group=group)
        cls = ScheduleGPipe if layout.pp_schedule == "gpipe" else Schedule1F1B
        # Each micro-batch loss is divided by n_micro here (as the single-process trainer divides by grad_accum)
        # instead of letting the schedule rescale gradients, so the MoE aux_scale = 1/grad_accum stays right.
        self.schedule = cls(self.stage, n_microbatches=n_micro, loss_fn=self._loss, scale_grads=False)
        ranks = dist.get_process_group_ranks(group)
        # Every rank must take part in creating a group, even one it is not in.
        self.tied_group = dist.new_group([ranks[0], ranks[-1]]) if model.lm_head is None and self.pp > 1 else None

    def _loss(self, logits: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(logits.flatten(0, 1).float(), target.flatten()) / self.n_micro

    def step(self, x: Tensor, y: Tensor) -> Tensor | None:
        """Forward and backward of all micro-batches (x, y hold them stacked); the mean loss on the last stage."""
        losses: list[Tensor] = []
        if self.first:
            self.schedule.step(x)
        elif self.last:
            self.schedule.step(target=y, losses=losses)
        else:
            self.schedule.step()
        return torch.stack(losses).sum().detach() if self.last else None

    def sync_tied_grads(self) -> None:
        if self.tied_group is None or not (self.first or self.last):
            return
        g = self.model.embed.weight.grad
        if g is not None:
            dist.all_reduce(g, group=self.tied_group)

    def skip_in_norm(self) -> set[Any]:
        """The last stage's copy of a tied embedding is not counted twice in the gradient norm."""
        if self.tied_group is not None and self.last and not self.first:
            return {self.model.embed.weight}
        return set()

    @torch.no_grad()
    def forward_only(self, x: Tensor) -> Tensor | None:
        """Evaluation: plain send/recv of hidden states through the stages; logits on the last stage."""
        h: Tensor = x
        if not self.first:
            d = self.model.spec.d_model
            h = torch.empty(x.shape[0], x.shape[1], d, device=x.device)
            dist.recv(h, group=self.group, group_src=self.stage_index - 1)
        out = self.model(h)
        if not self.last:
            dist.send(out.contiguous(), group=self.group, group_dst=self.stage_index + 1)
            return None
        return out
