"""Training throughput on this machine, as ratios measured in one run (the machine is shared and noisy).

Prints, for a preset (default `small`, 16 x 256 tokens a step, fp32 on a CPU):
- tokens/s of our trainer's step;
- achieved model FLOP/s (the spec's flops_per_token convention) as a fraction of the measured matmul peak;
- the speed of our trainer's step relative to a minimal plain-PyTorch loop over the same model and batches
  (the same module, AdamW, cross-entropy; no guards, schedule, metrics or MoE aux losses).
The two loops alternate step by step so that background load hits both alike; medians are reported.

With --busy it measures a shared machine instead: our trainer's step time with and without one competing
busy process (a pure-Python spin loop), under OpenMP's default wait policy (threads spin at barriers) and under
the one `gigafactory train` sets (`train/threads.py`: OMP_WAIT_POLICY=PASSIVE), each in a fresh process since
OpenMP reads its environment once. Printed: the slowdown ratio busy / quiet for both (goal <= 2).

    .venv/bin/python benchmarks/train_throughput.py [--model small] [--steps 12]
    .venv/bin/python benchmarks/train_throughput.py --busy [--steps 3] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from gigafactory.model import GrokModel
from gigafactory.train.config import make_config
from gigafactory.train.device import measured_peak_flops
from gigafactory.train.loop import Trainer


def trainer_step_time(model: str, steps: int, batch_size: int) -> float:
    """Median seconds per step of our trainer (after one warm-up step)."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = make_config(model=model, run_dir=tmp, steps=10_000, batch_size=batch_size, dtype="fp32")
        tr = Trainer(cfg, quiet=True)
        tr.train_step()
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            tr.train_step()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _child(args: argparse.Namespace, policy: str | None, busy: bool) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        out = subprocess.run([sys.executable, __file__, "--child", "--model", args.model, "--steps", str(args.steps),
                              "--batch-size", str(args.batch_size)], env=env, capture_output=True, text=True,
                             check=True)
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
    return float(json.loads(out.stdout.strip().splitlines()[-1])["step_s"])


def busy_main(args: argparse.Namespace) -> None:
    from gigafactory.train.threads import shared_machine_env

    ours = shared_machine_env({})["OMP_WAIT_POLICY"]
    print(f"model {args.model}, batch {args.batch_size}, {os.cpu_count()} cores, threads: PyTorch default; "
          f"median of {args.steps} steps")
    for label, policy in (("OpenMP default (spin)", None), (f"gigafactory ({ours})", ours)):
        quiet = _child(args, policy, busy=False)
        busy = _child(args, policy, busy=True)
        print(f"{label:<26} quiet {quiet:7.2f} s/step   one busy neighbour {busy:7.2f} s/step   "
              f"slowdown {busy / quiet:6.2f}x (goal <= 2)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="small")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--busy", action="store_true", help="measure the slowdown from one busy neighbour")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps({"step_s": trainer_step_time(args.model, args.steps, args.batch_size)}))
        return
    if args.busy:
        busy_main(args)
        return

    with tempfile.TemporaryDirectory() as tmp:
        cfg = make_config(model=args.model, run_dir=tmp, steps=10_000, batch_size=args.batch_size, dtype="fp32")
        ours = Trainer(cfg, quiet=True)
        spec, seq = ours.spec, ours.seq_len
        torch.manual_seed(0)
        plain = GrokModel(spec)  # plain loop: no aux losses, no clipping, no schedule, no guards
        opt = torch.optim.AdamW(plain.parameters(), lr=cfg.lr, foreach=True)
        batches = [ours.sampler.batch_at(10_000 + i) for i in range(4)]

        def plain_step(i: int) -> None:
            x, y = batches[i % len(batches)]
            loss = F.cross_entropy(plain(x).flatten(0, 1), y.flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        for i in range(2):  # warm-up both
            ours.train_step()
            plain_step(i)
        t_ours, t_plain = [], []
        for i in range(args.steps):
            t0 = time.perf_counter()
            ours.train_step()
            t_ours.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            plain_step(i)
            t_plain.append(time.perf_counter() - t0)

    peak = measured_peak_flops("float32")
    tokens = args.batch_size * seq
    ours_s, plain_s = statistics.median(t_ours), statistics.median(t_plain)
    tps = tokens / ours_s
    achieved = tps * spec.flops_per_token(seq)
    print(f"model {spec.name}: {spec.params_total / 1e6:.1f} M params ({spec.params_active / 1e6:.1f} M active), "
          f"batch {args.batch_size} x {seq} tokens, fp32, {torch.get_num_threads()} threads")
    print(f"measured fp32 matmul peak        {peak / 1e9:8.1f} GFLOP/s")
    print(f"our trainer                      {ours_s:8.3f} s/step  {tps:8.0f} tokens/s  "
          f"{achieved / 1e9:6.1f} GFLOP/s")
    print(f"plain PyTorch loop               {plain_s:8.3f} s/step  {tokens / plain_s:8.0f} tokens/s")
    print(f"achieved / matmul peak           {achieved / peak:8.1%}   (goal >= 40%)")
    print(f"trainer speed / plain loop speed {plain_s / ours_s:8.3f}   (goal >= 0.95)")


if __name__ == "__main__":
    main()
