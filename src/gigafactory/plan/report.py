"""Self-contained HTML report (plotly.js embedded inline, so it opens offline)."""

from __future__ import annotations

import html
from typing import Any

from gigafactory.plan.campaign import Campaign
from gigafactory.plan.costmodel import StepCost


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
    divs = "".join(f.to_html(full_html=False, include_plotlyjs=False) for f in (fig, bars, pie))
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
