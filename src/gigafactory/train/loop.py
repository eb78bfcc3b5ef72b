"""The training loop: AdamW, warmup + cosine, clipping, accumulation, autocast, evaluation in bits per byte,
metrics as JSONL, checkpoints that resume exactly.

Exact resume rests on three things: the sampler's batch i is a pure function of (seed, i), the learning rate
is a pure function of the step, and the checkpoint holds model, optimizer, sampler position and RNG states.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from gigafactory import checkpoint as ckpt
from gigafactory import tokenizer as toklib
from gigafactory.errors import UserError
from gigafactory.model import GrokModel
from gigafactory.model.grok import MoE
from gigafactory.specs import ModelSpec, load_spec
from gigafactory.train import data as datalib
from gigafactory.train import distributed
from gigafactory.train.config import TrainConfig
from gigafactory.train.device import peak_flops, pick_dtype
from gigafactory.train.launch import die_with_parent
from gigafactory.train.peer import PeerSnapshots, fill, fingerprint
from gigafactory.train.resilience import (
    Checkpointer,
    CollectiveClock,
    FaultInjector,
    SpikeDetector,
    StepGuard,
    Watchdog,
    restarted,
    straggler_report,
    young_daly_steps,
)
from gigafactory.util import atomic_write_text

console = Console(stderr=True)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to `lr`, cosine decay to `lr · min_lr_ratio` at the last step (step counts from 0)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), foreach=True)


def lm_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
            autocast: contextlib.AbstractContextManager[Any], vocab_group: Any = None) -> torch.Tensor:
    """Mean cross entropy of the model's logits for `x` against the labels `y` (vocab-parallel when the logits
    hold `vocab_group`'s shard of the vocabulary, `parallel.tensor.cross_entropy`). The fp32 logits (tokens ×
    vocabulary, the largest tensor of a step) are no longer referenced once the loss exists, so they are freed
    before the backward pass instead of being held through it (4 bytes per logit element; the dry run measured
    it)."""
    from gigafactory.parallel.tensor import cross_entropy

    with autocast:
        logits = model(x)
    return cross_entropy(logits, y, vocab_group)


def throughput(tokens_per_s: float, flops_per_token: float, peak_per_device: float, world: int) -> dict[str, float]:
    """Per-GPU figures from a global token rate: MFU is the global model FLOP/s over the peak of all `world`
    devices, so one rank and many share one definition and MFU can never exceed 1 by counting ranks."""
    return {"tokens_per_s_per_gpu": tokens_per_s / world, "peak_flops_per_gpu": peak_per_device,
            "mfu": tokens_per_s * flops_per_token / (world * peak_per_device)}


class LogProgress:
    """Progress for a log file or a pipe, where rich's bar never redraws: one plain line with the step, the rate
    and the ETA on the first step, then at most every `interval` seconds, and on the last step."""

    def __init__(self, total: int, start: int, interval: float = 15.0) -> None:
        self.total, self.start, self.interval = total, start, interval
        self.t0 = time.perf_counter()
        self.last = -math.inf

    def update(self, step: int, info: str) -> None:
        now = time.perf_counter()
        if step < self.total and step > self.start + 1 and now - self.last < self.interval:
            return
        self.last = now
        rate = (step - self.start) / max(now - self.t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else math.inf
        console.print(f"train {step}/{self.total}  {rate:.2f} steps/s  ETA {eta:,.0f} s  {info}", highlight=False)


class MetricsLog:
    """metrics.jsonl: one object per step (plus validation keys on evaluation steps). On resume, records past
    the checkpoint's step are dropped so the file describes exactly one history."""

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path = path
        self._f = None
        self.truncate(resume_step or 0)

    def truncate(self, step: int) -> None:
        """Keep the records up to `step` (all of them written by a history that step continues)."""
        if self._f is not None:
            self._f.close()
        kept = []
        if step > 0 and self.path.is_file():
            kept = [ln for ln in self.path.read_text().splitlines() if _step_of(ln) <= step]
        atomic_write_text(self.path, "".join(ln + "\n" for ln in kept))
        self._f = open(self.path, "a")

    def write(self, record: dict[str, Any]) -> None:
        # Strict JSON: a skipped step's non-finite loss is written as null.
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._f.write(json.dumps(clean) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def last_record(path: Path) -> dict[str, Any] | None:
    """The newest complete, timed record of a metrics file: the last step finished before a fault."""
    if not path.is_file():
        return None
    for line in reversed(path.read_text().splitlines()):
        with contextlib.suppress(json.JSONDecodeError, TypeError):
            rec = json.loads(line)
            if isinstance(rec, dict) and "time" in rec and "step" in rec:
                return rec
    return None


def recovered(last: dict[str, Any], now: dict[str, Any], recovery: dict[str, Any], resumed: int) -> dict[str, Any]:
    """The `recovered` event of the first step after a restart: downtime from the last step finished before the
    fault to this one (detection, restart, restore and the step itself), where the state came from, and the steps
    that had to be done again."""
    return {"downtime_s": round(now["time"] - last["time"], 3), **recovery, "last_step_before": last["step"],
            "resumed_step": resumed, "lost_steps": max(0, int(last["step"]) - resumed)}


def _step_of(line: str) -> float:
    """The step of a metrics line; a line cut short by a crash counts as past any step (dropped)."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    losses: list[float] = field(default_factory=list)
    final_val_bpb: float | None = None
    resumed_from: int | None = None


class Trainer:
    def __init__(self, cfg: TrainConfig, spec: ModelSpec | None = None, quiet: bool = False) -> None:
        die_with_parent()  # a worker of a killed torchrun agent must not keep writing into the run directory
        self.cfg = cfg
        self.tokenizer = toklib.resolve_choice(cfg.tokenizer, cfg.model)
        self.spec = toklib.spec_for(spec or load_spec(cfg.model), self.tokenizer, quiet)
        self.quiet = quiet
        self.run_dir = Path(cfg.run_dir)
        self.seq_len = cfg.seq_len or self.spec.max_seq_len
        if self.seq_len > self.spec.max_seq_len:
            raise UserError(f"seq_len={self.seq_len} exceeds the model's context {self.spec.max_seq_len}")
        if not (cfg.resume or cfg.auto_resume or restarted()) and ckpt.list_checkpoints(self.run_dir):
            raise UserError(f"{self.run_dir} already has checkpoints; pass --resume to continue it or use a new "
                            "--run-dir")
        if cfg.resume and not (self.run_dir / "spec.json").is_file():
            raise UserError(f"--resume: {self.run_dir} holds no run; drop --resume to start one")
        self.dist = distributed.setup(cfg, self.spec, self.seq_len)  # degree-1 `Ranks` for one process
        self.quiet = quiet or not self.dist.is_main
        self.device = self.dist.device
        self.dtype = pick_dtype(cfg.dtype, self.device)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # One job per run directory (rank 0 holds the lock); unfinished saves of a crashed run are removed.
        self.lock, lock_notes = ckpt.lock_run_dir(self.run_dir)
        with self.dist.main_first():
            self._check_spec()  # before the data: another model's run must be named as such
            if datalib.is_dataset(cfg.data) or cfg.data_mix:  # shards of `gigafactory data prepare`
                mix = datalib.parse_mix(cfg.data, cfg.data_mix)
                self.data = datalib.prepare_datasets(self.run_dir, mix, self.spec.vocab_size, self.seq_len, cfg.seed)
            else:
                self.data = datalib.prepare(self.run_dir, cfg.data, self.spec.vocab_size, self.tokenizer)
            self._save_run_files()

        torch.manual_seed(cfg.seed)
        # Built on `meta` (no memory), laid out, then only this rank's shards are allocated and initialised
        # from (seed, name, global index): the same weights under every layout (`model.init`).
        with torch.device("meta"):
            model = GrokModel(self.spec)
        micro = cfg.batch_size // cfg.grad_accum
        for moe in model.moe_layers():
            moe.lb_weight, moe.z_weight, moe.aux_scale = cfg.lb_loss_weight, cfg.z_loss_weight, 1 / cfg.grad_accum
            moe.capacity_factor = cfg.moe_capacity_factor
        self.model = self.dist.parallelize(model, seed=cfg.seed)
        self.optimizer = build_optimizer(self.model, cfg)
        self.sampler = datalib.make_sampler(self.data.train, micro, self.seq_len, cfg.seed)
        self.val_windows = datalib.eval_windows(self.data.val, self.seq_len, cfg.eval_windows)
        self.step = 0
        self.resumed_from: int | None = None
        self.notes: list[str] = list(lock_notes)
        self.faults = FaultInjector()
        self.guard = StepGuard(cfg.max_bad_steps)
        self.rollbacks, self._rolled_back_to = 0, -1
        self.peer = self._peer_snapshots()
        self.recovery: dict[str, Any] | None = None  # after a restart: where the state came from, how long it took
        if cfg.resume or cfg.auto_resume or restarted():  # after an elastic restart every rank resumes by itself
            self._resume()
        self.peak, self.peak_source = peak_flops(self.device, self.dtype)
        self.flops_per_token = self.spec.flops_per_token(self.seq_len)

    # ---- run directory -------------------------------------------------------------------------------------
    def _check_spec(self) -> None:
        spec_path = self.run_dir / "spec.json"
        if spec_path.is_file() and json.loads(spec_path.read_text()) != json.loads(self.spec.model_dump_json()):
            raise UserError(f"{self.run_dir} holds a run of another model; use a new --run-dir")

    def _save_run_files(self) -> None:
        spec_json = self.spec.model_dump_json(indent=1)
        spec_path = self.run_dir / "spec.json"
        self._check_spec()
        atomic_write_text(spec_path, spec_json)
        atomic_write_text(self.run_dir / "train_config.json", self.cfg.model_dump_json(indent=1))

    def _state(self) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def _peer_snapshots(self) -> PeerSnapshots | None:
        if not self.cfg.peer_snapshot_every:
            return None
        shape = fingerprint(self.spec.model_dump_json(), self.cfg.layout, self.dist.world, self.cfg.batch_size,
                            self.cfg.grad_accum, self.seq_len, self.cfg.seed)
        peer = PeerSnapshots(self.run_dir, self.cfg.peer_snapshot_every, shape)
        if not restarted():  # a copy left by an earlier job is never this job's state
            peer.forget()
        return peer

    def _resume_from_peer(self, state: dict[str, Any]) -> bool:
        """After a restart: every rank takes its state from the copy its peer holds in host memory, if all can
        (`PeerSnapshots.restore`); False (with a note saying why) sends every rank to the disk checkpoint."""
        assert self.peer is not None
        found = ckpt.list_checkpoints(self.run_dir)
        snap, why = self.peer.restore(int(found[0].name.removeprefix("step_")) if found else 0)
        problem = why or None
        if snap is not None:
            try:
                state = fill(state, snap["state"])
            except ValueError as err:
                problem = f"rank {self.dist.rank}: {err}"
        problems = [p for p in ckpt.all_gather_objects(problem, self.peer.group) if p]
        if problems:
            self.notes.append(f"peer snapshots not used: {problems[0]}; loading the disk checkpoint")
            return False
        assert snap is not None
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        meta = snap["meta"]
        self.step = self.resumed_from = int(meta["step"])
        self.sampler.position = int(meta["data_position"])
        ckpt.restore_rng(meta["rng"])
        self.notes.append(f"resumed from peer memory (step {self.step}); the disk checkpoint was not read")
        return True

    def _resume(self, keep_data_position: bool = False) -> bool:
        """Load the newest good checkpoint; with `keep_data_position` (a rollback) the batches since are skipped.
        After a restart, from the peers' copies in host memory when there are usable ones."""
        t0 = time.perf_counter()
        state = self._state()
        if self.peer is not None and restarted() and not keep_data_position and self._resume_from_peer(state):
            self.recovery = {"from": "peer", "restore_s": round(time.perf_counter() - t0, 4)}
            return True
        loaded = ckpt.load_latest(self.run_dir, state)
        if (restarted() or self.cfg.auto_resume) and not keep_data_position:  # a restart or a requeue after a fault
            self.recovery = {"from": "disk" if loaded else "start", "restore_s": round(time.perf_counter() - t0, 4)}
        if loaded is None:
            # get_state_dict built the optimizer's state with a zero-learning-rate step (Adam's step count 1):
            # with nothing to load over it, that phantom step would shift the bias correction of every later one.
            self.optimizer.state.clear()
            self.notes.append(f"no checkpoint in {self.run_dir}; starting from step 0")
            return False
        for line in loaded.skipped:
            self.notes.append(f"{line}; falling back to an older checkpoint")
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        m = loaded.manifest
        self.step = self.resumed_from = int(m["step"])
        if not keep_data_position:
            self.sampler.position = int(m["data_position"])
        ckpt.restore_rng(m["rng"])
        self.notes.append(f"resumed from {loaded.path.name} (step {self.step})")
        return True

    def save_checkpoint(self, checkpointer: Checkpointer | None = None) -> None:
        meta = {"data_position": self.sampler.position, "rng": ckpt.encode_rng(), "seq_len": self.seq_len}
        if checkpointer is None:
            ckpt.save(self.run_dir, self.step, self._state(), meta, keep_last=self.cfg.keep_last)
        else:
            checkpointer.save(self.step, self._state(), meta)

    # ---- steps ---------------------------------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def train_step(self) -> dict[str, float]:
        """One optimizer step: the single process runs it as the degree-1 case of the distributed step."""
        cfg, ranks = self.cfg, self.dist
        lr = lr_at(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        with ranks.counting():
            loss = self._pipeline_micro_steps() if ranks.pipeline is not None else self._micro_steps()
            norm = ranks.clip_grad_norm_(self.model, cfg.grad_clip or float("inf"))
            if self.guard.allows(norm):  # the norm is global, so every rank skips or steps together
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            total = float(ranks.sum_over_ranks(loss)) / ranks.world
        self.step += 1
        stats = {"loss": total, "lr": lr, "grad_norm": norm, **ranks.comm_bytes()}
        moe = [m for m in self.model.modules() if isinstance(m, MoE) and m.last_stats]
        if moe:
            stats["lb_loss"] = float(sum(m.last_stats["lb_loss"] for m in moe)) / len(moe)
            stats["z_loss"] = float(sum(m.last_stats["z_loss"] for m in moe)) / len(moe)
        return stats

    def _micro_steps(self) -> torch.Tensor:
        cfg, ranks = self.cfg, self.dist
        total = torch.zeros((), device=self.device)
        for i in range(cfg.grad_accum):
            x, y = self.sampler.next()
            x, y = ranks.shard(x).to(self.device, non_blocking=True), ranks.shard(y).to(self.device, non_blocking=True)
            ranks.set_gradient_sync(i == cfg.grad_accum - 1)
            loss = lm_loss(self.model, x, ranks.targets(y), self._autocast(), ranks.vocab_group)
            loss = self.faults.poison(self.step + 1, loss)
            # Every tp rank has the loss of all tokens (vocab-parallel): no division by tp.
            (loss / cfg.grad_accum).backward()
            total += loss.detach() / cfg.grad_accum
        return total

    def _pipeline_micro_steps(self) -> torch.Tensor:
        pipe = self.dist.pipeline
        xs, ys = zip(*(self.sampler.next() for _ in range(self.cfg.grad_accum)), strict=True)
        x, y = (torch.cat([self.dist.shard(t) for t in ts]).to(self.device) for ts in (xs, ys))  # this DP rank's
        loss = pipe.step(x, y)
        pipe.sync_tied_grads()
        # Only the last stage has the loss; the others add zero and the mean over ranks is rescaled by pp.
        out = loss if loss is not None else torch.zeros((), device=self.device)
        return out * self.dist.pp

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss over fixed windows, in nats per token and in bits per UTF-8 byte."""
        from gigafactory.parallel.tensor import cross_entropy

        ranks = self.dist
        self.model.eval()
        pipe = ranks.pipeline
        sums = torch.zeros(3, dtype=torch.float64)  # nats, bytes, tokens
        batch = max(1, self.cfg.batch_size // self.cfg.grad_accum)
        for i in range(0, len(self.val_windows), batch):
            chunk = self.val_windows[i : i + batch]
            x = torch.stack([w[0] for w in chunk]).to(self.device)
            y = torch.stack([w[1] for w in chunk]).to(self.device)
            with self._autocast():
                logits = pipe.forward_only(x) if pipe else self.model(x)
            if logits is None:
                continue
            y = ranks.targets(y)
            sums[0] += cross_entropy(logits, y, ranks.vocab_group, reduction="sum").item()
            sums[1] += float(self.data.token_bytes[y.flatten().cpu()].sum())
            sums[2] += y.numel()
        # Every data-parallel and tp rank scored the same windows (tp: each its vocabulary columns, combined in
        # the loss); cp ranks scored disjoint tokens; on a pipeline only the last stage scored anything.
        nats, nbytes, ntok = (float(v) / (ranks.dp * ranks.tp) for v in ranks.sum_over_ranks(sums))
        return {"val_loss": nats / ntok, "val_bits_per_byte": nats / math.log(2) / nbytes}

    def fit(self) -> TrainResult:
        cfg = self.cfg
        if self.dist.is_main:
            for note in self.notes:
                console.print(f"[yellow]{note}[/]", highlight=False)
        last = last_record(self.run_dir / "metrics.jsonl") if self.recovery and self.dist.is_main else None
        metrics = distributed.metrics_log(self.dist) or MetricsLog(self.run_dir / "metrics.jsonl", self.resumed_from)
        result = TrainResult(self.run_dir, cfg.steps, resumed_from=self.resumed_from)
        tokens_per_step = cfg.batch_size * self.seq_len
        progress = Progress(
            TextColumn("[bold]train[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            disable=self.quiet,
        )
        checkpointer = Checkpointer(self.run_dir, cfg.keep_last, cfg.async_checkpoint)
        spikes = SpikeDetector()
        clock = CollectiveClock() if self.dist.world > 1 else None
        watchdog = Watchdog(cfg.hang_timeout_s) if cfg.hang_timeout_s > 0 else None
        every = cfg.checkpoint_every if isinstance(cfg.checkpoint_every, int) else None  # None: auto, decided below
        end = min(cfg.steps, cfg.stop_after or cfg.steps)
        plain = None if self.quiet or console.is_terminal else LogProgress(cfg.steps, self.step)
        with progress:
            task = progress.add_task("train", total=cfg.steps, completed=self.step, info="")
            while self.step < end:
                self.faults.before_step(self.step + 1)
                t0 = time.perf_counter()
                with clock or contextlib.nullcontext():
                    stats = self.train_step()
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                tps = tokens_per_step / dt
                record: dict[str, Any] = {"step": self.step, **stats, "tokens_per_s": tps, "step_time_s": dt}
                record.update(throughput(tps, self.flops_per_token, self.peak, self.dist.world))
                if clock is not None:  # compute apart from collective waits: the slow rank is the one waited for
                    record.update(straggler_report(dt, clock))
                if self.guard.skipped and self.guard.bad_in_a_row:
                    record["skipped"] = "non-finite gradient: update skipped"
                    console.print(f"step {self.step}: non-finite loss/gradient, update skipped "
                                  f"({self.guard.bad_in_a_row} in a row)", highlight=False)
                elif spikes.is_spike(stats["loss"]):
                    record["loss_spike"] = True
                    console.print(f"step {self.step}: loss spike ({stats['loss']:.3f})", highlight=False)
                if self.peer is not None and self.step % self.peer.every == 0:
                    t_snap = time.perf_counter()
                    problem = self.peer.snapshot(self.step, self._state(), {"data_position": self.sampler.position,
                                                                            "rng": ckpt.encode_rng()})
                    if problem and problem not in self.notes:  # once, not every K steps
                        self.notes.append(problem)
                        console.print(f"[yellow]rank {self.dist.rank}: {problem}[/]", highlight=False)
                    record["peer_snapshot_s"] = round(time.perf_counter() - t_snap, 4)
                if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                    record.update(self.evaluate())
                    result.final_val_bpb = record["val_bits_per_byte"]
                record["time"] = round(time.time(), 3)  # the step and its snapshot are done
                if last is not None:  # the first step after a restart: the fault cost this much
                    record["recovered"] = recovered(last, record, self.recovery or {}, self.resumed_from or 0)
                    last = None
                metrics.write(record)
                result.losses.append(stats["loss"])
                if self.guard.wants_rollback:
                    self._rollback(checkpointer, metrics, result)
                    continue
                if every is None:  # the first step of this process measures C, whatever its number
                    self.save_checkpoint(checkpointer)  # measures the checkpoint cost C
                    every = self._auto_interval(checkpointer.last_blocking_s, dt, end)
                elif (every and self.step % every == 0) or self.step == end:
                    self.save_checkpoint(checkpointer)
                checkpointer.poll()
                if watchdog is not None:
                    watchdog.beat()
                info = f"loss {stats['loss']:.3f}  {tps:,.0f} tok/s  MFU {record['mfu']:.1%}"
                if "val_bits_per_byte" in record:
                    info += f"  val {record['val_bits_per_byte']:.3f} bpb"
                progress.update(task, completed=self.step, info=info)
                if plain is not None:
                    plain.update(self.step, info)
        checkpointer.wait()
        if self.peer is not None:
            self.peer.discard()
        if watchdog is not None:
            watchdog.stop()
        metrics.close()
        if self.lock is not None:
            self.lock.release()
        return result


    def _auto_interval(self, cost_s: float, step_s: float, end: int) -> int:
        """`--checkpoint-every auto`: Young/Daly from the measured save cost and the simulator's MTBF."""
        from gigafactory.sim import mtbf_seconds

        gpus = self.cfg.fleet_gpus or self.dist.world
        mtbf = mtbf_seconds(gpus)
        every = young_daly_steps(cost_s, mtbf, step_s, end)
        console.print(f"checkpoint every {every} steps: Young/Daly with a {cost_s:.2f} s save and an MTBF of "
                      f"{mtbf / 3600:.1f} h for {gpus:,} GPUs", highlight=False)
        return every

    def _rollback(self, checkpointer: Checkpointer, metrics: Any, result: TrainResult) -> None:
        checkpointer.wait()
        bad = self.guard.bad_in_a_row
        self.notes.clear()
        if not self._resume(keep_data_position=True):
            raise UserError(f"{bad} non-finite steps in a row and no checkpoint to roll back to; lower the "
                            "learning rate or check the data")
        self.rollbacks = self.rollbacks + 1 if self.step == self._rolled_back_to else 1
        self._rolled_back_to = self.step
        if self.rollbacks > 3:  # fresh batches did not help: the model itself diverges
            raise UserError(f"3 rollbacks to step {self.step} did not get past it: training keeps producing "
                            "non-finite values; lower the learning rate or check the data")
        self.guard.bad_in_a_row = 0
        metrics.truncate(self.step)
        del result.losses[self.step - (result.resumed_from or 0) :]
        console.print(f"{bad} non-finite steps in a row: rolled back to step {self.step}, skipping those batches",
                      highlight=False)


def train(cfg: TrainConfig, quiet: bool = False) -> TrainResult:
    return Trainer(cfg, quiet=quiet).fit()
