"""Benchmark: checkpoint hashing per rank does not grow with the number of ranks.

The same state (the `small` model's fp32 weights and Adam moments, sharded evenly) is saved by 2 and then 4 gloo
ranks through `gigafactory.checkpoint.save`; each rank hashes only the files it wrote and the manifest records each
rank's hashing time. Printed as ratios measured in one run, beside the old scheme (one rank hashing every file).

Run: /work/heavy.sh .venv/bin/python benchmarks/checkpoint_hashing.py [--model small] [--worlds 2,4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def worker(out: Path, model: str) -> None:
    import torch
    import torch.distributed as dist

    from gigafactory import checkpoint as ckpt
    from gigafactory.specs import load_spec

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    n = load_spec(model).params_total * 3  # weights + two Adam moments, fp32
    local = torch.randn(n // world, generator=torch.Generator().manual_seed(rank))
    ckpt.save(out, 1, {f"shard{rank}": local}, {"data_position": 1})
    dist.barrier()
    dist.destroy_process_group()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="small")
    p.add_argument("--worlds", default="2,4")
    p.add_argument("--worker", type=Path)
    a = p.parse_args()
    if a.worker:
        worker(a.worker, a.model)
        return 0
    from gigafactory.util import sha256_file

    rows = []
    for world in (int(w) for w in a.worlds.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
                   __file__, "--model", a.model, "--worker", tmp]
            subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            path = Path(tmp) / "ckpt" / "step_000001"
            manifest = json.loads((path / "manifest.json").read_text())
            files = manifest["files"]
            t0 = time.perf_counter()
            for name in files:
                sha256_file(path / name)
            one_rank_all = time.perf_counter() - t0
            per_rank_bytes = max(sum(i["bytes"] for i in files.values() if i["rank"] == r) for r in range(world))
            rows.append((world, max(manifest["hash_s_by_rank"]), per_rank_bytes, one_rank_all,
                         sum(i["bytes"] for i in files.values())))
    for world, hash_max, per_rank, all_s, total in rows:
        print(f"{world} ranks: {total / 1e6:,.0f} MB in all, {per_rank / 1e6:,.0f} MB per rank; slowest rank hashed "
              f"in {hash_max:.3f} s; one rank hashing everything (the old scheme): {all_s:.3f} s")
    (w0, h0, *_), (w1, h1, *_) = rows[0], rows[-1]
    print(f"slowest rank's hashing time, {w1} vs {w0} ranks: x{h1 / h0:.2f} (same state; the old scheme: "
          f"x{rows[-1][3] / rows[0][3]:.2f}, and {rows[-1][3] / h1:.1f}x the per-rank time at {w1} ranks)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
