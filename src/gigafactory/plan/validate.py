"""Check the cost model against published training runs (the CSV format of ../shared/validation).

Each row is predicted under the layout the run used; empty cells (micro-batch, recompute, cp, ep) are filled by
searching the fastest choice that fits in memory, and the choice is reported. The software stack is chosen per GPU
generation, never per row: the published A100 runs are Megatron-LM 2021-22 (no flash attention, blocking
gradient all-reduce), the published H100 runs Megatron-Core 2024 (flash attention, overlapped gradient reduction).
"""

from __future__ import annotations

import csv
import statistics
from dataclasses import dataclass
from pathlib import Path

from gigafactory.errors import UserError
from gigafactory.plan.costmodel import MEGATRON_2021, MODERN, Cluster, Stack, StepCost, estimate
from gigafactory.specs.hardware import get_gpu
from gigafactory.specs.layout import Layout
from gigafactory.specs.model_spec import ModelSpec, spec_from_dict

STACK_BY_GENERATION: dict[str, Stack] = {"ampere": MEGATRON_2021, "hopper": MODERN, "blackwell": MODERN}
# How many weight matrices an FFN of each activation has; a gated spec of width 2F/3 has the same
# parameters and FLOPs as a two-matrix FFN of width F.
FFN_MATRICES = {"gelu": 2, "squared_relu": 2, "relu": 2, "swiglu": 3, "geglu": 3}
CONVENTIONS = ("hw_tflops_per_gpu", "model_tflops_per_gpu", "mfu_pct")
REQUIRED = ("id", "layers", "d_model", "n_heads", "ffn_hidden", "ffn_act", "vocab", "seq_len", "gpu_type",
            "n_gpus", "tp", "pp", "dp", "global_batch_seqs", "metric", "value")


@dataclass
class RowResult:
    id: str
    metric: str
    reported: float
    predicted: float
    layout: Layout
    filled: dict[str, str]
    cost: StepCost

    @property
    def rel_error(self) -> float:
        return (self.predicted - self.reported) / self.reported

    def to_dict(self) -> dict[str, object]:
        return {"id": self.id, "metric": self.metric, "reported": self.reported, "predicted": self.predicted,
                "rel_error": self.rel_error, "layout": self.layout.model_dump(), "filled_by_search": self.filled,
                "step_time_s": self.cost.step_time_s, "mfu": self.cost.mfu}


def _int(row: dict[str, str], col: str, default: int | None = None) -> int:
    raw = (row.get(col) or "").strip()
    if not raw:
        if default is None:
            raise UserError(f"row {row.get('id') or '?'}: column {col} is empty but required")
        return default
    try:
        value = float(raw)
    except ValueError:
        raise UserError(f"row {row.get('id') or '?'}: column {col}={raw!r} is not a number") from None
    if value != int(value) or value < 1:
        raise UserError(f"row {row.get('id') or '?'}: column {col}={raw!r} must be a positive integer")
    return int(value)


def spec_from_row(row: dict[str, str]) -> ModelSpec:
    rid = row.get("id") or "?"
    act = (row.get("ffn_act") or "").strip().lower()
    if act not in FFN_MATRICES:
        raise UserError(f"row {rid}: column ffn_act={act!r} is unknown; use one of {', '.join(FFN_MATRICES)}")
    d = _int(row, "d_model")
    heads = _int(row, "n_heads")
    if d % heads:
        raise UserError(f"row {rid}: column n_heads={heads} does not divide d_model={d}")
    ffn = _int(row, "ffn_hidden")
    experts = _int(row, "experts", 1)
    gated_width = round(ffn * FFN_MATRICES[act] / 3)
    return spec_from_dict(
        {
            "name": f"row-{rid}", "d_model": d, "n_layers": _int(row, "layers"), "n_heads": heads,
            "n_kv_heads": _int(row, "n_kv_heads", heads), "head_dim": d // heads, "vocab_size": _int(row, "vocab"),
            "max_seq_len": _int(row, "seq_len"), "n_experts": experts, "top_k": _int(row, "top_k", 1),
            "expert_ffn": gated_width, "tie_embeddings": True,
        },
        f"row {rid}",
    )


def predict_row(row: dict[str, str]) -> RowResult:
    rid = (row.get("id") or "").strip() or "?"
    for col in REQUIRED:
        if not (row.get(col) or "").strip():
            raise UserError(f"row {rid}: column {col} is empty but required")
    spec = spec_from_row(row)
    gpu = get_gpu(row["gpu_type"])
    stack = STACK_BY_GENERATION[gpu.generation]
    n = _int(row, "n_gpus")
    tp, pp, dp, cp = _int(row, "tp"), _int(row, "pp"), _int(row, "dp"), _int(row, "cp", 1)
    ep = _int(row, "ep", 1)
    if tp * pp * dp * cp != n:
        raise UserError(f"row {rid}: column dp: tp·pp·dp·cp = {tp * pp * dp * cp}, not n_gpus={n}")
    gbs = _int(row, "global_batch_seqs")
    seq = _int(row, "seq_len")
    metric = row["metric"].strip()
    if metric not in CONVENTIONS:
        raise UserError(f"row {rid}: column metric={metric!r} unknown; use one of {', '.join(CONVENTIONS)}")
    try:
        reported = float(row["value"])
    except ValueError:
        raise UserError(f"row {rid}: column value={row['value']!r} is not a number") from None
    if reported <= 0:
        raise UserError(f"row {rid}: column value must be positive")
    rec_raw = (row.get("activation_recompute") or "").strip().lower()
    if rec_raw and rec_raw not in ("none", "selective", "full"):
        raise UserError(f"row {rid}: column activation_recompute={rec_raw!r}; use none, selective or full")
    recomputes = [rec_raw] if rec_raw else ["none", "selective", "full"]
    mb_raw = (row.get("micro_batch") or "").strip()
    if mb_raw:
        mbs = [_int(row, "micro_batch")]
    else:
        mbs = [m for m in (1, 2, 4, 8, 16) if (gbs // dp) % m == 0] or [1]
    if gbs % dp:
        raise UserError(f"row {rid}: column global_batch_seqs={gbs} is not a multiple of dp={dp}")
    cluster = Cluster.of(gpu, n, "ib-ndr")
    best: tuple[StepCost, Layout] | None = None
    for rec in recomputes:
        for mb in mbs:
            if (gbs // dp) % mb:
                raise UserError(f"row {rid}: column micro_batch={mb} does not divide global_batch_seqs/dp")
            lay = Layout(dp_replicate=dp, tp=tp, pp=pp, cp=cp, ep=ep, micro_batch=mb,
                         recompute=rec)  # type: ignore[arg-type]
            try:
                lay.validate(spec, n, gpu.nvlink_domain)
            except UserError as err:
                raise UserError(f"row {rid}: column tp/pp/dp: {err}") from None
            cost = estimate(spec, lay, cluster, gbs, seq, stack)
            if (len(recomputes) > 1 or len(mbs) > 1) and not cost.fits:
                continue
            if best is None or cost.step_time_s < best[0].step_time_s:
                best = (cost, lay)
    if best is None:  # nothing fits: predict the most memory-frugal choice anyway
        lay = Layout(dp_replicate=dp, tp=tp, pp=pp, cp=cp, ep=ep, micro_batch=1,
                     recompute=recomputes[-1])  # type: ignore[arg-type]
        best = (estimate(spec, lay, cluster, gbs, seq, stack), lay)
    cost, lay = best
    filled = {}
    if not mb_raw:
        filled["micro_batch"] = str(lay.micro_batch)
    if not rec_raw:
        filled["activation_recompute"] = lay.recompute
    predicted = {"hw_tflops_per_gpu": cost.hw_tflops, "model_tflops_per_gpu": cost.model_tflops,
                 "mfu_pct": 100 * cost.mfu}[metric]
    return RowResult(rid, metric, reported, predicted, lay, filled, cost)


def validate_csv(path: str | Path) -> dict[str, object]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"validation file {p} not found")
    with p.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
        if missing:
            raise UserError(f"{p}: missing column(s) {', '.join(missing)}")
        rows = [predict_row(r) for r in reader]
    if not rows:
        raise UserError(f"{p}: no rows")
    errs = [abs(r.rel_error) for r in rows]
    return {
        "rows": [r.to_dict() for r in rows],
        "median_abs_rel_error": statistics.median(errs),
        "max_abs_rel_error": max(errs),
        "results": rows,
    }
