"""The trainer's side of scale-out: process groups from the torchrun environment, the parallel model, the data
slice of each data-parallel rank, and the distributed versions of a train step and an evaluation.

`Ranks` is the single process, the degree-1 case; `Distributed` is one rank of several. The trainer's one
`train_step` and one `evaluate` (in `loop.py`, which imports this module, never the reverse) call their methods
and do not ask which of the two they have. The backend follows the
device: NCCL when CUDA is available, gloo otherwise. The layout is validated against the model and the world size
before any process-group work, so a wrong layout fails at once with one line.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from gigafactory.errors import UserError
from gigafactory.specs import ModelSpec
from gigafactory.specs.layout import Layout
from gigafactory.train.device import pick_device

if TYPE_CHECKING:
    from gigafactory.parallel import CommCounter, Parallelized
    from gigafactory.train.config import TrainConfig


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def layout_from_config(cfg: TrainConfig) -> Layout | None:
    if cfg.layout is None:
        return None
    return Layout.parse(cfg.layout)


def read_plan(path: Path) -> dict[str, Any]:
    """The training fields of a plan.json written by `gigafactory plan --export`."""
    try:
        plan = json.loads(Path(path).read_text())
        lay = Layout(**plan["layout"])
    except FileNotFoundError:
        raise UserError(f"plan file {path} does not exist; write one with `gigafactory plan --export DIR`") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise UserError(f"{path} is not a gigafactory plan: {str(err).splitlines()[0]}") from None
    out: dict[str, Any] = {"layout": ",".join(f"{k}={v}" for k, v in lay.model_dump().items())}
    if plan.get("model") and plan["model"] != "custom":
        out["model"] = plan["model"]
    for key, field in (("steps", "steps"), ("global_batch_seqs", "batch_size"), ("grad_accum_steps", "grad_accum"),
                       ("seq_len", "seq_len"), ("moe_capacity_factor", "moe_capacity_factor")):
        if plan.get(key) is not None:
            out[field] = plan[key]
    return out


class Ranks:
    """This process's place in a run. The single process is the degree-1 case: every data-parallel, tensor and
    pipeline degree is 1, there is nothing to shard or reduce and no collective runs. `Distributed` overrides
    each method for a real process group; the trainer's one `train_step` and one `evaluate` call only these."""

    rank, world, is_main = 0, 1, True
    dp, tp, pp = 1, 1, 1
    pipeline: Any = None

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def parallelize(self, model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
        """Give a meta-device model its memory and initial weights (`model.init`)."""
        from gigafactory.model.init import materialize

        return materialize(model, model.spec, self.device, seed)  # type: ignore[arg-type]

    def shard(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's share of a global micro-batch (its data-parallel slice)."""
        return t

    def targets(self, y: torch.Tensor) -> torch.Tensor:
        """The targets of the tokens this rank scores (its chunks under context parallelism)."""
        return y

    @property
    def vocab_group(self) -> Any:
        """The process group the logits' vocabulary is split over (tensor parallelism), or None."""
        return None

    def set_gradient_sync(self, sync: bool) -> None:
        """Gradient reduction only on the last accumulation micro-batch."""

    def clip_grad_norm_(self, model: torch.nn.Module, max_norm: float) -> float:
        return float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, foreach=True))

    def counting(self) -> contextlib.AbstractContextManager[Any]:
        """Count the bytes of every collective of one step."""
        return contextlib.nullcontext()

    def sum_over_ranks(self, t: torch.Tensor) -> torch.Tensor:
        """Sum a small tensor over all ranks (bookkeeping, not training traffic)."""
        return t

    def comm_bytes(self) -> dict[str, float]:
        """Bytes per collective kind in the last step, averaged over ranks."""
        return {}

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 prepares shared files (tokenizer, token arrays) before the others read them."""
        yield

    def close(self) -> None:
        pass


class Distributed(Ranks):
    """One rank of a multi-process run."""

    def __init__(self, layout: Layout, spec: ModelSpec, cfg: TrainConfig, seq_len: int) -> None:
        from gigafactory.parallel import check_layout

        world = env_world_size()
        check_layout(layout, spec, world)  # before any process-group work
        micro = cfg.batch_size // cfg.grad_accum
        dp = layout.dp
        if micro % dp:
            raise UserError(f"the micro-batch of {micro} sequences (batch_size / grad_accum) must split evenly over "
                            f"dp={dp} ranks; change batch_size or grad_accum")
        split = layout.tp * (2 * layout.cp if layout.cp > 1 else 1)  # sequence slices; cp: two chunks per rank
        if seq_len % split:
            raise UserError(f"seq_len={seq_len} must be divisible by tp·2·cp = {split} (sequence and context "
                            f"parallelism); change seq_len or the layout")
        if layout.pp > 1 and cfg.grad_accum < layout.pp:
            raise UserError(f"pp={layout.pp} needs grad_accum >= {layout.pp} micro-batches to fill the pipeline")
        self.layout, self.cfg, self.seq_len = layout, cfg, seq_len
        self.dp, self.tp, self.pp = layout.dp, layout.tp, layout.pp
        self.local_micro = micro // dp
        super().__init__(init_process_group())
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        if cfg.dtype == "auto":
            # `auto` on a CPU times a matmul probe; ranks must not decide differently, so rank 0 decides for all.
            from gigafactory.train.device import pick_dtype

            choice = [pick_dtype("auto", self.device) == torch.bfloat16 if self.rank == 0 else None]
            dist.broadcast_object_list(choice, src=0)
            cfg.dtype = "bf16" if choice[0] else "fp32"
        self.is_main = self.rank == 0
        self.par: Parallelized | None = None
        self.counter: CommCounter | None = None
        self.dp_rank = 0

    # ---- set-up -------------------------------------------------------------------------------------------
    def parallelize(self, model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
        from gigafactory.parallel import CommCounter, build_meshes, parallelize

        meshes = build_meshes(self.layout, self.device.type)
        self.dp_rank = meshes.dp.get_local_rank()
        self.par = parallelize(model, meshes, self.device, self.cfg.grad_accum, self.local_micro,  # type: ignore[arg-type]
                               self.seq_len, seed=seed,
                               param_dtype=torch.bfloat16 if self.cfg.dtype == "bf16" else None)
        self.pipeline = self.par.pipeline
        self.counter = CommCounter()
        return self.par.model

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        if not self.is_main:
            dist.barrier()
        yield
        if self.is_main:
            dist.barrier()

    # ---- the pieces of a step -----------------------------------------------------------------------------
    def shard(self, t: torch.Tensor) -> torch.Tensor:
        n = self.local_micro
        return t[self.dp_rank * n : (self.dp_rank + 1) * n]

    def targets(self, y: torch.Tensor) -> torch.Tensor:
        assert self.par is not None
        return self.par.targets(y)

    @property
    def vocab_group(self) -> Any:
        assert self.par is not None
        return self.par.vocab_group

    def set_gradient_sync(self, sync: bool) -> None:
        assert self.par is not None
        self.par.set_gradient_sync(sync)

    def clip_grad_norm_(self, model: torch.nn.Module, max_norm: float) -> float:
        assert self.par is not None
        return self.par.clip_grad_norm_(max_norm, self.counter)

    @contextlib.contextmanager
    def counting(self) -> Iterator[None]:
        assert self.counter is not None
        self.counter.reset()
        with self.counter:
            yield

    def sum_over_ranks(self, t: torch.Tensor) -> torch.Tensor:
        assert self.counter is not None
        t = t.to(self.device)
        with self.counter.bookkeeping():
            dist.all_reduce(t)
        return t

    def comm_bytes(self) -> dict[str, float]:
        """Routing makes all-to-all sizes differ from rank to rank; the planner predicts the balanced figure,
        so the mean over ranks is reported. Outside the counter: this exchange is not part of a step."""
        from gigafactory.parallel.compare import KINDS

        assert self.counter is not None
        vec = torch.tensor([self.counter.bytes.get(k, 0.0) for k in KINDS], dtype=torch.float64, device=self.device)
        dist.all_reduce(vec)
        vec /= self.world
        return {f"comm_{k}_bytes": float(v) for k, v in zip(KINDS, vec.tolist(), strict=True) if v}

    def close(self) -> None:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def init_process_group() -> torch.device:
    """From torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT): NCCL on GPUs, gloo on CPU."""
    if "RANK" not in os.environ:
        raise UserError("a multi-rank layout needs torchrun (or `gigafactory launch --nproc N ...`) to start ranks")
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(minutes=10),
                                device_id=device if device.type == "cuda" else None)
    return device


def setup(cfg: TrainConfig, spec: ModelSpec, seq_len: int) -> Ranks:
    """A `Distributed` when this process is one rank of several (or a layout asks for more than one); the
    degree-1 `Ranks` for a single process."""
    layout = layout_from_config(cfg)
    world = env_world_size()
    if layout is None:
        if world == 1:
            return Ranks(pick_device())
        layout = Layout(dp_shard=world)  # torchrun without a layout: plain data parallelism (FSDP)
    if layout.world_size == 1 and world == 1:
        layout.validate(spec, 1)
        return Ranks(pick_device())
    return Distributed(layout, spec, cfg, seq_len)


class NullMetrics:
    """What ranks other than 0 write metrics to: nothing (rank 0 logs the values averaged over ranks)."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def truncate(self, step: int) -> None:
        pass

    def close(self) -> None:
        pass


def metrics_log(ranks: Ranks) -> NullMetrics | None:
    return None if ranks.is_main else NullMetrics()


def with_plan(options: dict[str, Any], plan: Path | None) -> dict[str, Any]:
    """CLI options merged with a plan file: the plan fills what the user left at its default."""
    if plan is None:
        return options
    import click
    from click.core import ParameterSource

    ctx = click.get_current_context(silent=True)
    merged = dict(options)
    for key, value in read_plan(plan).items():
        source = ctx.get_parameter_source(key) if ctx is not None else None
        if options.get(key) is None or source in (ParameterSource.DEFAULT, None):
            merged[key] = value
    return merged


def finish(cfg: TrainConfig, compare_plan: bool, console: Any) -> bool:
    """After a run: rank 0 prints the measured-vs-predicted collective bytes if asked; the process group is torn
    down. True on the rank that should print the run summary."""
    main = not dist.is_initialized() or dist.get_rank() == 0
    if compare_plan and main:
        from gigafactory.parallel.compare import comparison_rows, format_rows, measured_bytes, predicted_bytes
        from gigafactory.specs import load_spec

        spec = load_spec(cfg.model)
        layout = layout_from_config(cfg) or Layout(dp_shard=env_world_size())
        seq_len = cfg.seq_len or spec.max_seq_len
        act = 2 if cfg.dtype == "bf16" else 4
        rows = comparison_rows(measured_bytes(Path(cfg.run_dir) / "metrics.jsonl"),
                               predicted_bytes(spec, layout, cfg.batch_size, cfg.grad_accum, seq_len, act,
                                               capacity_factor=cfg.moe_capacity_factor))
        console.print(f"bytes per collective per rank per step, layout {layout.short()}:", highlight=False)
        console.print(format_rows(rows), highlight=False)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return main
