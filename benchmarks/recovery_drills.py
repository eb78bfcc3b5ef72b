"""Fault drills on 2 gloo ranks (`tiny`): how long each fault stops training, and whether the losses after it are
those of the uninterrupted run.

Each drill trains 10 steps with a checkpoint every 2 and injects one fault; the recovery time is the `recovered`
event the trainer writes into metrics.jsonl on the first step after the fault: seconds from the last step
finished before the fault to the first one finished after it (detection, restart, restore, one step). The losses
of all 10 steps are compared with an uninterrupted run of the same job. Drills:

- kill: rank 1 is SIGKILLed before step 7; torchrun's agent restarts both ranks; they resume from disk (step 6).
- hang: rank 1 stops responding before step 7; the watchdog (`--hang-timeout 4`) ends it, then as for kill.
- corrupt: the job dies before step 7 (no restarts left); a byte of the newest checkpoint (step 6) is flipped; the
  job is started again with `--auto-resume`: the checksum fails and it resumes from step 4.
- peer: as kill, with `--peer-snapshot-every 1`: the ranks resume from their peers' host memory (step 6).

Host loss is drilled by tests/test_hosts.py (network namespaces, needs root); see docs/survive.md.

Run: /work/heavy.sh .venv/bin/python benchmarks/recovery_drills.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

TRAIN = ["--model", "tiny", "--steps", "10", "--layout", "dp_shard=2", "--batch-size", "4", "--seq-len", "32",
         "--dtype", "fp32", "--checkpoint-every", "2", "--sync-checkpoint", "--eval-every", "100",
         "--warmup-steps", "2", "--keep-last", "5"]


def run(run_dir: Path, fault: str = "", restarts: int = 1, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           f"--max-restarts={restarts}", "-m", "gigafactory", "train", "--run-dir", str(run_dir), *TRAIN, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
           "GIGAFACTORY_FAULT": fault, "GIGAFACTORY_PEER_STORE": str(run_dir.parent / f"shm-{run_dir.name}")}
    return subprocess.run(cmd, capture_output=True, text=True, env=env)


def losses(run_dir: Path) -> tuple[list[float], dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    event = next((r["recovered"] for r in rows if "recovered" in r), {})
    return [r["loss"] for r in rows], event


def flip_a_byte(run_dir: Path) -> None:
    newest = sorted((run_dir / "ckpt").glob("step_*"))[-1]
    victim = max(newest.glob("*.distcp"), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))


def drill(name: str, tmp: Path) -> tuple[Path, str]:
    d = tmp / name
    if name == "kill":
        proc = run(d, "kill:rank=1:step=7")
        cmd = "GIGAFACTORY_FAULT=kill:rank=1:step=7 torchrun --max-restarts=1 ..."
    elif name == "hang":
        proc = run(d, "hang:rank=1:step=7", extra=("--hang-timeout", "4"))
        cmd = "GIGAFACTORY_FAULT=hang:rank=1:step=7 torchrun --max-restarts=1 ... --hang-timeout 4"
    elif name == "peer":
        proc = run(d, "kill:rank=1:step=7", extra=("--peer-snapshot-every", "1"))
        cmd = "GIGAFACTORY_FAULT=kill:rank=1:step=7 torchrun --max-restarts=1 ... --peer-snapshot-every 1"
    else:
        first = run(d, "kill:rank=1:step=7", restarts=0)
        assert first.returncode != 0
        flip_a_byte(d)
        proc = run(d, "", extra=("--auto-resume",))
        cmd = "kill rank 1 before step 7 (no restarts), flip a byte of step_000006, rerun with --auto-resume"
    if proc.returncode != 0:
        raise SystemExit(f"drill {name} failed:\n{proc.stderr[-4000:]}")
    return d, cmd


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        clean = run(tmp / "clean")
        if clean.returncode != 0:
            raise SystemExit(clean.stderr[-4000:])
        reference, _ = losses(tmp / "clean")
        print("| fault | recovery time (s) | restored from | steps redone | losses vs uninterrupted | command |")
        print("|---|---|---|---|---|---|")
        for name in ("kill", "hang", "corrupt", "peer"):
            d, cmd = drill(name, tmp)
            got, event = losses(d)
            diff = max(abs(a - b) for a, b in zip(reference, got, strict=True))
            same = "bitwise equal" if got == reference else f"max diff {diff:.1e}"
            where = f"{event.get('from')} (step {event.get('resumed_step')})"
            print(f"| {name} | {event.get('downtime_s', float('nan')):.2f} | {where} | {event.get('lost_steps')} | "
                  f"{same} | `{cmd}` |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
