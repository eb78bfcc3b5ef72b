"""A self-contained HTML report: plotly.js is embedded inline once, so the file opens offline and can be mailed."""

from __future__ import annotations

import html
from pathlib import Path

from gigafactory.errors import UserError
from gigafactory.sim.montecarlo import SimResult

_DAY = 86_400.0


def _figures(res: SimResult) -> list:
    import plotly.graph_objects as go  # plotly is only needed for reports

    tl = res.timeline
    timeline = go.Figure()
    timeline.add_trace(
        go.Scatter(
            x=[t / _DAY for t in tl["t_s"]],
            y=[w / 3600.0 for w in tl["work_s"]],
            mode="lines",
            name="committed training progress",
            line={"width": 1.5},
        )
    )
    by_cause: dict[str, list[dict]] = {}
    for ev in tl["events"]:
        by_cause.setdefault(ev["cause"], []).append(ev)
    for cause, evs in sorted(by_cause.items(), key=lambda kv: -len(kv[1])):
        timeline.add_trace(
            go.Scatter(
                x=[e["t_s"] / _DAY for e in evs],
                y=[0.0] * len(evs),
                mode="markers",
                marker={"symbol": "line-ns-open", "size": 10},
                name=f"{cause} ({len(evs)})",
                text=[f"{cause}: down {e['down_s'] / 60:.1f} min" for e in evs],
                hoverinfo="text+x",
            )
        )
    timeline.update_layout(
        title="Timeline of replica 0: training progress kept (drops = work lost to a failure) and interruptions",
        xaxis_title="wall-clock time (days)",
        yaxis_title="useful training time (hours)",
        height=520,
    )

    x = res.sweep_intervals_s / 60.0
    m = res.sweep_goodput_mean * 100
    h = res.sweep_goodput_halfwidth * 100
    sweep = go.Figure()
    sweep.add_trace(go.Scatter(x=x, y=m + h, mode="lines", line={"width": 0}, showlegend=False, hoverinfo="skip"))
    sweep.add_trace(
        go.Scatter(x=x, y=m - h, mode="lines", line={"width": 0}, fill="tonexty", name="95% CI", hoverinfo="skip")
    )
    sweep.add_trace(go.Scatter(x=x, y=m, mode="lines+markers", name="mean goodput"))
    sweep.add_vline(x=res.best_checkpoint_interval_s / 60, line_dash="solid", annotation_text="best (simulated)")
    sweep.add_vline(
        x=res.young_daly_interval_s / 60, line_dash="dash", annotation_text="Young/Daly", annotation_position="bottom"
    )
    sweep.update_layout(
        title="Goodput versus checkpoint interval (same failure draws for every interval)",
        xaxis_title="checkpoint interval (minutes, log scale)",
        yaxis_title="goodput (%)",
        xaxis_type="log",
        height=420,
    )

    causes = list(res.lost_gpu_hours_by_cause.items())[::-1]
    lost = go.Figure(go.Bar(x=[v for _, v in causes], y=[k for k, _ in causes], orientation="h"))
    lost.update_layout(
        title="Lost GPU-hours by cause (mean per campaign: rework + downtime; checkpoint stalls separately)",
        xaxis_title="GPU-hours",
        height=max(360, 22 * len(causes) + 120),
        margin={"l": 200},
    )
    return [timeline, sweep, lost]


def _summary_table(res: SimResult) -> str:
    c = res.config
    lo, hi = res.goodput_ci95
    rows = [
        ("GPUs / nodes / hot spares", f"{c.gpus:,} / {c.nodes:,} / {c.spares}"),
        ("campaign", f"{c.days:g} days, {c.replicas} replicas, seed {c.seed}"),
        ("checkpoints", f"{c.checkpoint_mode}, write {c.checkpoint_cost_s:g} s, stall {c.stall_s:g} s"),
        ("detection / restart / repair", f"{c.detection_s:g} s / {c.restart_s:g} s / {c.repair_h:g} h"),
        ("interruptions", f"{res.interruptions_mean:,.1f} ({res.interruptions_per_day:.2f} per day)"),
        ("job MTBF (unexpected)", f"{res.mtbf_s / 3600:.2f} h"),
        ("goodput", f"{res.goodput_mean:.2%} (95% CI {lo:.2%} to {hi:.2%})"),
        ("checkpoint interval used", f"{res.checkpoint_interval_s:,.0f} s"),
        (
            "best interval (sweep) / Young-Daly",
            f"{res.best_checkpoint_interval_s:,.0f} s / {res.young_daly_interval_s:,.0f} s",
        ),
        ("time: useful / checkpoint / rework / down", " / ".join(f"{v:.2%}" for v in res.time_fractions.values())),
    ]
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def render_html(res: SimResult) -> str:
    figs = _figures(res)
    parts = [
        fig.to_html(full_html=False, include_plotlyjs=(i == 0), config={"displaylogo": False})
        for i, fig in enumerate(figs)
    ]
    style = (
        "body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}"
        "table{border-collapse:collapse}th,td{padding:4px 12px;border-bottom:1px solid #ddd;text-align:left}"
    )
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>gigafactory simulate</title>"
        f"<style>{style}</style></head><body>"
        f"<h1>Reliability simulation: {res.config.gpus:,} GPUs, {res.config.days:g} days</h1>"
        f"{_summary_table(res)}{''.join(parts)}"
        "<p>Failure rates: Llama 3 interruption table (Dubey et al. 2024, Table 5), scaled per GPU, node or job.</p>"
        "</body></html>"
    )


def write_report(res: SimResult, path: str | Path) -> Path:
    out = Path(path)
    try:
        out.write_text(render_html(res), encoding="utf-8")
    except OSError as err:
        raise UserError(f"cannot write report {out}: {err.strerror or err}") from None
    return out
