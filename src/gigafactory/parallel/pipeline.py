"""Pipeline parallelism with `torch.distributed.pipelining`, composed with FSDP/HSDP, TP, EP on one mesh.

Schedules (``Layout.pp_schedule``): GPipe, 1F1B, interleaved 1F1B with ``pp_virtual`` stages per rank, and
zero-bubble (`ScheduleInterleavedZeroBubble`, ZB1P: the weight-gradient half of each backward fills the bubbles;
one or more stages per rank). Stages are placed round-robin ("loop"): rank r holds stages r, r+pp, r+2·pp, ...

A stage is a `StageModule` over the same layer objects as the model (layers are a ModuleDict keyed by layer
number, so parameter names — and checkpoints — do not change); the model itself keeps only this rank's layers and
is what the optimizer and checkpoints see. Each stage gets the other parallel styles on its own (TP, EP, FSDP
with the stage as FSDP root), as torchtitan does per model part. With tied embeddings the last stage keeps its own
copy of the embedding for the output head; after each step the two copies' gradients (the same FSDP shard on the
first and last pipeline rank of each data/tensor-parallel coordinate) are summed so they stay identical.

Later stages rebuild the key positions from the sequence length: training windows are corpus text, which never
holds the padding id, so what the first stage would send is exactly causal. The MoE auxiliary-loss gradients
are injected inside each stage's backward (`model.grok._AuxLossGrad`), so stages exchange hidden states only.
Under TP (and CP) the hidden states between stages are this rank's part of the sequence.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    schedules,
)
from torch.distributed.tensor import DTensor

from gigafactory.model.grok import GrokModel, KeyPositions, MoE, key_positions, rope_tables
from gigafactory.parallel.context import CPKeys, apply_cp_aux, cp_indices
from gigafactory.parallel.tensor import cross_entropy, local_targets
from gigafactory.specs.layout import Layout

_SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved": ScheduleInterleaved1F1B,
              "zero_bubble": ScheduleInterleavedZeroBubble}


def stage_layers(n_layers: int, n_stages: int, stage: int) -> list[int]:
    """Contiguous, as even as possible; earlier stages take the remainder (the last also runs the head)."""
    base, extra = divmod(n_layers, n_stages)
    start = stage * base + min(stage, extra)
    return list(range(start, start + base + (1 if stage < extra else 0)))


def rank_stages(pp: int, virtual: int, rank: int) -> list[int]:
    """The stages pipeline rank `rank` holds (round-robin)."""
    return [rank + k * pp for k in range(virtual)]


@functools.lru_cache(maxsize=512)
def stage_unshards(pp_schedule: str, pp: int, virtual: int, n_micro: int, rank: int, stage: int) -> int:
    """How many times pipeline rank `rank` gathers the whole of its stage `stage` in one step. The multi-stage
    schedules of torch.distributed.pipelining (interleaved 1F1B) gather and reshard every FSDP unit of a stage
    as it enters and leaves a window of three active stages (`schedules._add_unshard_reshard`), so with more
    than three stages per rank a stage is gathered again after it has been evicted; its own FSDP root, which
    otherwise stays gathered all step, goes with it. The count is read from torch's own lowering of the
    schedule (private API: the order only, no stages built); single-stage schedules, and up to three stages
    per rank, gather it once."""
    if pp_schedule != "interleaved" or virtual <= 3:
        return 1
    order = ScheduleInterleaved1F1B.__new__(ScheduleInterleaved1F1B)  # the order only: no stages
    rounds = max(1, n_micro // pp)
    order.__dict__.update(pp_group_size=pp, n_local_stages=virtual, rank=rank, number_of_rounds=rounds,
                          microbatches_per_round=n_micro // rounds, _n_microbatches=n_micro,
                          _num_stages=pp * virtual)
    lowered = schedules._add_unshard_reshard(order._calculate_single_rank_operations(rank))
    return sum(1 for a in lowered if a.computation_type == schedules.UNSHARD and a.stage_index == stage)


class StageModule(nn.Module):
    """One pipeline stage: the embedding (first stage), some blocks, the output head (last stage)."""

    def __init__(self, model: GrokModel, layers: list[int], first: bool, last: bool, seq_len: int) -> None:
        super().__init__()
        self.spec, self.first, self.last, self.seq_len = model.spec, first, last, seq_len
        self.layers = nn.ModuleDict({str(i): model.layers[str(i)] for i in layers})
        tied = model.lm_head is None
        self.embed = model.embed if first or (last and tied) else None
        self.norm = model.norm if last else None
        self.lm_head = model.lm_head if last else None
        self.cp_group: dist.ProcessGroup | None = None

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def use_cp(self, group: dist.ProcessGroup) -> None:
        """Context parallelism: this stage runs this rank's cp chunks of the sequence (`parallel.context`)."""
        self.cp_group = group
        apply_cp_aux(self, group)

    def forward(self, x: Tensor) -> Tensor:
        b, t = x.shape[0], self.seq_len
        positions = torch.arange(t, device=x.device)
        cache: CPKeys | None = None
        if self.cp_group is not None:
            positions = cp_indices(t, self.cp_group.size(), self.cp_group.rank(), x.device)
            cache = CPKeys(self.cp_group)
            if self.first:
                x = x[:, positions]
        positions = positions.expand(b, -1)
        tokens = x if self.first else torch.ones(b, positions.shape[1], dtype=torch.long, device=x.device)
        keys = key_positions(tokens, positions) if cache is None else KeyPositions(
            positions, *cache.begin(tokens, positions))
        h = self.embed(x) * self.spec.embedding_multiplier if self.first else x  # type: ignore[misc]
        cos, sin = rope_tables(positions, self.spec.head_dim, self.spec.rope_theta)
        for block in self.layers.values():
            h = block(h, cos, sin, keys, cache)
        return GrokModel.output(self, h) if self.last else h  # type: ignore[arg-type]


def split_model(model: GrokModel, layout: Layout, pp_rank: int, seq_len: int) -> list[StageModule]:
    """This rank's stages; `model` keeps only their layers (and the embedding/head where they run)."""
    n_stages = layout.pp * layout.pp_virtual
    stages = []
    keep: set[str] = set()
    for s in rank_stages(layout.pp, layout.pp_virtual, pp_rank):
        layers = stage_layers(model.spec.n_layers, n_stages, s)
        keep.update(str(i) for i in layers)
        stages.append(StageModule(model, layers, s == 0, s == n_stages - 1, seq_len))
    for name in list(model.layers.keys()):
        if name not in keep:
            del model.layers[name]
    if not any(st.embed is not None for st in stages):
        model.embed = None  # type: ignore[assignment]
    if not any(st.last for st in stages):
        model.norm = None  # type: ignore[assignment]
        model.lm_head = None
    return stages


class Pipeline:
    """The stages, their schedule, and the tied-embedding group of one pp rank."""

    def __init__(self, model: GrokModel, stages: list[StageModule], layout: Layout, meshes: Any,
                 device: torch.device, n_micro: int, micro_batch: int, seq_len: int,
                 hidden_dtype: torch.dtype = torch.float32) -> None:
        group = meshes.pp.get_group()
        self.pp, self.pp_rank = group.size(), group.rank()
        self.n_stages = layout.pp * layout.pp_virtual
        self.group, self.n_micro, self.model, self.modules = group, n_micro, model, stages
        self.hidden_dtype = hidden_dtype
        self.tp_mesh: DeviceMesh | None = meshes.tp if layout.tp > 1 else None
        self.cp_mesh: DeviceMesh | None = meshes.cp if layout.cp > 1 else None
        self.tp, self.split = layout.tp, layout.tp * layout.cp
        self.first = any(st.first for st in stages)
        self.last = any(st.last for st in stages)
        spec = model.spec
        local_t = seq_len // self.split
        # Hidden states are marked as needing gradients, or the stages exchange none in backward. The examples
        # only carry shapes and dtypes, so they live on `meta` (a real logits example would be T × vocab floats).
        hidden = torch.empty(micro_batch, local_t, spec.d_model, dtype=hidden_dtype, device="meta",
                             requires_grad=True)
        self.stages = []
        for st, index in zip(stages, rank_stages(layout.pp, layout.pp_virtual, self.pp_rank), strict=True):
            inp = torch.empty(micro_batch, seq_len, dtype=torch.long, device="meta") if st.first else hidden
            # the last stage's logits: this rank's cp tokens (all tp's) × its vocabulary columns
            logits = torch.empty(micro_batch, seq_len // layout.cp, spec.vocab_size // layout.tp, device="meta")
            out = logits if st.last else hidden
            # Shapes given up front: no shape-inference round trip on the first step.
            self.stages.append(PipelineStage(st, index, self.n_stages, device, input_args=(inp,),
                                             output_args=(out,), group=group))
        cls = _SCHEDULES[layout.pp_schedule]
        # Each micro-batch loss is divided by n_micro here, as the single-process trainer divides by
        # grad_accum, instead of letting the schedule rescale gradients, so the MoE aux_scale stays right.
        many = cls in (ScheduleInterleaved1F1B, ScheduleInterleavedZeroBubble)
        self.schedule = cls(self.stages if many else self.stages[0], n_microbatches=n_micro, loss_fn=self._loss,
                            scale_grads=False)
        self.tied_group = _tied_group(meshes.world) if model.lm_head is None and self.pp > 1 else None

    def _loss(self, logits: Tensor, target: Tensor) -> Tensor:
        group = self.tp_mesh.get_group() if self.tp_mesh is not None else None
        return cross_entropy(logits, local_targets(target, self.cp_mesh), group) / self.n_micro

    def step(self, x: Tensor, y: Tensor) -> Tensor | None:
        """Forward and backward of all micro-batches (x, y hold them stacked); on the rank holding the last
        stage, the mean loss (the same on every tp rank)."""
        losses: list[Tensor] = []
        # return_outputs=False: the schedule would otherwise keep every micro-batch's logits (T × vocab floats
        # each) alive until the next step, through the optimizer step; only the losses are used.
        kwargs: dict[str, Any] = {"target": y, "losses": losses, "return_outputs": False} if self.last else {}
        if self.first:
            self.schedule.step(x, **kwargs)
        else:
            self.schedule.step(**kwargs)
        return torch.stack(losses).sum().detach() if self.last else None

    def sync_tied_grads(self) -> None:
        if self.tied_group is None or not (self.first or self.last):
            return
        embed = self.model.embed
        g = embed.weight.grad if embed is not None else None
        if g is not None:
            dist.all_reduce(g._local_tensor if isinstance(g, DTensor) else g, group=self.tied_group)

    def skip_in_norm(self) -> set[Any]:
        """The last stage's copy of a tied embedding is not counted twice in the gradient norm."""
        if self.tied_group is not None and self.last and not self.first and self.model.embed is not None:
            return {self.model.embed.weight}
        return set()

    @torch.no_grad()
    def forward_only(self, x: Tensor) -> Tensor | None:
        """Evaluation: plain send/recv of hidden states through the stages; logits on the last stage's rank."""
        out: Tensor | None = None
        local_t = x.shape[1] // self.split
        for index in range(self.n_stages):
            owner = index % self.pp
            if owner != self.pp_rank:
                continue
            st = self.modules[index // self.pp]
            h = x
            if index > 0:
                h = torch.empty(x.shape[0], local_t, self.model.spec.d_model, dtype=self.hidden_dtype,
                                device=x.device)
                dist.recv(h, group=self.group, group_src=(index - 1) % self.pp)
            out = st(h)
            if index < self.n_stages - 1:
                dist.send(out.contiguous(), group=self.group, group_dst=(index + 1) % self.pp)
        return out if self.last else None


def _tied_group(world: DeviceMesh) -> dist.ProcessGroup | None:
    """The pair (first pp rank, last pp rank) of this rank's data/tensor-parallel coordinate. Every rank takes
    part in creating every pair, as `new_group` requires."""
    ranks = world.mesh.reshape(world.mesh.shape[0], -1)
    me = dist.get_rank()
    mine = None
    for col in range(ranks.shape[1]):
        pair = [int(ranks[0, col]), int(ranks[-1, col])]
        g = dist.new_group(pair)
        if me in pair:
            mine = g
    return mine
