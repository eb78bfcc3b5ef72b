"""Self-contained HTML report (plotly.js embedded inline, so it opens offline)."""

from __future__ import annotations

import html
from typing import Any

from gigafactory.plan.campaign import Campaign
from gigafactory.plan.costmodel import StepCost

LOSS_NAMES = {"pipeline_bubble": "pipeline bubble", "optimizer": "optimizer step", "exposed_tp": "tensor-parallel "
              "communication", "exposed_ep": "expert all-to-all", "exposed_cp": "context-parallel ring",
              "exposed_pp": "pipeline sends", "exposed_fsdp_gather": "parameter all-gathers",
              "exposed_dp_grads": "gradient reduction"}


def sweep_counts(lo: int = 1_000, hi: int = 100_000, points: int = 17, extra: int | None = None) -> list[int]:
    """Log-spaced GPU counts from lo to hi in whole units (256-GPU scalable units from 1,024 up, 8-GPU nodes
    below), so each point has as many layouts as its neighbours: the curve shows scale, not divisibility."""
    out = set()
    for i in range(points):
        n = lo * (hi / lo) ** (i / (points - 1))
        unit = 256 if n >= 1024 else 8
        out.add(max(unit, round(n / unit) * unit))
    if extra:
        out.add(extra)
    return sorted(out)


def sweep_point(n: int, cost: StepCost, days: float) -> dict[str, Any]:
    """One point of the curve: MFU, days and the step time split into compute and each loss (fractions)."""
    parts = {"compute": cost.compute_s, "pipeline_bubble": cost.bubble_s, "optimizer": cost.optimizer_s,
             **{f"exposed_{k}": v for k, v in cost.exposed_comm_s.items()}}
    total = sum(parts.values()) or 1.0
    return {"n_gpus": n, "mfu": cost.mfu, "days": days, "layout": cost.layout.short(),
            "micro_batches": cost.n_micro, "fractions": {k: v / total for k, v in parts.items()}}


def explain_curve(points: list[dict[str, Any]]) -> list[str]:
    """Say what dominates at each scale: consecutive points grouped by their largest loss (or compute-bound when
    every loss is under 10 % of the step)."""
    def regime(p: dict[str, Any]) -> str:
        losses = {k: v for k, v in p["fractions"].items() if k != "compute"}
        k, v = max(losses.items(), key=lambda kv: kv[1]) if losses else ("", 0.0)
        return k if v >= 0.10 else "compute"

    groups: list[list[dict[str, Any]]] = []
    for p in points:
        if groups and regime(groups[-1][-1]) == regime(p):
            groups[-1].append(p)
        else:
            groups.append([p])
    lines = []
    for g in groups:
        a, b = g[0], g[-1]
        r = regime(a)
        span = f"{a['n_gpus']:,}" + (f" to {b['n_gpus']:,}" if b is not a else "") + " GPUs"
        mfu = f"MFU {100 * a['mfu']:.0f}%" + (f" to {100 * b['mfu']:.0f}%" if b is not a else "")
        if r == "compute":
            lines.append(f"{span}: compute-bound ({mfu}); every loss is under 10% of the step.")
            continue
        share = max(100 * p["fractions"][r] for p in g)
        why = ""
        if r in ("exposed_dp_grads", "exposed_fsdp_gather"):
            why = (f" Each GPU runs {b['micro_batches']} micro-batch(es) per step, so the per-layer data-parallel "
                   "traffic has little compute to hide behind, and its ring latency grows with the group.")
        elif r == "pipeline_bubble":
            why = " Too few micro-batches per pipeline stage to fill the pipeline."
        lines.append(f"{span}: limited by {LOSS_NAMES.get(r, r)} (up to {share:.0f}% of the step; {mfu}).{why}")
    return lines


def sweep_points(points: list[dict[str, Any]]) -> tuple[list[int], list[float], list[float]]:
    return [p["n_gpus"] for p in points], [100 * p["mfu"] for p in points], [p["days"] for p in points]


def render(title: str, cost: StepCost, camp: Campaign, sweep: list[dict[str, Any]], why: list[str],
           summary_rows: list[tuple[str, str]]) -> str:
    import plotly.graph_objects as go
    from plotly.offline import get_plotlyjs
    from plotly.subplots import make_subplots

    xs, mfu, days = sweep_points(sweep)
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(go.Scatter(x=xs, y=mfu, name="MFU (%)", mode="lines+markers"), secondary_y=False)
    fig.add_trace(go.Scatter(x=xs, y=days, name="days (reliability-adjusted)", mode="lines+markers"),
                  secondary_y=True)
    fig.update_xaxes(type="log", title="GPUs")
    fig.update_yaxes(title="MFU (%)", secondary_y=False)
    fig.update_yaxes(title="days", type="log", secondary_y=True)
    fig.update_layout(title="Predicted MFU and days against GPU count", height=450)

    keys = sorted({k for p in sweep for k in p.get("fractions", {})}, key=lambda k: (k != "compute", k))
    area = go.Figure()
    for k in keys:
        area.add_trace(go.Scatter(x=xs, y=[100 * p.get("fractions", {}).get(k, 0.0) for p in sweep],
                                  name=LOSS_NAMES.get(k, k), stackgroup="one", mode="lines"))
    area.update_xaxes(type="log", title="GPUs")
    area.update_layout(title="Where each step's time goes, by GPU count (% of step)", height=420,
                       yaxis_title="% of step time")
    curve = "".join(f"<li>{html.escape(line)}</li>" for line in explain_curve(sweep))

    mem = {k: v / 1e9 for k, v in cost.memory.items()}
    bars = go.Figure(go.Bar(x=list(mem), y=list(mem.values()), text=[f"{v:.1f}" for v in mem.values()]))
    bars.add_hline(y=cost.memory_capacity / 1e9, line_dash="dash", annotation_text="usable HBM")
    bars.update_layout(title=f"Memory per GPU, {cost.layout.short()} (GB)", height=400, yaxis_title="GB")

    tb = {"compute": cost.compute_s, "pipeline bubble": cost.bubble_s, "optimizer": cost.optimizer_s,
          **{f"exposed {k}": v for k, v in cost.exposed_comm_s.items() if v > 0}}
    pie = go.Figure(go.Bar(x=list(tb), y=list(tb.values())))
    pie.update_layout(title="Step time breakdown (s)", height=380, yaxis_title="seconds")

    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in summary_rows)
    reasons = "".join(f"<li>{html.escape(w)}</li>" for w in why)
    divs = "".join(f.to_html(full_html=False, include_plotlyjs=False) for f in (fig, area))
    divs += f"<h2>What dominates at each scale</h2><ul>{curve}</ul>"
    divs += "".join(f.to_html(full_html=False, include_plotlyjs=False) for f in (bars, pie))
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<script type="text/javascript">{get_plotlyjs()}</script>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto}}
td{{padding:2px 12px;border-bottom:1px solid #ddd}}</style></head>
<body><h1>{html.escape(title)}</h1>
<table>{rows}</table>
<h2>Why this layout</h2><ul>{reasons}</ul>
<p>Reliability: {html.escape(camp.goodput_source)}.</p>
{divs}
</body></html>
"""
