"""Ranks of multi-process runs for tests/test_parallel.py (started by torchrun; holds no tests itself).

Trains a small test model (`tests/data/deep_tiny.json`: 4 layers, so 2 pipeline ranks × 2 virtual stages have a
layer each) under a layout and saves, per rank, the losses and the full gradients of step 1 (taken just before
the optimizer step, i.e. after clipping, so the global gradient norm is checked as well). One torchrun job runs
several layouts of the same world size one after another (a process group per run) to save start-up time."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

SPEC = str(Path(__file__).with_name("data") / "deep_tiny.json")
STEPS, EVERY = 4, 2  # a run's steps; its checkpoints (every EVERY steps), of which resumes take the first


def config(run_dir: str, layout: str | None, resume: bool = False, steps: int = STEPS, dtype: str = "fp32",  # noqa: ANN201
           capacity: float | None = None):
    from gigafactory.train.config import make_config

    return make_config(model=SPEC, steps=steps, run_dir=run_dir, batch_size=8, grad_accum=2, seq_len=32, lr=3e-3,
                       warmup_steps=1, eval_every=100, eval_windows=4, checkpoint_every=EVERY, dtype=dtype,
                       layout=layout, resume=resume, moe_capacity_factor=capacity)


def resume_copy(src: Path, dst: Path) -> Path:
    """`src`'s run directory cut back to its step-EVERY checkpoint (as if it stopped there)."""
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "ckpt" / f"step_{STEPS:06d}")
    return dst


def run(run_dir: str, layout: str | None, resume: bool, dtype: str = "fp32", capacity: float | None = None) -> dict:
    from gigafactory.train.loop import Trainer

    tr = Trainer(config(run_dir, layout, resume, dtype=dtype, capacity=capacity), quiet=True)
    grads: dict[str, torch.Tensor] = {}

    def grab(_opt: object, _args: object, _kwargs: object) -> None:
        if tr.step == 0:
            for name, p in tr.model.named_parameters():
                if p.grad is not None:
                    g = p.grad
                    grads[name] = (g.full_tensor() if isinstance(g, DTensor) else g).detach().clone()

    tr.optimizer.register_step_pre_hook(grab)
    result = tr.fit()
    return {"losses": result.losses, "grads": grads, "trainer": tr}


if __name__ == "__main__":
    from gigafactory.train import distributed

    # argv: a JSON list of [run_dir, layout, out_prefix, "fresh" | "resume", dtype, MoE capacity factor or null,
    # source]: a source (a run directory trained earlier in this job) is copied, cut back to its first checkpoint,
    # to resume from. The default process group stays up between runs (each run builds its own mesh); it is torn
    # down at the end.
    res: dict = {}
    for run_dir, layout, out, mode, dtype, capacity, source in json.loads(sys.argv[1]):
        rank = int(os.environ["RANK"])
        if source:
            if rank == 0:
                resume_copy(Path(source), Path(run_dir))
            torch.distributed.barrier()
        res = run(run_dir, layout, mode == "resume", dtype, capacity)
        torch.save({"losses": res["losses"], "grads": res["grads"]}, f"{out}.rank{rank}.pt")
        torch.distributed.barrier()
    distributed.finish(res["trainer"].cfg, False, None)
