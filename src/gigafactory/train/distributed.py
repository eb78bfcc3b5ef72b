"""The trainer's side of scale-out: process groups from the torchrun environment, the parallel model, the data
slice of each data-parallel rank, and the distributed versions of a train step and an evaluation.

`Trainer` calls in here with a few lines and keeps its single-process path untouched. The backend follows the
device: NCCL when CUDA is available, gloo otherwise. The layout is validated against the model and the world size
before any process-group work, so a wrong layout fails at once with one line.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from gigafactory.errors import UserError
from gigafactory.specs import ModelSpec
from gigafactory.specs.layout import Layout

if TYPE_CHECKING:
    from gigafactory.parallel import CommCounter, Parallelized
    from gigafactory.train.config import TrainConfig
    from gigafactory.train.loop import Trainer


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
                       ("seq_len", "seq_len")):
        if key in plan:
            out[field] = plan[key]
    return out


class Distributed:
    """One rank of a distributed run."""

    def __init__(self, layout: Layout, spec: ModelSpec, cfg: TrainConfig, seq_len: int) -> None:
        from gigafactory.parallel import check_layout

        world = env_world_size()
        check_layout(layout, spec, world)  # before any process-group work
        micro = cfg.batch_size // cfg.grad_accum
        dp = layout.dp
        if micro % dp:
            raise UserError(f"the micro-batch of {micro} sequences (batch_size / grad_accum) must split evenly over "
                            f"dp={dp} ranks; change batch_size or grad_accum")
        if layout.tp > 1 and seq_len % layout.tp:
            raise UserError(f"seq_len={seq_len} must be divisible by tp={layout.tp} (sequence parallelism)")
        if layout.pp > 1 and cfg.grad_accum < layout.pp:
            raise UserError(f"pp={layout.pp} needs grad_accum >= {layout.pp} micro-batches to fill the pipeline")
        self.layout, self.cfg, self.seq_len = layout, cfg, seq_len
        self.local_micro = micro // dp
        self.device = init_process_group()
        self.rank = dist.get_rank()
        if cfg.dtype == "auto":
            # `auto` on a CPU times a matmul probe; ranks must not decide differently, so rank 0 decides for all.
            from gigafactory.train.device import pick_dtype

            choice = [pick_dtype("auto", self.device) == torch.bfloat16 if self.rank == 0 else None]
            dist.broadcast_object_list(choice, src=0)
            cfg.dtype = "bf16" if choice[0] else "fp32"
        self.is_main = self.rank == 0
        self.par: Parallelized | None = None
        self.counter: CommCounter | None = None

    # ---- set-up -------------------------------------------------------------------------------------------
    def parallelize(self, model: torch.nn.Module) -> torch.nn.Module:
        from gigafactory.parallel import CommCounter, build_meshes, parallelize

        meshes = build_meshes(self.layout, self.device.type)
        self.dp_rank = meshes.dp.get_local_rank()
        self.par = parallelize(model, meshes, self.device, self.cfg.grad_accum, self.local_micro,
                               self.seq_len)  # type: ignore[arg-type]
        self.counter = CommCounter()
        return self.par.model

    @property
    def world(self) -> int:
        return dist.get_world_size()

    def gather_step_times(self, seconds: float) -> list[float]:
        """Every rank's step time, for straggler reports (bookkeeping: not counted as training traffic)."""
        assert self.counter is not None
        out = [torch.zeros((), dtype=torch.float64, device=self.device) for _ in range(self.world)]
        with self.counter.bookkeeping():
            dist.all_gather(out, torch.tensor(seconds, dtype=torch.float64, device=self.device))
        return [float(t) for t in out]

    def _dp_slice(self, t: torch.Tensor) -> torch.Tensor:
        n = self.local_micro
        return t[self.dp_rank * n : (self.dp_rank + 1) * n]

    def _mean_over_ranks(self, value: torch.Tensor) -> float:
        assert self.counter is not None
        with self.counter.bookkeeping():
            dist.all_reduce(value)
        return float(value) / dist.get_world_size()

    # ---- steps --------------------------------------------------------------------------------------------
    def train_step(self, tr: Trainer) -> dict[str, float]:
        from gigafactory.train.loop import lr_at

        assert self.par is not None and self.counter is not None
        cfg, par = tr.cfg, self.par
        lr = lr_at(tr.step, cfg)
        for group in tr.optimizer.param_groups:
            group["lr"] = lr
        tr.model.train()
        self.counter.reset()
        with self.counter:
            if par.pipeline is not None:
                loss = self._pipeline_micro_steps(tr)
            else:
                loss = self._micro_steps(tr)
            norm = par.clip_grad_norm_(cfg.grad_clip or float("inf"), self.counter)
            if tr.guard.allows(float(norm)):  # the norm is global, so every rank skips or steps together
                tr.optimizer.step()
            tr.optimizer.zero_grad(set_to_none=True)
            total = self._mean_over_ranks(loss)
        tr.step += 1
        stats = {"loss": total, "lr": lr, "grad_norm": norm}
        stats.update(self._comm_bytes_mean())
        moe = [m for m in tr.model.modules() if hasattr(m, "last_stats") and m.last_stats]
        if moe:
            stats["lb_loss"] = sum(m.last_stats["lb_loss"] for m in moe) / len(moe)
            stats["z_loss"] = sum(m.last_stats["z_loss"] for m in moe) / len(moe)
        return stats

    def _comm_bytes_mean(self) -> dict[str, float]:
        """Bytes per collective averaged over ranks (routing makes all-to-all sizes differ from rank to rank;
        the planner predicts the balanced figure). Outside the counter: this exchange is not part of a step."""
        from gigafactory.parallel.report import KINDS

        assert self.counter is not None
        vec = torch.tensor([self.counter.bytes.get(k, 0.0) for k in KINDS], dtype=torch.float64, device=self.device)
        dist.all_reduce(vec)
        vec /= dist.get_world_size()
        return {f"comm_{k}_bytes": float(v) for k, v in zip(KINDS, vec.tolist(), strict=True) if v}

    def _micro_steps(self, tr: Trainer) -> torch.Tensor:
        from gigafactory.parallel import local_targets

        assert self.par is not None
        cfg, tp = tr.cfg, self.layout.tp
        total = torch.zeros((), device=self.device)
        for i in range(cfg.grad_accum):
            x, y = tr.sampler.next()
            x, y = self._dp_slice(x).to(self.device), self._dp_slice(y).to(self.device)
            self.par.set_gradient_sync(i == cfg.grad_accum - 1)
            with tr._autocast():
                logits = tr.model(x)
            y = local_targets(y, self.par.tp_mesh)
            loss = tr.faults.poison(tr.step + 1, F.cross_entropy(logits.flatten(0, 1), y.flatten()))
            # Each tp rank scores its own tokens: the global mean is the average over tp ranks, and the partial
            # gradients of replicated weights are summed over tp.
            (loss / (cfg.grad_accum * tp)).backward()
            total += loss.detach() / cfg.grad_accum
        return total

    def _pipeline_micro_steps(self, tr: Trainer) -> torch.Tensor:
        pipe = self.par.pipeline  # type: ignore[union-attr]
        assert pipe is not None
        xs, ys = zip(*(tr.sampler.next() for _ in range(tr.cfg.grad_accum)), strict=True)
        x, y = torch.cat(xs).to(self.device), torch.cat(ys).to(self.device)
        loss = pipe.step(x, y)
        pipe.sync_tied_grads()
        # Only the last stage has the loss; the others add zero and the mean over ranks is rescaled by pp.
        out = loss if loss is not None else torch.zeros((), device=self.device)
        return out * self.layout.pp

    @torch.no_grad()
    def evaluate(self, tr: Trainer) -> dict[str, float]:
        from gigafactory.parallel import local_targets

        assert self.par is not None and self.counter is not None
        tr.model.eval()
        pipe = self.par.pipeline
        sums = torch.zeros(3, dtype=torch.float64)  # nats, bytes, tokens
        batch = max(1, self.cfg.batch_size // self.cfg.grad_accum)
        for i in range(0, len(tr.val_windows), batch):
            chunk = tr.val_windows[i : i + batch]
            x = torch.stack([w[0] for w in chunk]).to(self.device)
            y = torch.stack([w[1] for w in chunk]).to(self.device)
            with tr._autocast():
                logits = pipe.forward_only(x) if pipe else tr.model(x)
            if logits is None:
                continue
            y = local_targets(y, self.par.tp_mesh)
            sums[0] += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum").item()
            sums[1] += float(tr.data.token_bytes[y.flatten().cpu()].sum())
            sums[2] += y.numel()
        # Every data-parallel rank scored the same windows; tp ranks scored disjoint tokens; on a pipeline only
        # the last stage scored anything.
        copies = self.layout.dp
        sums = sums.to(self.device)
        with self.counter.bookkeeping():
            dist.all_reduce(sums)
        nats, nbytes, _ = (float(v) / copies for v in sums)
        ntok = float(sums[2]) / copies
        return {"val_loss": nats / ntok, "val_bits_per_byte": nats / math.log(2) / nbytes}

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


def setup(cfg: TrainConfig, spec: ModelSpec, seq_len: int) -> Distributed | None:
    """A `Distributed` when this process is one rank of several (or a layout asks for more than one); None for
    the plain single-process path."""
    layout = layout_from_config(cfg)
    world = env_world_size()
    if layout is None:
        if world == 1:
            return None
        layout = Layout(dp_shard=world)  # torchrun without a layout: plain data parallelism (FSDP)
    if layout.world_size == 1 and world == 1:
        layout.validate(spec, 1)
        return None
    return Distributed(layout, spec, cfg, seq_len)


@contextlib.contextmanager
def main_first(d: Distributed | None) -> Iterator[None]:
    """Rank 0 prepares shared files (tokenizer, token arrays) before the others read them."""
    if d is not None and not d.is_main:
        dist.barrier()
    yield
    if d is not None and d.is_main:
        dist.barrier()


class NullMetrics:
    """What ranks other than 0 write metrics to: nothing (rank 0 logs the values averaged over ranks)."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def truncate(self, step: int) -> None:
        pass

    def close(self) -> None:
        pass


def metrics_log(d: Distributed | None) -> NullMetrics | None:
    return NullMetrics() if d is not None and not d.is_main else None


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
        from gigafactory.parallel.report import comparison_rows, format_rows, measured_bytes, predicted_bytes
        from gigafactory.specs import load_spec

        spec = load_spec(cfg.model)
        layout = layout_from_config(cfg) or Layout(dp_shard=env_world_size())
        seq_len = cfg.seq_len or spec.max_seq_len
        act = 2 if cfg.dtype == "bf16" else 4
        rows = comparison_rows(measured_bytes(Path(cfg.run_dir) / "metrics.jsonl"),
                               predicted_bytes(spec, layout, cfg.batch_size, cfg.grad_accum, seq_len, act))
        console.print(f"bytes per collective per rank per step, layout {layout.short()}:", highlight=False)
        console.print(format_rows(rows), highlight=False)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return main
