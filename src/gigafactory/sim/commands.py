"""`gigafactory simulate`: failures, recovery and checkpoint cadence of a training campaign, by Monte Carlo."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from gigafactory.errors import UserError
from gigafactory.sim.profiles import DEFAULT_PROFILE, PROFILES


class NodeLoss(StrEnum):
    wait = "wait"
    elastic = "elastic"


class CheckpointMode(StrEnum):
    async_ = "async"
    blocking = "blocking"


def _load_failure_model(path: Path) -> list[Any]:
    from pydantic import TypeAdapter, ValidationError

    from gigafactory.sim.failures import FailureMode

    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise UserError(f"cannot read failure model {path}: {err.strerror or err}") from None
    except json.JSONDecodeError as err:
        raise UserError(f"failure model {path} is not valid JSON: {err}") from None
    try:
        return TypeAdapter(list[FailureMode]).validate_python(raw)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise UserError(f"failure model {path}: {where}: {first['msg']}") from None


def simulate(
    gpus: int = typer.Option(..., help="GPUs in the job"),
    days: float = typer.Option(30.0, help="campaign length in days"),
    replicas: int = typer.Option(100, help="Monte Carlo replicas"),
    seed: int = typer.Option(0, help="random seed (same seed, same result)"),
    checkpoint_interval: float | None = typer.Option(
        None, "--checkpoint-interval", help="seconds of training between checkpoints (default: best from the sweep)"
    ),
    checkpoint_cost: float = typer.Option(60.0, "--checkpoint-cost", help="seconds to write one checkpoint"),
    checkpoint_mode: CheckpointMode = typer.Option(CheckpointMode.async_, "--checkpoint-mode"),
    checkpoint_stall: float = typer.Option(5.0, "--checkpoint-stall", help="async: seconds the step loop pauses"),
    detection: float = typer.Option(60.0, "--detection", help="seconds from a fault to its detection"),
    restart: float = typer.Option(300.0, "--restart", help="seconds to relaunch and load the checkpoint"),
    spares: int | None = typer.Option(None, "--spares", help="hot-spare nodes (default 1% of nodes; 0 = wait)"),
    repair_hours: float = typer.Option(24.0, "--repair-hours", help="hours to repair a failed node"),
    maintenance_hours: float | None = typer.Option(
        None, "--maintenance-hours", help="hours between planned stops (default: Llama 3's 47 in 54 days)"
    ),
    no_maintenance: bool = typer.Option(False, "--no-maintenance", help="no planned maintenance"),
    rate_scale: float = typer.Option(1.0, "--rate-scale", help="multiply every failure rate"),
    gpus_per_node: int = typer.Option(8, "--gpus-per-node"),
    profile: str = typer.Option(
        DEFAULT_PROFILE, "--profile", help=f"failure rates of: {', '.join(PROFILES)} (see docs/simulate.md)"
    ),
    fabric: str = typer.Option("single-plane", "--fabric", help="single-plane or dual-plane network"),
    watchdog: float = typer.Option(600.0, "--watchdog", help="seconds before a hang is noticed (collective timeout)"),
    node_loss: NodeLoss = typer.Option(
        NodeLoss.wait, "--node-loss", help="no spare ready: wait for the repair, or continue elastically on fewer nodes"
    ),
    failure_model: Path | None = typer.Option(
        None, "--failure-model", help="JSON list of failure modes {name, scope: gpu|node|job, rate_per_day, ...}"
    ),
    report: Path | None = typer.Option(None, "--report", help="write a self-contained HTML report here"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Simulate failures, recovery and checkpointing of a training campaign; report goodput and the best interval."""
    from gigafactory.sim.config import make_config
    from gigafactory.sim.montecarlo import simulate as run

    kwargs: dict[str, Any] = {
        "gpus": gpus,
        "days": days,
        "replicas": replicas,
        "seed": seed,
        "checkpoint_interval_s": checkpoint_interval,
        "checkpoint_cost_s": checkpoint_cost,
        "checkpoint_mode": checkpoint_mode.value,
        "checkpoint_stall_s": checkpoint_stall,
        "detection_s": detection,
        "restart_s": restart,
        "spare_nodes": spares,
        "repair_h": repair_hours,
        "maintenance": not no_maintenance,
        "maintenance_interval_h": maintenance_hours,
        "rate_scale": rate_scale,
        "gpus_per_node": gpus_per_node,
        "profile": profile,
        "fabric": fabric,
        "watchdog_s": watchdog,
        "node_loss": node_loss.value,
    }
    if failure_model is not None:
        kwargs["failure_modes"] = _load_failure_model(failure_model)
    cfg = make_config(**kwargs)

    err = Console(stderr=True)
    # About 1.5e10 GPU-day-replicas per second on 2 cores; below a second or so a bar is only flicker.
    if not as_json and err.is_terminal and gpus * days * replicas > 1.5e10:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(
            TextColumn("simulating"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeRemainingColumn(),
            console=err,
            transient=True,
        ) as bar:
            task = bar.add_task("sim", total=replicas, rate="")

            def tick(done: int, total: int) -> None:
                speed = bar.tasks[0].speed
                bar.update(task, completed=done, rate=f"{speed:,.0f} replicas/s" if speed else "")

            res = run(cfg, progress=tick)
    else:
        res = run(cfg)

    if report is not None:
        from gigafactory.sim.sim_report import write_report

        write_report(res, report)
    if as_json:
        out = res.to_dict()
        if report is not None:
            out["report"] = str(report)
        print(json.dumps(out, indent=2))
        return
    _print_tables(res, report)


def _print_tables(res: Any, report: Path | None) -> None:
    c = res.config
    console = Console()
    lo, hi = res.goodput_ci95
    ilo, ihi = res.interruptions_ci95
    t = Table(title=f"simulated campaign: {c.gpus:,} GPUs x {c.days:g} days ({c.replicas} replicas, seed {c.seed})")
    t.add_column("quantity")
    t.add_column("value", justify="right")
    t.add_row("interruptions", f"{res.interruptions_mean:,.1f}  (95% CI {ilo:,.1f} to {ihi:,.1f})")
    t.add_row("interruptions per day", f"{res.interruptions_per_day:.2f}")
    t.add_row("job MTBF, unexpected", f"{res.mtbf_s / 3600:.2f} h")
    if res.mtti_h is not None:
        t.add_row("mean time to interruption", f"{res.mtti_h:,.1f} h")
    t.add_row("failure profile / fabric", f"{c.profile} / {c.fabric}")
    t.add_row("goodput", f"{res.goodput_mean:.2%}  (95% CI {lo:.2%} to {hi:.2%})")
    t.add_row("checkpoint interval used", f"{res.checkpoint_interval_s:,.0f} s")
    t.add_row("best interval (sweep)", f"{res.best_checkpoint_interval_s:,.0f} s")
    t.add_row("Young/Daly sqrt(2CM)", f"{res.young_daly_interval_s:,.0f} s  (goodput {res.goodput_at_young_daly:.2%})")
    f = res.time_fractions
    t.add_row("time: checkpoint / rework / down", f"{f['checkpoint']:.2%} / {f['rework']:.2%} / {f['down']:.2%}")
    t.add_row("hot spares / mode", f"{c.spares} nodes / {c.checkpoint_mode} checkpoints / node loss: {c.node_loss}")
    if f.get("degraded"):
        t.add_row("time on fewer nodes (elastic)", f"{f['degraded']:.2%} of the job's capacity")
    console.print(t)

    lost = Table(title="lost GPU-hours by cause (mean per campaign)")
    lost.add_column("cause")
    lost.add_column("interruptions", justify="right")
    lost.add_column("GPU-hours", justify="right")
    for cause, hours in res.lost_gpu_hours_by_cause.items():
        n = res.interruptions_by_cause.get(cause)
        lost.add_row(cause, "" if n is None else f"{n:,.1f}", f"{hours:,.0f}")
    console.print(lost)
    if report is not None:
        console.print(f"report: {report}")


def validate_sim(
    replicas: int = typer.Option(50, help="Monte Carlo replicas per scenario"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Compare the simulator with published failure figures (Llama 3, Meta RSC, OPT-175B, BLOOM)."""
    from gigafactory.sim.published import compare

    rows = compare(replicas=replicas)
    if as_json:
        print(json.dumps(rows, indent=2))
    else:
        t = Table(title="simulator vs published failure figures")
        for col in ("figure", "profile", "published", "simulated", "ratio", "check"):
            t.add_column(col, justify="right" if col in ("published", "simulated", "ratio") else "left")
        for r in rows:
            bound = f">= {r['published']:g}" if r["kind"] == "at_least" else f"within {r['factor']:g}x"
            tag = " (calibrated)" if r["calibrated"] else ""
            t.add_row(r["what"] + tag, r["profile"], f"{r['published']:,.3g}", f"{r['simulated']:,.3g}",
                      f"{r['ratio']:.2f}", ("ok " if r["holds"] else "OFF ") + bound)
        Console().print(t)
    if not all(r["holds"] for r in rows):
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("simulate")(simulate)
    app.command("validate-sim")(validate_sim)
