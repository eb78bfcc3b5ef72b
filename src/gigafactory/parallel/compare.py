"""Measured bytes per collective beside the planner's prediction (`plan.costmodel.collective_bytes`)."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from gigafactory.plan.costmodel import collective_bytes
from gigafactory.specs import ModelSpec
from gigafactory.specs.layout import Layout

KINDS = ("all_gather", "reduce_scatter", "all_reduce", "all_to_all", "send_recv", "other")


def predicted_bytes(spec: ModelSpec, layout: Layout, batch_size: int, grad_accum: int, seq_len: int,
                    act_bytes: int, pp_rank: int | None = None,
                    capacity_factor: float | None = None) -> dict[str, float]:
    """The planner's figures for exactly this run: its micro-batch is the trainer's per-rank micro-batch, and
    parameters are gathered in fp32 unless training in bf16 (FSDP then gathers bf16 copies). `pp_rank`: the
    pipeline rank whose point-to-point bytes count (default: the average over pipeline ranks).
    `capacity_factor`: the run's ``moe_capacity_factor``."""
    micro = batch_size // grad_accum // layout.dp
    lay = layout.model_copy(update={"micro_batch": micro})
    # This trainer's TP sums the router's gate gradients over tp.
    ends = (1, 1)
    if layout.pp > 1:  # how often the schedule gathers the first and the last stage (and their roots)
        from gigafactory.parallel.pipeline import stage_unshards

        count = functools.partial(stage_unshards, layout.pp_schedule, layout.pp, layout.pp_virtual, grad_accum)
        ends = (count(0, 0), count(layout.pp - 1, layout.pp * layout.pp_virtual - 1))
    return collective_bytes(spec, lay, batch_size, seq_len, dtype_bytes=act_bytes, grad_bytes=4,
                            router_grads_over_tp=True, pp_rank=pp_rank, capacity_factor=capacity_factor,
                            root_gathers=ends)


def measured_bytes(metrics_path: Path) -> dict[str, float]:
    """Bytes per collective of the last logged step (every step moves the same bytes)."""
    lines = [ln for ln in Path(metrics_path).read_text().splitlines() if ln.strip()]
    last = json.loads(lines[-1])
    return {k[len("comm_"):-len("_bytes")]: float(v) for k, v in last.items()
            if k.startswith("comm_") and k.endswith("_bytes")}


def comparison_rows(measured: dict[str, float], predicted: dict[str, float]) -> list[dict[str, Any]]:
    rows = []
    for kind in KINDS:
        m, p = measured.get(kind, 0.0), predicted.get(kind, 0.0)
        if not m and not p:
            continue
        rel = (m - p) / p if p else None
        rows.append({"collective": kind, "measured": m, "predicted": p, "rel_diff": rel})
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    out = [f"{'collective':<15}{'measured B':>14}{'predicted B':>14}{'diff':>9}"]
    for r in rows:
        diff = "n/a" if r["rel_diff"] is None else f"{r['rel_diff']:+.1%}"
        out.append(f"{r['collective']:<15}{r['measured']:>14,.0f}{r['predicted']:>14,.0f}{diff:>9}")
    return "\n".join(out)
