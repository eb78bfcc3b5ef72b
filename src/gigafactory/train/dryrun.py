"""A dry run at the true world size: one whole training step of the real model at a plan's layout, on fake
tensors and a fake process group, measured beside the planner's predictions.

This process plays rank 0 of a world of any size: PyTorch's ``fake`` process-group backend accepts every
collective without sending anything, `FakeTensorMode` gives tensors shapes and dtypes but no memory, and the
FSDP2 memory tracker (`torch.distributed._tools.fsdp2_mem_tracker`) records what a real rank would hold, by
category, through forward, backward and the optimizer step. The bytes of each collective are counted by the same
`parallel.CommCounter` a real run uses. The model is built on ``meta`` and laid out by the trainer's own
`parallel.parallelize`, in bf16 with FSDP2 mixed precision (what a GPU run uses).

What differs from a real step, and why:
- Attention runs as a shape-only stand-in for a fused kernel (`model.attention`: under fake tensors it keeps
  what flash attention keeps, q/k/v, the output and a logsumexp per query, and no tile temporaries).
- With several pipeline stages on one rank, the FSDP2 memory tracker is handed all their roots through its
  private ``_root_mod`` (`_tracker`): it accepts one root and has no public way to take more.
- Expert parallelism assumes balanced routing (every rank sends each peer the same number of token copies), as
  the planner does: the real dropless dispatch sizes its all-to-all from routed counts, which fake tensors do not
  have. With a capacity factor (``moe_capacity_factor``) nothing is assumed: the real fixed-shape dispatch
  (`MoE.capacity_dispatch`) runs, since its sizes never depend on values, and its padded all-to-all is measured.
"""

from __future__ import annotations

import contextlib
import json
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from gigafactory.errors import UserError
from gigafactory.model.grok import GrokModel, MoE, combine
from gigafactory.specs import ModelSpec
from gigafactory.specs.layout import Layout

MEMORY_KEYS = ("params", "grads", "optimizer", "activations_peak", "total_peak")


def _fake_world(world: int, rank: int) -> None:
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend

    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)


def _balanced_ep_dispatch(moe: MoE, x: Tensor, gates: Tensor, idx: Tensor, group: dist.ProcessGroup) -> Tensor:
    """`parallel.expert.ep_dispatch_compute` with balanced routing: the same collectives and shapes."""
    from gigafactory.parallel.comm import all_to_all

    ep = group.size()
    n_local = moe.n_experts // ep
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    token_of = order // moe.top_k
    counts = torch.zeros(moe.n_experts, dtype=torch.int64, device=x.device)
    recv_counts = torch.empty_like(counts)
    dist.all_to_all_single(recv_counts, counts, group=group)
    splits = [flat.numel() // ep] * ep
    recv = all_to_all(x[token_of], splits, splits, group)
    per_expert = torch.full((n_local,), recv.shape[0] // n_local, dtype=torch.int64, device=x.device)
    out = all_to_all(moe.experts(recv, per_expert), splits, splits, group)
    return combine(out, gates, order)


def _use_balanced_dispatch(model: torch.nn.Module, group: dist.ProcessGroup) -> None:
    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        moe.dispatch_compute = types.MethodType(  # type: ignore[method-assign]
            lambda self, x, g, i: _balanced_ep_dispatch(self, x, g, i, group), moe)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _own_propagation_mode() -> contextlib.AbstractContextManager[Any]:
    """DTensor computes each op's output shape by running it on *global*-shape fake tensors, in the active fake
    mode (`ShardingPropagator`: ``detect_fake_mode() or FakeTensorMode()``). Under the dry run's FakeTensorMode
    that is ours, and the memory tracker (which skips only ops run in another fake mode) counted those global
    tensors as this rank's: AdamW's foreach ops over every parameter showed up as 2.5-5× the planner's peak, all
    of it "optimizer". `detect_fake_mode` prefers a tracing context's mode, so one with a mode of its own sends
    the shape propagation there."""
    from torch._guards import TracingContext, tracing
    from torch._subclasses.fake_tensor import FakeTensorMode

    return tracing(TracingContext(FakeTensorMode()))


def _steady_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Create the optimizer's state as a rank holds it from its second step on: AdamW allocates its moments at its
    first `step()`, so a first step measured as such has no optimizer state during forward and backward (grok-1
    `dp_shard=64,tp=2,ep=4`: 1.2 GB, 8% of its peak, missing at the peak). One update on zero gradients, outside
    the tracker, which takes the state it finds on entry as optimizer memory; gradients are then dropped as the
    trainer drops them after every step (``zero_grad(set_to_none=True)``)."""
    with _own_propagation_mode():
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _memory(snapshot: dict[Any, Any], zero1: bool = False) -> dict[str, float]:
    """Tracker categories → the planner's terms (bytes on this rank). Under a distributed optimizer
    (`Layout.dp_mode` ``zero1``) FSDP's sharded parameters are the fp32 master weights, which the planner counts
    with the optimizer (`plan.costmodel.state_split`); its whole bf16 weights and gradients are held through the
    step, not at its end (`measure` adds them)."""
    from torch.distributed._tools.fsdp2_mem_tracker import _FSDPRefType as R

    dev = next(iter(snapshot.values())) if snapshot else {}
    get = lambda *kinds: float(sum(dev.get(k, 0) for k in kinds))  # noqa: E731
    if zero1:
        return {"params": 0.0, "grads": 0.0, "optimizer": get(R.OPT, R.SHARDED_PARAM),
                "activations_peak": get(R.ACT), "total_peak": float(dev.get("Total", 0))}
    return {"params": get(R.SHARDED_PARAM), "grads": get(R.SHARDED_GRAD), "optimizer": get(R.OPT),
            "activations_peak": get(R.ACT), "total_peak": float(dev.get("Total", 0))}


def _tracker(roots: list[torch.nn.Module], optimizer: torch.optim.Optimizer) -> Any:
    """PyTorch's FSDP2 memory tracker over this rank's FSDP roots (the model, or each pipeline stage it holds),
    also keeping the most activation bytes held at any moment (it records the categories only at the moments the
    total peaks, where the activations may be below their own peak: with grok-2's whole-layer FSDP units, 0.68
    of it), the most unsharded parameter bytes and the most gradient state held (a distributed optimizer holds
    both through the step): the unsharded gradients FSDP accumulates between micro-batches and the sharded ones,
    taken after each FSDP unit's backward. A unit's bf16 gradient before FSDP accumulates or reduces it, and a
    reduce-scatter's input buffer, are transients (the planner's too).

    FSDP2 upcasts the unsharded gradients it accumulates between micro-batches without a reduction (to its
    reduce dtype, fp32 under bf16 mixed precision) inside its post-backward, where the tracker files the new
    tensor as a backward temporary: they are filed as unsharded gradients here."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.fsdp2_mem_tracker import _FSDPRefType as R

    class Tracker(FSDPMemTracker):
        act_peak = 0
        reducing = False  # inside a pipeline stage's gradient reduction (`_stage_reductions`)
        unsharded_params_peak = 0
        grads_peak = 0

        def _update_peak_stats(self, peak_state: Any) -> None:  # after every op
            super()._update_peak_stats(peak_state)
            self._update_own_peaks()

        def _update_own_peaks(self) -> None:
            for snap in self._curr_mem_snap.values():
                if not self.reducing:
                    self.act_peak = max(self.act_peak, snap.get(R.ACT, 0))
                self.unsharded_params_peak = max(self.unsharded_params_peak, snap.get(R.UNSHARDED_PARAM, 0))

        def update_grads_peak(self) -> None:
            from torch.distributed.fsdp import FSDPModule

            held = 0
            for mod in self._root_mod.modules():
                if isinstance(mod, FSDPModule):
                    for group in mod._get_fsdp_state()._fsdp_param_groups:
                        for p in group.fsdp_params:
                            for g in (p.unsharded_accumulated_grad, p.sharded_param.grad):
                                g = getattr(g, "_local_tensor", g)  # this rank's part of a DTensor
                                held += g.numel() * g.element_size() if g is not None else 0
            self.grads_peak = max(self.grads_peak, held)

        def _fsdp_param_group_post_backward(self, fsdp_mod: Any, orig: Any) -> Any:
            inner = super()._fsdp_param_group_post_backward(fsdp_mod, orig)

            def post_backward(*args: Any, **kwargs: Any) -> None:
                inner(*args, **kwargs)
                group = fsdp_mod._get_fsdp_state()._fsdp_param_group
                for fsdp_param in group.fsdp_params if group else ():
                    acc = fsdp_param.unsharded_accumulated_grad
                    if acc is not None:
                        self._update_and_maybe_create_winfos(acc, R.UNSHARDED_GRAD, update_existing=True)
                self.update_grads_peak()

            return post_backward

    tracker = Tracker(roots[0], optimizer)
    if len(roots) > 1:
        # Several pipeline stages on this rank are several FSDP roots. `FSDPMemTracker` takes one (an FSDPModule)
        # and has no public way to take more; one tracker per root does not work either, since each counts every
        # allocation of the process. It finds the FSDP units to instrument by walking `_root_mod.modules()` only,
        # so it is handed all the roots there: the one use of a private attribute (torch 2.13), pp > 1 only.
        tracker._root_mod = torch.nn.ModuleList(roots)
    return tracker


def _roots(par: Any) -> list[torch.nn.Module]:
    return [st.submod for st in par.pipeline.stages] if par.pipeline is not None else [par.model]


@contextlib.contextmanager
def _repeated_roots(tracker: Any, roots: list[torch.nn.Module]) -> Iterator[None]:
    """Let a pipeline stage (an FSDP root) run its forward once per micro-batch under the memory tracker, which
    takes a root's second forward for a second step and refuses it: before each forward the root's per-module
    statistics so far are dropped (the step's peaks are kept by the tracker itself)."""

    def drop(mod: torch.nn.Module, args: Any, kwargs: Any) -> None:
        if torch._C._current_graph_task_id() == -1:  # a forward, not a recompute in backward
            tracker.memory_tracking.pop(mod, None)

    # prepended after the tracker installed its own pre-forward hooks, so this runs first
    handles = [r.register_forward_pre_hook(drop, prepend=True, with_kwargs=True) for r in roots]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _stage_reductions(tracker: Any, stages: list[Any]) -> Iterator[None]:
    """torch.distributed.pipelining reduces a stage's gradients after its last backward, outside autograd: its
    REDUCE_GRAD action calls FSDP's post-backward by hand (`PipelineStage.perform_reduce_grad`). The tracker,
    seeing neither a module nor a backward there, files what that allocates (the fp32 reduce-scatter inputs) as
    forward activations; none is one (it counts in the total peak still). grok-2 with 16 layers at
    dp_replicate=2,dp_shard=5,tp=8,pp=4: a 1,993 MiB fp32 reduce-scatter input had set the activation peak."""

    def wrap(stage: Any) -> Any:
        inner = stage.perform_reduce_grad

        def reduce(*args: Any, **kwargs: Any) -> Any:
            tracker.reducing = True
            try:
                return inner(*args, **kwargs)
            finally:
                tracker.reducing = False

        return reduce

    for stage in stages:
        stage.perform_reduce_grad = wrap(stage)
    try:
        yield
    finally:
        for stage in stages:
            del stage.perform_reduce_grad


def _global_rank(world: int, pp: int, last_stage: bool) -> int:
    """The rank at coordinate 0 of every mesh dimension but pp, on the first (or last) pipeline stage: pp is the
    mesh's outermost dimension. Coordinate 0 holds the fullest FSDP shard when a dimension does not split
    evenly (the last ranks may hold only padding)."""
    return (pp - 1) * (world // pp) if last_stage else 0


def _static_vote(schedule: Any, stages: list[Any], has_backward: bool, p2p_done: bool) -> None:
    """The schedule's first-step vote (every pipeline rank sends whether its stages' shapes are all known) with
    the outcome every rank would vote: `parallel.pipeline` gives every stage its shapes up front. Over the fake
    process group the vote would read a received value that never arrives."""
    from torch.distributed.pipelining._utils import InferenceMode

    for stage in stages:
        assert not InferenceMode.needs_dynamic(stage._user_meta, has_backward)  # noqa: S101
        stage._inference_mode = InferenceMode.STATIC


def _pipeline_step(par: Any, spec: ModelSpec, micro: int, grad_accum: int, seq_len: int) -> None:
    """This pipeline rank's part of the schedule, run by `torch.distributed.pipelining` itself: its forwards and
    backwards in the schedule's order, the stages' sends and receives going to the fake process group."""
    schedule = par.pipeline.schedule
    schedule._warmup_p2p = types.MethodType(_static_vote, schedule)  # type: ignore[method-assign]
    x = torch.randint(1, spec.vocab_size, (grad_accum * micro, seq_len))
    par.pipeline.step(x, x)
    par.pipeline.sync_tied_grads()


def measure(spec: ModelSpec, layout: Layout, world: int, batch_size: int, grad_accum: int,
            seq_len: int, last_stage: bool = False, capacity_factor: float | None = None) -> dict[str, Any]:
    """One step of one rank at `layout` on a fake world of `world` ranks: memory by term and collective bytes.
    The rank is global rank 0, or with `last_stage` one on the last pipeline stage."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from gigafactory.model.init import materialize
    from gigafactory.parallel import CommCounter, apply_layout, build_meshes, check_layout
    from gigafactory.train.config import TrainConfig
    from gigafactory.train.loop import build_optimizer, lm_loss

    check_layout(layout, spec, world)
    if layout.dp_shard * layout.dp_replicate == 1:
        raise UserError("--dry-run measures FSDP layouts (dp_shard × dp_replicate > 1); pick such a layout")
    if layout.pp > 1 and grad_accum < layout.pp:
        raise UserError(f"pp={layout.pp} needs grad_accum >= {layout.pp} micro-batches to fill the pipeline")
    micro = batch_size // grad_accum // layout.dp
    if micro < 1:
        raise UserError(f"batch_size={batch_size} is too small for dp={layout.dp} with grad_accum={grad_accum}")
    _fake_world(world, _global_rank(world, layout.pp, last_stage))
    device = torch.device("cpu")
    try:
        meshes = build_meshes(layout, device.type)
        with torch.device("meta"):
            model = GrokModel(spec)
        for moe in model.moe_layers():
            moe.capacity_factor = capacity_factor
        # Laid out on meta (mesh bookkeeping needs real small tensors), then allocated as fake tensors.
        par = apply_layout(model, meshes, device, grad_accum, micro, seq_len, param_dtype=torch.bfloat16)
        mode = FakeTensorMode(allow_non_fake_inputs=True)  # constants made outside the mode (DTensor's) are fine
        with mode, _default_dtype(torch.float32):
            materialize(par.model, spec, device, seed=0)
            if layout.ep > 1 and capacity_factor is None:
                _use_balanced_dispatch(par.model, meshes.ep.get_group())
            optimizer = build_optimizer(par.model, TrainConfig())
            _steady_optimizer(optimizer)
            tracker = _tracker(_roots(par), optimizer)
            counter = CommCounter()
            with _own_propagation_mode(), tracker, counter:
                if par.pipeline is not None:
                    with _repeated_roots(tracker, _roots(par)), _stage_reductions(tracker, par.pipeline.stages):
                        _pipeline_step(par, spec, micro, grad_accum, seq_len)
                for i in range(grad_accum if par.pipeline is None else 0):  # the pipeline ran them above
                    tracker.reset_mod_stats()  # per-module stats per micro-batch; the step's peak is kept
                    par.set_gradient_sync(i == grad_accum - 1)
                    x = torch.randint(1, spec.vocab_size, (micro, seq_len))
                    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
                    (lm_loss(par.model, x, par.targets(x), autocast, par.vocab_group) / grad_accum).backward()
                # Clipping's traffic: gradients still partial over tp are summed (its global norm is a scalar
                # all-reduce the planner does not count, and reading it needs values fake tensors lack).
                par._sum_over_tp(counter)
                optimizer.step()
                tracker.update_grads_peak()
                optimizer.zero_grad(set_to_none=False)
            # Parameters, gradients and optimizer state are held all step: read at its end (a distributed
            # optimizer's whole bf16 weights and gradients: the most held at any moment, they are freed by the
            # last backward). Activations: the most held at any moment of the model's forward and backward.
            # Total: the peak of everything, including the transient buffers of gathers, reductions and the
            # optimizer's update.
            zero1 = layout.dp_mode == "zero1"
            memory = _memory(tracker.get_tracker_snapshot(), zero1)
            if zero1:
                memory["params"] = float(tracker.unsharded_params_peak)
                memory["grads"] = float(tracker.grads_peak)
            memory["activations_peak"] = float(tracker.act_peak)
            memory["total_peak"] = _memory(tracker.get_tracker_snapshot("peak"))["total_peak"]
    finally:
        dist.destroy_process_group()
    collectives = {k: v for k, v in counter.bytes.items() if k != "other" and v}
    return {"memory": memory, "collectives": collectives}


def predicted(spec: ModelSpec, layout: Layout, world: int, batch_size: int, grad_accum: int, seq_len: int,
              gpu: str = "h100-sxm", capacity_factor: float | None = None) -> dict[str, Any]:
    """The planner's figures for the same run, with the same keys, on the pipeline stage its memory describes
    (``pp_stage``: the busier end, first or last)."""
    from gigafactory.parallel.compare import predicted_bytes
    from gigafactory.plan.costmodel import Cluster, estimate
    from gigafactory.specs.hardware import get_gpu

    micro = batch_size // grad_accum // layout.dp
    lay = layout.model_copy(update={"micro_batch": micro})
    cost = estimate(spec, lay, Cluster.of(get_gpu(gpu), world), batch_size, seq_len, with_bytes=False,
                    capacity_factor=capacity_factor)
    m = cost.memory
    memory = {"params": m["weights"], "grads": m["gradients"], "optimizer": m["optimizer"],
              "activations_peak": cost.activations_peak, "total_peak": sum(m.values())}
    pp_rank = (layout.pp - 1 if cost.pp_stage == "last" else 0) if layout.pp > 1 else None
    coll = predicted_bytes(spec, layout, batch_size, grad_accum, seq_len, 2, pp_rank=pp_rank,
                           capacity_factor=capacity_factor)
    return {"memory": memory, "collectives": {k: v for k, v in coll.items() if v}, "pp_stage": cost.pp_stage}


def dry_run(spec: ModelSpec, layout: Layout, world: int, batch_size: int, grad_accum: int,
            seq_len: int, capacity_factor: float | None = None) -> dict[str, Any]:
    pred = predicted(spec, layout, world, batch_size, grad_accum, seq_len, capacity_factor=capacity_factor)
    meas = measure(spec, layout, world, batch_size, grad_accum, seq_len, last_stage=pred["pp_stage"] == "last",
                   capacity_factor=capacity_factor)
    keys = sorted(set(meas["collectives"]) | set(pred["collectives"]))
    return {
        "world_size": world,
        "layout": layout.model_dump(),
        "model": spec.name,
        "batch_size": batch_size, "grad_accum": grad_accum, "seq_len": seq_len,
        "moe_capacity_factor": capacity_factor,
        "pp_stage": pred["pp_stage"] if layout.pp > 1 else None,
        "memory": {"measured": meas["memory"], "predicted": pred["memory"]},
        "collectives": {"measured": {k: meas["collectives"].get(k, 0.0) for k in keys},
                        "predicted": {k: pred["collectives"].get(k, 0.0) for k in keys}},
    }


def world_of(plan: Path | None, layout: Layout, world_size: int | None) -> int:
    if world_size is not None:
        return world_size
    if plan is not None:
        n = json.loads(Path(plan).read_text()).get("n_gpus")
        if isinstance(n, int) and n > 0:
            return n
    return layout.world_size


def run_from_config(cfg: Any, plan: Path | None, world_size: int | None, json_out: bool, console: Any) -> dict:
    """`gigafactory train --dry-run`: the report as JSON (``--json``) or as a table."""
    from gigafactory.specs import load_spec

    if cfg.layout is None:
        raise UserError("--dry-run needs a layout: pass --plan plan.json or --layout (and --world-size)")
    spec = load_spec(cfg.model)
    layout = Layout.parse(cfg.layout)
    world = world_of(plan, layout, world_size)
    seq_len = cfg.seq_len or spec.max_seq_len
    report = dry_run(spec, layout, world, cfg.batch_size, cfg.grad_accum, seq_len, cfg.moe_capacity_factor)
    if json_out:
        print(json.dumps(report, indent=1))
    else:
        console.print(format_report(report), highlight=False)
    return report


def format_report(report: dict[str, Any]) -> str:
    stage = f", {report['pp_stage']} pipeline stage" if report.get("pp_stage") else ""
    cap = report.get("moe_capacity_factor")
    moe = f", MoE capacity factor {cap:g}" if cap is not None else ""
    lines = [f"{report['model']} at {Layout(**report['layout']).short()}{moe} on {report['world_size']:,} ranks "
             f"(one rank{stage}; fake tensors, fake process group)",
             f"{'term':<18}{'measured':>16}{'predicted':>16}{'diff':>9}"]
    for section in ("memory", "collectives"):
        meas, pred = report[section]["measured"], report[section]["predicted"]
        for key in pred:
            m, p = meas.get(key, 0.0), pred[key]
            diff = f"{(m - p) / p:+.1%}" if p else "n/a"
            lines.append(f"{key:<18}{m:>16,.0f}{p:>16,.0f}{diff:>9}")
    return "\n".join(lines)
