"""CPU threads on a shared machine (torch-free: it must run before torch is imported).

PyTorch's CPU build uses GNU OpenMP, whose worker threads spin at every barrier before they sleep
(OMP_WAIT_POLICY unset means "spin for a while"). On a machine where another process keeps a core busy, one of
training's threads runs only part of the time, every parallel region waits for it at a barrier, and the
spinning threads burn the time slices that thread needs: a step of the `small` demo went from 1.7 s to 60 s.
``OMP_WAIT_POLICY=PASSIVE`` makes waiting threads sleep, so a busy neighbour costs about its share of the cores
instead (`benchmarks/train_throughput.py --busy` prints both). The thread count stays PyTorch's default (one per
core); an explicit OMP_WAIT_POLICY or OMP_NUM_THREADS from the user is kept. GNU OpenMP reads its environment
once, when the library loads, so `gigafactory train` and `gigafactory launch` call this before importing torch.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping


def shared_machine_env(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set the OpenMP wait policy for a shared machine unless the user chose one; return what was set."""
    env = os.environ if environ is None else environ
    if "OMP_WAIT_POLICY" in env:
        return {}
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    return {"OMP_WAIT_POLICY": "PASSIVE"}
