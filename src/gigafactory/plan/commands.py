"""`gigafactory plan` and `gigafactory validate-plan`."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from gigafactory.errors import UserError
from gigafactory.plan.campaign import DEFAULT_CHECKPOINT_S, DEFAULT_RESTART_S, campaign
from gigafactory.plan.costmodel import GIB, STACKS, Cluster, StepCost, estimate
from gigafactory.plan.search import SearchResult, search
from gigafactory.plan.sizing import (
    Sizing,
    largest_plannable,
    max_gpus,
    parse_duration,
    parse_money,
    parse_power,
    sizing,
    smallest_for_deadline,
)
from gigafactory.specs import hardware
from gigafactory.specs.layout import Layout
from gigafactory.specs.model_spec import load_spec
from gigafactory.train.config import option_help
from gigafactory.util import atomic_write_text

# Seed scenario defaults. Token budget 15T: Llama 3's pre-training budget (arXiv:2407.21783); Grok-2's is not
# public. Global batch 64M tokens: DeepSeek-V3's final batch, 15,360 × 4,096 tokens (arXiv:2412.19437 §4.2), the
# scale a 100k-GPU run needs to give every data-parallel rank work. Sequence length 8,192 for pre-training.
DEFAULT_TOKENS = "15T"
DEFAULT_BATCH = "64M"

_SUFFIX = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def parse_count(text: str, what: str) -> float:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmbgt]?)\s*", text.lower())
    if not m:
        raise UserError(f"{what} {text!r} is not a number like 15T, 64M or 2e9")
    value = float(m.group(1)) * _SUFFIX[m.group(2)]
    if value <= 0:
        raise UserError(f"{what} must be positive")
    return value


def _no_fit_message(spec_name: str, res: SearchResult, run: Any) -> str:
    if not res.evaluated:
        target = max(1, round(run.batch / run.seq))
        return f"no layout of {spec_name} evaluated on {run.n:,} GPUs: " + res.empty_reason(run.n, target, run.seq,
                                                                                              2.0)
    lean = res.leanest
    need = (lean.memory_total + GIB) / 0.92 / 1e9 if lean else float("nan")
    more = ""
    for factor in (2, 4, 8, 16, 32, 64):
        if run(factor).ranked:
            more = f" or at least {factor}× the GPUs ({run.n * factor:,})"
            break
    leanest = lean.layout.short() if lean else "-"
    return (f"no layout of {spec_name} fits in {run.gpu.hbm_bytes / 1e9:.0f} GB per GPU on {run.n:,} GPUs; the "
            f"leanest ({leanest}) needs {need:.0f} GB per GPU: use GPUs with ≥ {need:.0f} GB{more}")


class _Runner:
    def __init__(self, spec: Any, gpu: hardware.GPUSpec, n: int, fabric: str, batch: float, seq: int,
                 stack: Any, rank: str, fp8: bool = False, capacity_factor: float | None = None) -> None:
        self.spec, self.gpu, self.n, self.fabric = spec, gpu, n, fabric
        self.batch, self.seq, self.stack, self.rank, self.fp8 = batch, seq, stack, rank, fp8
        self.capacity_factor = capacity_factor

    def __call__(self, factor: int = 1, n: int | None = None) -> SearchResult:
        count = n if n is not None else self.n * factor
        return search(self.spec, Cluster.of(self.gpu, count, self.fabric), self.batch, self.seq, self.stack,
                      rank_by=self.rank, fp8=self.fp8, capacity_factor=self.capacity_factor)  # type: ignore[arg-type]


def plan(
    model: str = typer.Option("grok-2", help="preset (grok-1, grok-2, tiny, small) or a .toml/.json spec"),
    gpus: int | None = typer.Option(None, min=1, help="number of GPUs [default: 100000, or chosen by --power, "
                                    "--budget, --lease-budget or --deadline]"),
    power: str | None = typer.Option(None, help="site power (PUE and non-GPU load included), e.g. 100MW: plan "
                                     "the largest GPU count it feeds"),
    budget: str | None = typer.Option(None, help="all-in capital budget in dollars, e.g. 6B: plan the largest "
                                      "GPU count it buys"),
    lease_budget: str | None = typer.Option(None, help="monthly lease budget in dollars, e.g. 300M: plan the "
                                            "largest GPU count it rents"),
    deadline: str | None = typer.Option(None, help="training time, e.g. 90d: plan the smallest GPU count that "
                                        "trains --tokens in time (reliability included)"),
    gpu: str = typer.Option("h100-sxm", help=f"GPU type: {', '.join(hardware.GPUS)}"),
    fabric: str = typer.Option("spectrum-x", help=f"scale-out fabric: {', '.join(hardware.FABRICS)}"),
    tokens: str = typer.Option(DEFAULT_TOKENS, help="training tokens (15T, 2e12...)"),
    global_batch: str = typer.Option(DEFAULT_BATCH, help="target global batch in tokens (rounded per layout)"),
    seq_len: int = typer.Option(8192, min=1, help="training sequence length"),
    layout: str | None = typer.Option(None, help="evaluate this layout instead of searching, e.g. 'dp_shard=8,tp=8'"),
    rank: str = typer.Option("time", help="rank layouts by time or cost"),
    top: int = typer.Option(5, min=1, help="layouts to show"),
    stack: str = typer.Option("modern", help=f"software stack assumptions: {', '.join(STACKS)}"),
    precision: str = typer.Option("bf16", help="bf16, or fp8 (Transformer Engine FP8 GEMMs, the rest bf16; MFU "
                                  "stays relative to the BF16 peak)"),
    moe_capacity_factor: float | None = typer.Option(None, help=option_help("moe_capacity_factor")),
    checkpoint_s: float = typer.Option(DEFAULT_CHECKPOINT_S, min=0, help="blocking seconds per checkpoint"),
    restart_s: float = typer.Option(DEFAULT_RESTART_S, min=0, help="seconds to detect a failure and restart"),
    catalog: Path | None = typer.Option(None, help="TOML/JSON file overriding hardware/site values"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
    report: Path | None = typer.Option(None, help="write a self-contained HTML report here"),
    export: Path | None = typer.Option(None, help="write plan.json, torchrun.sh, train.sbatch, pytorchjob.yaml here"),
) -> None:
    """Plan a training run: layout, step time, MFU, memory, days, megawatts and dollars."""
    if catalog:
        hardware.load_catalog(catalog)
    if rank not in ("time", "cost"):
        raise UserError(f"--rank {rank!r}: use time or cost")
    if stack not in STACKS:
        raise UserError(f"unknown --stack {stack!r}; use {', '.join(STACKS)}")
    if precision not in ("bf16", "fp8"):
        raise UserError(f"--precision {precision!r}: use bf16 or fp8")
    if moe_capacity_factor is not None and moe_capacity_factor <= 0:
        raise UserError(f"--moe-capacity-factor {moe_capacity_factor}: use a positive factor, or none (dropless)")
    spec = load_spec(model)
    g = hardware.get_gpu(gpu)
    hardware.get_fabric(fabric)
    n_tokens = parse_count(tokens, "--tokens")
    batch = parse_count(global_batch, "--global-batch")
    if seq_len > spec.max_seq_len:
        raise UserError(f"--seq-len {seq_len} exceeds {spec.name}'s context {spec.max_seq_len}")
    st = STACKS[stack]
    site = hardware.get_site()
    fp8 = precision == "fp8"
    if fp8 and not g.fp8_dense_flops:
        raise UserError(f"--precision fp8: {g.name} has no FP8 tensor cores; use bf16 or an H100/H200/B200")
    run = _Runner(spec, g, gpus or 100_000, fabric, batch, seq_len, st, rank, fp8, moe_capacity_factor)
    sized = _size_fleet(run, gpus, power, budget, lease_budget, deadline, n_tokens, site, checkpoint_s, restart_s,
                        layout)
    gpus = run.n
    cluster = Cluster.of(g, gpus, fabric)
    why: list[str] = []
    result: SearchResult | None = sized[1] if sized else None
    if layout:
        lay = Layout.parse(layout).validate(spec, gpus, cluster.gpus_per_node)
        seqs = max(1, round(batch / seq_len))
        unit = lay.dp * lay.micro_batch
        best = estimate(spec, lay, cluster, -(-seqs // unit) * unit, seq_len, st, fp8=fp8,
                        capacity_factor=moe_capacity_factor)
        if not best.fits:
            raise UserError(f"layout {lay.short()} needs {best.memory_total / 1e9:.0f} GB per GPU but "
                            f"{g.name} has {best.memory_capacity / 1e9:.0f} GB usable; raise dp_shard/tp/pp or "
                            f"use recompute=full")
        shown = [best]
    else:
        result = result or run()
        if not result.ranked:
            raise UserError(_no_fit_message(spec.name, result, run))
        best = result.best
        shown = result.ranked[:top]
        why = result.why
    camp = campaign(best, g, gpus, n_tokens, site, checkpoint_s, restart_s)

    out: dict[str, Any] = {
        "model": spec.name, "params_total": spec.params_total, "params_active": spec.params_active,
        "gpu": g.name, "n_gpus": gpus, "fabric": fabric, "stack": st.name, "precision": precision,
        "moe_capacity_factor": moe_capacity_factor,
        "tokens": n_tokens,
        "target_global_batch_tokens": batch,
        "best": best.to_dict(), "campaign": camp.to_dict(),
        "top": [c.to_dict() for c in shown], "why": why,
    }
    if result is not None:
        out["search"] = {"evaluated": result.evaluated, "fitting": result.fitting, "seconds": result.seconds}
    if sized:
        out["sizing"] = sized[0].to_dict()

    written: list[Path] = []
    if export:
        from gigafactory.plan.launch import train_config, write_launch_files

        written = write_launch_files(export, train_config(spec, best, g, gpus, n_tokens, camp, moe_capacity_factor))
        out["launch_files"] = [str(p) for p in written]
    if report:
        _write_report(report, spec, g, run, best, camp, why, out)
        out["report"] = str(report)
    if as_json:
        print(json.dumps(out, indent=2, default=float))
        return
    _print(out, best, camp, shown, why, result, written, report)


def _size_fleet(run: _Runner, gpus: int | None, power: str | None, budget: str | None, lease: str | None,
                deadline: str | None, n_tokens: float, site: hardware.SiteSpec, checkpoint_s: float,
                restart_s: float, layout: str | None) -> tuple[Sizing, SearchResult] | None:
    """Answer --power/--budget/--lease-budget (largest count that fits) or --deadline (smallest that is in time);
    sets ``run.n`` to the chosen count. None when --gpus (or its default) decides."""
    asked = {k: v for k, v in (("power", power), ("budget", budget), ("lease_budget", lease),
                               ("deadline", deadline)) if v is not None}
    if not asked:
        return None
    if gpus is not None:
        raise UserError(f"--gpus and --{next(iter(asked)).replace('_', '-')} both choose the GPU count; give one")
    if layout:
        raise UserError("--layout needs --gpus (a fixed layout fixes the GPU count)")
    if "deadline" in asked:
        if len(asked) > 1:
            raise UserError("--deadline asks for the smallest fleet; do not combine it with --power/--budget")
        seconds = parse_duration(deadline or "")
        results: dict[int, SearchResult] = {}

        def days_of(n: int) -> float | None:
            res = results[n] = run(n=n)
            return campaign(res.best, run.gpu, n, n_tokens, site, checkpoint_s, restart_s).days if res.ranked \
                else None

        n, _ = smallest_for_deadline(seconds, days_of)
        run.n = n
        return sizing("deadline", seconds, None, n, run.gpu, site), results[n]
    watts = parse_power(power) if power else None
    dollars = parse_money(budget, "--budget") if budget else None
    monthly = parse_money(lease, "--lease-budget") if lease else None
    cap = max_gpus(run.gpu, site, watts, dollars, monthly)
    def explain(n: int, res: SearchResult) -> str:
        old, run.n = run.n, n
        try:
            return _no_fit_message(run.spec.name, res, lambda f: SearchResult([], 0, 0, 0.0, None, "time"))
        finally:
            run.n = old

    n, res = largest_plannable(cap, lambda c: run(n=c), explain)
    run.n = n
    question = "power" if len(asked) == 1 and power else "+".join(asked)
    limit = watts if watts is not None else dollars if dollars is not None else monthly
    return sizing(question, float(limit or 0.0), cap, n, run.gpu, site), res


def _sweep(run: _Runner, counts: list[int]) -> list[dict[str, Any]]:
    from rich.progress import Progress

    from gigafactory.plan.plan_report import sweep_point

    site = hardware.get_site()
    points = []
    with Progress(transient=True, console=Console(stderr=True)) as bar:
        task = bar.add_task("sweeping GPU counts", total=len(counts))
        for n in counts:
            res = run(n=n)
            if res.ranked:
                c = res.best
                camp = campaign(c, run.gpu, n, 15e12, site)
                points.append(sweep_point(n, c, camp.days))
            bar.advance(task)
    return points


def _write_report(path: Path, spec: Any, g: hardware.GPUSpec, run: _Runner, best: StepCost, camp: Any,
                  why: list[str], out: dict[str, Any]) -> None:
    from gigafactory.plan.plan_report import render, sweep_counts

    sweep = _sweep(run, sweep_counts(extra=run.n))
    for p in sweep:  # report days for the user's token budget
        p["days"] *= camp.tokens / 15e12
    rows = [(k, v) for k, v in _summary(out, best, camp)]
    title = f"gigafactory plan: {spec.name} on {run.n:,} × {g.name}"
    atomic_write_text(path, render(title, best, camp, sweep, why, rows))


def _summary(out: dict[str, Any], best: StepCost, camp: Any) -> list[tuple[str, str]]:
    rows = _sizing_rows(out.get("sizing"))
    return rows + [
        ("model", f"{out['model']} ({out['params_total'] / 1e9:.1f} B total, "
                  f"{out['params_active'] / 1e9:.1f} B active)"),
        ("cluster", f"{out['n_gpus']:,} × {out['gpu']} on {out['fabric']}"),
        ("layout", best.layout.short()),
        ("global batch", f"{best.global_batch_seqs:,} × {best.seq_len:,} tokens ({best.n_micro} micro-batches)"),
        ("step time", f"{best.step_time_s:.2f} s"),
        ("tokens/s", f"{best.tokens_per_s:,.0f}"),
        ("TFLOP/s per GPU", f"{best.model_tflops:.0f} model, {best.hw_tflops:.0f} hardware"),
        ("MFU", f"{best.mfu:.1%}"),
        ("memory per GPU", f"{best.memory_total / 1e9:.1f} of {best.memory_capacity / 1e9:.1f} GB usable"),
        ("tokens", f"{camp.tokens / 1e12:g} T"),
        ("days", f"{camp.days:.1f} ({camp.days_ideal:.1f} without failures; goodput {camp.goodput:.0%})"),
        ("GPU-hours", f"{camp.gpu_hours / 1e6:.1f} M"),
        ("peak site power", f"{camp.peak_site_mw:.1f} MW (PUE included)"),
        ("energy", f"{camp.energy_mwh:,.0f} MWh, electricity ${camp.electricity_usd / 1e6:.1f} M"),
        ("buy", f"${camp.buy_usd / 1e6:,.0f} M (capex ${camp.capex_usd / 1e6:,.0f} M + electricity)"),
        ("lease", f"${camp.lease_usd / 1e6:,.0f} M ({camp.gpu_hours / 1e6:.1f} M GPU-h at list price)"),
    ]


def _sizing_rows(sz: dict[str, Any] | None) -> list[tuple[str, str]]:
    if not sz:
        return []
    unit = {"power": (1e-6, "MW site power"), "budget": (1e-9, "$B capital"),
            "lease_budget": (1e-6, "$M lease per month"), "deadline": (1 / 86400, "days")}
    scale, name = unit.get(sz["question"], (1.0, sz["question"]))
    allowed = f", allows {sz['max_gpus_allowed']:,} GPUs" if sz["max_gpus_allowed"] else ""
    rows = [("asked", f"{sz['limit'] * scale:,.1f} {name}{allowed}; chosen {sz['chosen_gpus']:,} GPUs"),
            ("implies", f"{sz['site_power_mw']:.1f} MW site, ${sz['capex_usd'] / 1e9:.2f} B capital, "
                        f"${sz['lease_usd_per_month'] / 1e6:.1f} M/month lease")]
    if sz.get("note"):
        rows.append(("note", sz["note"]))
    return rows


def _console() -> Console:
    return Console() if sys.stdout.isatty() else Console(width=160)  # pipes and logs get whole rows


def _print(out: dict[str, Any], best: StepCost, camp: Any, shown: list[StepCost], why: list[str],
           result: SearchResult | None, written: list[Path], report: Path | None) -> None:
    con = _console()
    t = Table(title=f"plan: {out['model']} on {out['n_gpus']:,} × {out['gpu']}", show_header=False)
    t.add_column("what")
    t.add_column("value")
    for k, v in _summary(out, best, camp):
        t.add_row(k, v)
    con.print(t)
    if len(shown) > 1:
        top = Table(title="top layouts")
        for col in ("#", "layout", "batch seqs", "step s", "MFU", "memory GB", "bubble s", "exposed comm s"):
            if col == "layout":
                top.add_column(col, no_wrap=True)
            else:
                top.add_column(col, justify="right")
        for i, c in enumerate(shown, 1):
            top.add_row(str(i), c.layout.short(), f"{c.global_batch_seqs:,}", f"{c.step_time_s:.2f}", f"{c.mfu:.1%}",
                        f"{c.memory_total / 1e9:.1f}", f"{c.bubble_s:.2f}", f"{sum(c.exposed_comm_s.values()):.2f}")
        con.print(top)
    mem = Table(title="memory per GPU (GB)")
    for k in best.memory:
        mem.add_column(k, justify="right")
    mem.add_row(*(f"{v / 1e9:.2f}" for v in best.memory.values()))
    con.print(mem)
    coll = Table(title="collective payload bytes per rank per step (GB)")
    for k in best.collective_bytes:
        coll.add_column(k, justify="right")
    coll.add_row(*(f"{v / 1e9:.2f}" for v in best.collective_bytes.values()))
    con.print(coll)
    for line in why:
        con.print(f"• {line}", highlight=False)
    if result is not None:
        con.print(f"searched {result.evaluated:,} layouts ({result.fitting:,} fit) in {result.seconds:.2f} s; "
                  f"reliability: {camp.goodput_source}", highlight=False)
    for p in written:
        con.print(f"wrote {p}")
    if report:
        con.print(f"wrote {report}")


def validate_plan(
    files: list[Path] = typer.Argument(..., help="CSV file(s) of published runs (format of "
                                       "data/validation/public_runs.csv), e.g. public_runs.csv more_runs.csv"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Predict every published run in each FILE under the layout it used; print the relative errors per file."""
    from gigafactory.plan.validate import validate_csv

    results = [validate_csv(f) for f in files]  # every file is checked before anything is printed
    if as_json:
        out = [{k: v for k, v in res.items() if k != "results"} for res in results]
        if len(files) == 1:
            print(json.dumps(out[0], indent=2))
        else:
            print(json.dumps({"files": [{"file": str(f), **o} for f, o in zip(files, out, strict=True)]}, indent=2))
        return
    con = _console()
    for f, res in zip(files, results, strict=True):
        _print_validation(con, f, res)


def _print_validation(con: Console, file: Path, res: dict) -> None:
    t = Table(title=f"validation: {file}")
    for col in ("id", "metric", "reported", "predicted", "rel. error", "stack", "fits", "layout (filled by search)"):
        t.add_column(col, justify="right" if col in ("reported", "predicted", "rel. error") else "left")
    # rows whose published layout does not fit the memory model come last, apart
    for r in sorted(res["results"], key=lambda r: not r.fits):
        filled = ", ".join(f"{k}={v}" for k, v in r.filled.items())
        t.add_row(r.id, r.metric, f"{r.reported:.1f}", f"{r.predicted:.1f}", f"{r.rel_error:+.1%}", r.stack,
                  "yes" if r.fits else "NO", r.layout.short() + (f" ({filled})" if filled else ""))
    con.print(t)
    if res["median_abs_rel_error"] is not None:
        con.print(f"{res['rows_fitting_memory']} rows that fit: median |error| {res['median_abs_rel_error']:.1%}, "
                  f"max |error| {res['max_abs_rel_error']:.1%}")
    if res["rows_not_fitting_memory"]:
        con.print(f"{res['rows_not_fitting_memory']} rows whose published layout does not fit the memory model "
                  f"(counted apart): median |error| {res['median_abs_rel_error_not_fitting']:.1%}")


def register(app: typer.Typer) -> None:
    app.command("plan")(plan)
    app.command("validate-plan")(validate_plan)
