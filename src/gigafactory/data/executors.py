"""Where the parallel stages run: local processes (the default) or Ray Data.

Both engines run the same top-level functions on the same task dictionaries and return their results in task
order; the functions write their outputs under the dataset folder (on a cluster it must be a shared filesystem,
as for any Ray Data job writing files). Nothing here decides what a result is, so the two engines cannot differ
in output: a test checks the shards are byte-identical."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from typing import Any

from gigafactory.errors import UserError

Task = dict[str, Any]
Log = Callable[[str], None]


class Engine:
    name = "engine"

    def map(self, fn: Callable[[Task], dict[str, Any]], tasks: list[Task], stage: str, log: Log,
            weights: list[int] | None = None) -> list[dict[str, Any]]:
        raise NotImplementedError


class _Progress:
    """Rate and ETA of a stage, by input bytes: a line at most every 5 s (and at the end)."""

    def __init__(self, stage: str, weights: list[int], log: Log) -> None:
        self.stage, self.weights, self.log = stage, weights, log
        self.total, self.done, self.count = sum(weights), 0, 0
        self.t0 = self.last = time.perf_counter()

    def step(self, index: int) -> None:
        self.done += self.weights[index]
        self.count += 1
        now = time.perf_counter()
        if now - self.last < 5 and self.count < len(self.weights):
            return
        self.last = now
        rate = self.done / max(now - self.t0, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        self.log(f"{self.stage}: {self.count}/{len(self.weights)} parts, {rate / 1e6:.2f} MB/s, ETA {eta:.0f} s")


class LocalEngine(Engine):
    """A pool of worker processes (spawned, one thread each); `workers=1` runs in this process."""

    def __init__(self, workers: int | None = None) -> None:
        self.workers = workers or cpu_count()
        self.name = f"local ({self.workers} process{'es' if self.workers > 1 else ''})"

    def map(self, fn: Callable[[Task], dict[str, Any]], tasks: list[Task], stage: str, log: Log,
            weights: list[int] | None = None) -> list[dict[str, Any]]:
        progress = _Progress(stage, weights or [1] * len(tasks), log)
        results: list[dict[str, Any] | None] = [None] * len(tasks)
        if self.workers == 1 or len(tasks) <= 1:
            for i, task in enumerate(tasks):
                results[i] = fn(task)
                progress.step(i)
            return results  # type: ignore[return-value]
        with ProcessPoolExecutor(min(self.workers, len(tasks)), mp_context=get_context("spawn"),
                                 initializer=_one_thread) as pool:
            futures = {pool.submit(fn, task): i for i, task in enumerate(tasks)}
            for fut in as_completed(futures):
                results[futures[fut]] = fut.result()
                progress.step(futures[fut])
        return results  # type: ignore[return-value]


def _one_thread() -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def _ray_row(fn: Callable[[Task], dict[str, Any]]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return _RayRow(fn)


class _RayRow:
    """Ray Data rows carry each task as JSON text (Arrow would reshape nested dictionaries)."""

    def __init__(self, fn: Callable[[Task], dict[str, Any]]) -> None:
        self.fn = fn

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        _one_thread()
        task = json.loads(row["task"])
        return {"index": row["index"], "result": json.dumps(self.fn(task))}


class RayEngine(Engine):
    """Ray Data: one row per task, `map` with one CPU per task, streamed back as they finish.

    `address` is "auto" (join the cluster in RAY_ADDRESS or start a local Ray) or a cluster address."""

    def __init__(self, address: str = "auto") -> None:
        try:
            import ray
        except ImportError:
            raise UserError("--ray needs Ray Data: pip install 'ray[data]'") from None
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if address != "auto":
                kwargs["address"] = address
            try:
                ray.init(**kwargs)
            except (ConnectionError, ValueError, RuntimeError) as err:
                raise UserError(f"cannot reach Ray at {address}: {str(err).splitlines()[0]}") from None
        self.name = f"ray ({int(ray.cluster_resources().get('CPU', 0))} CPUs)"

    def map(self, fn: Callable[[Task], dict[str, Any]], tasks: list[Task], stage: str, log: Log,
            weights: list[int] | None = None) -> list[dict[str, Any]]:
        import ray.data

        progress = _Progress(stage, weights or [1] * len(tasks), log)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        rows = [{"index": i, "task": json.dumps(t)} for i, t in enumerate(tasks)]
        ds = ray.data.from_items(rows, override_num_blocks=max(1, len(rows))).map(_ray_row(fn), num_cpus=1)
        results: list[dict[str, Any] | None] = [None] * len(tasks)
        for row in ds.iter_rows():
            results[row["index"]] = json.loads(row["result"])
            progress.step(row["index"])
        return results  # type: ignore[return-value]


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def make_engine(ray: str | None, workers: int | None) -> Engine:
    return RayEngine(ray) if ray else LocalEngine(workers)
