"""Measured bytes per collective per rank per step vs the planner, for the `tiny` spec on gloo.

    .venv/bin/python benchmarks/comm_bytes.py [--layouts dp_shard=2 tp=2 dp_shard=2,ep=2]

Each layout is a real torchrun job (5 steps, fp32); the measured figures are the trainer's metrics (a
dispatch-mode counter, averaged over ranks), the predicted ones `plan.costmodel.collective_bytes`."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from gigafactory.parallel.compare import comparison_rows, format_rows, measured_bytes, predicted_bytes
from gigafactory.specs import load_spec
from gigafactory.specs.layout import Layout

ARGS = ["--model", "tiny", "--steps", "3", "--batch-size", "8", "--grad-accum", "2", "--seq-len", "32",
        "--eval-every", "1000", "--checkpoint-every", "1000", "--dtype", "fp32"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layouts", nargs="+", default=["dp_shard=2", "tp=2", "dp_shard=2,ep=2"])
    args = ap.parse_args()
    spec = load_spec("tiny")
    with tempfile.TemporaryDirectory() as tmp:
        for text in args.layouts:
            layout = Layout.parse(text)
            run_dir = Path(tmp) / text.replace(",", "_").replace("=", "")
            cmd = [sys.executable, "-m", "gigafactory", "launch", "--nproc", str(layout.world_size), "train",
                   *ARGS, "--run-dir", str(run_dir), "--layout", text]
            subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            rows = comparison_rows(measured_bytes(run_dir / "metrics.jsonl"),
                                   predicted_bytes(spec, layout, 8, 2, 32, act_bytes=4))
            print(f"\n{layout.short()}\n{format_rows(rows)}")
            shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
