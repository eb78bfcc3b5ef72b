"""Check the cost model against published training runs (the CSV format of data/validation/public_runs.csv).

Each row is predicted under the layout, schedule, precision and software stack the run used; empty cells
(micro-batch, recompute, cp, ep) are filled by searching the fastest choice that fits in memory, and the choice is
reported. An empty ``stack`` means the generation's default (A100: megatron-2021, H100: megatron-core-2024); an
empty ``pp_schedule`` means the framework default (1F1B, one virtual stage). Rows whose published layout does not
fit the memory model are predicted anyway but flagged and counted apart: the model does not know how they ran.
"""

from __future__ import annotations

import csv
import statistics
from dataclasses import dataclass
from pathlib import Path

from gigafactory.errors import UserError
from gigafactory.plan.costmodel import (
    EXPERT_IMBALANCE,
    LAYERS_PER_VIRTUAL_STAGE,
    MEGATRON_2021,
    MEGATRON_CORE_2024,
    STACKS,
    Cluster,
    Stack,
    StepCost,
    default_virtual_stages,
    estimate,
)
from gigafactory.specs.hardware import get_gpu
from gigafactory.specs.layout import Layout
from gigafactory.specs.model_spec import ModelSpec, spec_from_dict

STACK_BY_GENERATION: dict[str, Stack] = {"ampere": MEGATRON_2021, "hopper": MEGATRON_CORE_2024,
                                         "blackwell": MEGATRON_CORE_2024}
DATA = Path(__file__).resolve().parents[1] / "data" / "validation"
PUBLIC_CSV = DATA / "public_runs.csv"  # constants are fitted on these rows only (as a whole)
MOE_CSV = DATA / "moe_runs.csv"  # the project's MoE rows: predicted, never fitted
# How many weight matrices an FFN of each activation has; a gated spec of width 2F/3 has the same
# parameters and FLOPs as a two-matrix FFN of width F.
FFN_MATRICES = {"gelu": 2, "squared_relu": 2, "relu": 2, "swiglu": 3, "geglu": 3}
CONVENTIONS = ("hw_tflops_per_gpu", "model_tflops_per_gpu", "mfu_pct", "tokens_per_s_per_gpu", "step_time_s")
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
    stack: str = ""

    @property
    def rel_error(self) -> float:
        return (self.predicted - self.reported) / self.reported

    def to_dict(self) -> dict[str, object]:
        return {"id": self.id, "metric": self.metric, "reported": self.reported, "predicted": self.predicted,
                "rel_error": self.rel_error, "layout": self.layout.model_dump(), "filled_by_search": self.filled,
                "step_time_s": self.cost.step_time_s, "mfu": self.cost.mfu, "stack": self.stack,
                "fits_memory": self.fits, "memory_gb": self.cost.memory_total / 1e9,
                "memory_capacity_gb": self.cost.memory_capacity / 1e9}

    @property
    def fits(self) -> bool:
        return self.cost.fits


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
    head_dim = _int(row, "head_dim", d // heads if d % heads == 0 else None)
    ffn = _int(row, "ffn_hidden")
    experts = _int(row, "experts", 1)
    gated_width = round(ffn * FFN_MATRICES[act] / 3)
    return spec_from_dict(
        {
            "name": f"row-{rid}", "d_model": d, "n_layers": _int(row, "layers"), "n_heads": heads,
            "n_kv_heads": _int(row, "n_kv_heads", heads), "head_dim": head_dim, "vocab_size": _int(row, "vocab"),
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
    stack = _stack(row, rid, gpu.generation)
    fp8 = "fp8" in (row.get("precision") or "").lower()
    balance = (row.get("expert_balance") or "").strip().lower()
    if balance not in ("", "forced"):
        raise UserError(f"row {rid}: column expert_balance={balance!r}; leave it empty or write forced")
    imbalance = 1.0 if balance == "forced" else EXPERT_IMBALANCE
    sched = (row.get("pp_schedule") or "").strip().lower() or "1f1b"
    if sched not in ("1f1b", "interleaved", "gpipe", "zero_bubble"):
        raise UserError(f"row {rid}: column pp_schedule={sched!r}; use 1f1b, interleaved, zero_bubble or gpipe")
    pp_raw = _int(row, "pp", 1)
    if sched == "interleaved" and not (row.get("pp_virtual") or "").strip() and pp_raw > 1:
        virtual = default_virtual_stages(spec.n_layers, pp_raw)  # stated in costmodel.LAYERS_PER_VIRTUAL_STAGE
    else:
        virtual = _int(row, "pp_virtual", 1)
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
            lay = _row_layout(dp, tp, pp, cp, ep, mb, rec, sched, virtual, stack)
            try:
                lay.validate(spec, n, gpu.nvlink_domain)
            except UserError as err:
                raise UserError(f"row {rid}: column tp/pp/dp: {err}") from None
            cost = estimate(spec, lay, cluster, gbs, seq, stack, fp8=fp8, expert_imbalance=imbalance)
            if (len(recomputes) > 1 or len(mbs) > 1) and not cost.fits:
                continue
            if best is None or cost.step_time_s < best[0].step_time_s:
                best = (cost, lay)
    if best is None:  # nothing fits: predict the most memory-frugal choice anyway
        lay = _row_layout(dp, tp, pp, cp, ep, 1, recomputes[-1], sched, virtual, stack)
        best = (estimate(spec, lay, cluster, gbs, seq, stack, fp8=fp8, expert_imbalance=imbalance), lay)
    cost, lay = best
    filled = {}
    if not mb_raw:
        filled["micro_batch"] = str(lay.micro_batch)
    if not rec_raw:
        filled["activation_recompute"] = lay.recompute
    if sched == "interleaved" and not (row.get("pp_virtual") or "").strip():
        filled["pp_virtual"] = f"{lay.pp_virtual} (about {LAYERS_PER_VIRTUAL_STAGE} layers per virtual stage)"
    if lay.ep != ep:
        filled["ep"] = f"{ep} folded over tp={tp}, modelled as {lay.ep} groups of tp-split experts"
    scale = 1.0
    if "causal" in (row.get("flops_convention") or "").lower():  # the source counts the causal half of attention
        full = spec.flops_per_token(seq)
        scale = (full - spec.attention_flops_per_token(seq) / 2) / full
    predicted = {"hw_tflops_per_gpu": cost.hw_tflops, "model_tflops_per_gpu": cost.model_tflops * scale,
                 "mfu_pct": 100 * cost.mfu * scale, "tokens_per_s_per_gpu": cost.tokens_per_s / n,
                 "step_time_s": cost.step_time_s}[metric]
    return RowResult(rid, metric, reported, predicted, lay, filled, cost, stack.name)


def _stack(row: dict[str, str], rid: str, generation: str) -> Stack:
    name = (row.get("stack") or "").strip().lower().replace(" ", "-").replace("_", "-")
    if not name:
        return STACK_BY_GENERATION[generation]
    if name not in STACKS:
        raise UserError(f"row {rid}: column stack={name!r} is unknown; use one of {', '.join(STACKS)}")
    return STACKS[name]


def _row_layout(dp: int, tp: int, pp: int, cp: int, ep: int, mb: int, rec: str, sched: str, virtual: int,
                stack: Stack) -> Layout:
    """The published layout. dp always goes to dp_shard: Megatron-style stacks treat every dp rank alike (the
    distributed optimizer shards over all of them), expert parallelism borrows data-parallel ranks, and FSDP
    stacks shard over the whole data-parallel group unless the row says otherwise (torchtitan's
    data_parallel_shard_degree defaults to -1, all ranks; FSDP2's fully_shard over the default mesh).
    Megatron-Core folds ep over tp × dp with experts not tensor-split (MoE parallel folding): ep = tp·e is modelled
    as e expert groups of tp-split experts, the same expert FLOPs, weights and tokens per GPU."""
    if ep > dp * cp and ep % tp == 0:
        ep //= tp
    return Layout(dp_shard=dp, tp=tp, pp=pp, cp=cp, ep=ep, micro_batch=mb, recompute=rec,  # type: ignore[arg-type]
                  pp_schedule=sched, pp_virtual=virtual)  # type: ignore[arg-type]


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
    fitting = [abs(r.rel_error) for r in rows if r.fits]
    apart = [abs(r.rel_error) for r in rows if not r.fits]
    return {
        "rows": [r.to_dict() for r in rows],
        "median_abs_rel_error": statistics.median(fitting) if fitting else None,
        "max_abs_rel_error": max(fitting) if fitting else None,
        "rows_fitting_memory": len(fitting),
        "rows_not_fitting_memory": len(apart),
        "median_abs_rel_error_not_fitting": statistics.median(apart) if apart else None,
        "results": rows,
    }
