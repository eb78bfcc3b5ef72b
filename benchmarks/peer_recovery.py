"""Benchmark: recovering a killed rank from its peer's host memory vs from the disk checkpoint.

Two 2-rank gloo jobs under torchrun, alike except for `--peer-snapshot-every 2` in the first: rank 1 is SIGKILLed
before step 7, after the disk checkpoint of step 4 and (first job) the peer snapshot of step 6. Each restarted job
logs a `recovered` event in metrics.jsonl; printed for both, and as ratios measured in one run:

- downtime: from the last step finished before the fault to the first one finished after it (detection, restart,
  restore, one step);
- restore: the trainer's own restore (peer checksum + exchange + load, or manifest check + DCP load);
- back to the fault: until the step the fault interrupted (7) is done, which adds the steps redone from an older
  disk checkpoint.

The disk checkpoint was written a moment before and sits in the page cache, so the disk figures are a best case; a
shared file system under load is slower.

Run: /work/heavy.sh .venv/bin/python benchmarks/peer_recovery.py [--model small]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def job(run: Path, model: str, peer_every: int) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=1",
           "-m", "gigafactory", "train", "--model", model, "--steps", "8", "--run-dir", str(run), "--layout",
           "dp_shard=2", "--batch-size", "4", "--seq-len", "32", "--dtype", "fp32", "--checkpoint-every", "4",
           "--sync-checkpoint", "--eval-every", "100", "--warmup-steps", "2",
           "--peer-snapshot-every", str(peer_every)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
           "GIGAFACTORY_FAULT": "kill:rank=1:step=7", "GIGAFACTORY_PEER_STORE": str(run.parent / f"shm{peer_every}")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-4000:])
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    at = next(i for i, r in enumerate(rows) if "recovered" in r)
    event = rows[at]["recovered"]
    fault_step = event["last_step_before"] + 1
    last_before = rows[at]["time"] - event["downtime_s"]
    event["back_s"] = next(r["time"] for r in rows if r["step"] == fault_step) - last_before
    snaps = [r["peer_snapshot_s"] for r in rows if "peer_snapshot_s" in r]
    ckpt = next(iter(sorted((run / "ckpt").glob("step_*"))))
    size = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())
    return {**event, "snapshot_s": statistics.fmean(snaps) if snaps else None, "ckpt_bytes": size,
            "step_s": statistics.median(r["step_time_s"] for r in rows)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="small")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        peer = job(Path(tmp) / "peer", a.model, peer_every=2)
        disk = job(Path(tmp) / "disk", a.model, peer_every=0)
    assert peer["from"] == "peer" and disk["from"] == "disk", (peer, disk)
    print(f"model {a.model}, 2 gloo ranks, checkpoint {disk['ckpt_bytes'] / 1e6:.1f} MB, step {disk['step_s']:.3f} s")
    print(f"{'':24}{'peer memory':>14}{'disk':>12}{'disk / peer':>14}")
    for key, label in (("downtime_s", "downtime (s)"), ("restore_s", "restore in trainer (s)"),
                       ("back_s", "back to the fault (s)")):
        print(f"{label:24}{peer[key]:>14.3f}{disk[key]:>12.3f}{disk[key] / peer[key]:>14.2f}")
    print(f"resumed at step {peer['resumed_step']} from peer memory, {disk['resumed_step']} from disk")
    print(f"peer snapshot cost: {peer['snapshot_s']:.3f} s per snapshot ({peer['snapshot_s'] / peer['step_s']:.2f} "
          "steps), blocking, every 2 steps")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
