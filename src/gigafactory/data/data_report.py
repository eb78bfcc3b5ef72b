"""The self-contained HTML report of a prepared dataset (plotly.js inline, so it opens offline)."""

from __future__ import annotations

import html
from typing import Any


def _table(rows: list[tuple[str, str]]) -> str:
    return "<table>" + "".join(f"<tr><td>{html.escape(a)}</td><td>{html.escape(b)}</td></tr>" for a, b in rows) + \
        "</table>"


def render_report(manifest: dict[str, Any], summary: dict[str, Any]) -> str:
    import plotly.graph_objects as go
    from plotly.offline import get_plotlyjs

    read = summary["read"]
    kept = summary["kept_train"] + summary["kept_val"]
    rows = [("documents read", f"{read:,}"), ("kept (train + validation)",
            f"{kept:,} ({summary['kept_train']:,} + {summary['kept_val']:,})"),
            ("input", f"{summary['input_bytes'] / 1e6:,.1f} MB"),
            ("near-duplicate candidate pairs checked", f"{summary['near_dup_candidates_checked']:,}"),
            ("near-duplicate clusters", f"{summary['near_dup_clusters']:,}")]
    for split, info in manifest["splits"].items():
        rows.append((f"{split} tokens", f"{info['tokens']:,} in {len(info['shards'])} shards"))
    for kind, n in sorted(summary["pii_replaced"].items()):
        rows.append((f"PII replaced: {kind}", f"{n:,}"))
    dropped = dict(sorted(summary["dropped"].items(), key=lambda kv: -kv[1]))
    bars = go.Figure(go.Bar(x=["kept", *dropped], y=[kept, *dropped.values()],
                            text=[f"{v:,}" for v in [kept, *dropped.values()]]))
    bars.update_layout(title="Documents kept and dropped, by rule (first failing rule)", height=420,
                       yaxis_title="documents")
    hist = go.Figure()
    hist.add_trace(go.Histogram(x=summary["kept_chars"], name="kept", opacity=0.7))
    hist.add_trace(go.Histogram(x=summary["dropped_chars"], name="dropped", opacity=0.7))
    hist.update_layout(barmode="overlay", title="Document length (characters, after normalisation)", height=420,
                       xaxis_title="characters", yaxis_title="documents", xaxis_type="log")
    clusters = "".join(
        f"<tr><td>{html.escape(str(c['kept']))}</td><td>{c['size']}</td>"
        f"<td>{html.escape(', '.join(map(str, c['members'])))}</td></tr>" for c in summary["largest_clusters"])
    divs = "".join(f.to_html(full_html=False, include_plotlyjs=False) for f in (bars, hist))
    cfg = manifest["config"]["dedup"]
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Dataset report</title>
<script type="text/javascript">{get_plotlyjs()}</script>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto}}
td,th{{padding:2px 12px;border-bottom:1px solid #ddd;text-align:left}}</style></head>
<body><h1>Dataset report</h1>
{_table(rows)}
{divs}
<h2>Largest near-duplicate clusters</h2>
<p>MinHash with {cfg['num_perm']} functions in {cfg['bands']} bands over word {cfg['shingle']}-grams; a pair is a
near duplicate when its estimated Jaccard similarity is at least {cfg['threshold']}.</p>
<table><tr><th>kept document</th><th>cluster size</th><th>some dropped members</th></tr>{clusters}</table>
</body></html>
"""
