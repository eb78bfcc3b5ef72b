"""Peak memory and time of one attention layer (forward + backward) as the sequence grows: 1k, 2k, 4k, 8k tokens.

The layer is the `small` preset's attention module (8 query heads, 4 KV heads, head dim 32), batch 1, fp32, on
this CPU. Two cores of `gigafactory.model.attention` are compared in one run:
- `attend` as the model calls it (block-wise, flash-style: memory linear in the sequence length);
- `attend_naive`, the whole score matrix at once (what the model did before; memory quadratic), up to the
  length given by --naive-max.
Peak memory is measured by PyTorch's `MemTracker` (every tensor allocated under it, by category). Printed as
ratios to the 1k figure, so linear growth reads 1, 2, 4, 8 and quadratic 1, 4, 16, 64.

    .venv/bin/python benchmarks/attention_memory.py [--lengths 1024,2048,4096,8192] [--naive-max 4096]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from unittest import mock

import torch
from torch.distributed._tools.mem_tracker import MemTracker

from gigafactory.model import grok
from gigafactory.model.attention import attend, attend_naive
from gigafactory.specs import PRESETS


def one_layer(core: Callable, t: int) -> tuple[float, float]:
    """(peak bytes, seconds) of forward + backward of one attention layer over t tokens."""
    spec = PRESETS["small"]
    torch.manual_seed(0)
    layer = grok.Attention(spec, 0)
    x = torch.randn(1, t, spec.d_model, requires_grad=True)
    keys = grok.key_positions(torch.ones(1, t, dtype=torch.long))
    cos, sin = grok.rope_tables(keys.q_pos, spec.head_dim, spec.rope_theta)
    tracker = MemTracker()
    tracker.track_external(layer)
    with mock.patch.object(grok, "attend", core), tracker:
        t0 = time.perf_counter()
        layer(x, cos, sin, keys, None).square().mean().backward()
        seconds = time.perf_counter() - t0
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    return float(peak), seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="1024,2048,4096,8192")
    ap.add_argument("--naive-max", type=int, default=4096)
    args = ap.parse_args()
    lengths = [int(v) for v in args.lengths.split(",")]
    print(f"one `small` attention layer, forward + backward, batch 1, fp32, {torch.get_num_threads()} threads")
    print(f"{'tokens':>7} | {'block-wise MiB':>14} {'x first':>7} {'s':>6} | {'full-square MiB':>15} {'x first':>7} "
          f"{'s':>6}")
    first: dict[str, float] = {}
    for t in lengths:
        row = f"{t:>7} |"
        for name, core in (("blockwise", attend), ("naive", attend_naive)):
            if name == "naive" and t > args.naive_max:
                row += f" {'(skipped)':>15} {'':>7} {'':>6}"
                continue
            peak, sec = one_layer(core, t)
            first.setdefault(name, peak)
            width = 14 if name == "blockwise" else 15
            row += f" {peak / 2**20:>{width}.1f} {peak / first[name]:>7.2f} {sec:>6.2f}"
            if name == "blockwise":
                row += " |"
        print(row, flush=True)
    print(f"linear growth reads x{lengths[-1] // lengths[0]} at {lengths[-1]} tokens; quadratic "
          f"x{(lengths[-1] // lengths[0]) ** 2}")


if __name__ == "__main__":
    main()
