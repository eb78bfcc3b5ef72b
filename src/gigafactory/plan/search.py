"""Enumerate every valid layout for a model on a cluster, drop those that do not fit, rank the rest."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

from gigafactory.errors import UserError
from gigafactory.plan.costmodel import MODERN, Cluster, Stack, StepCost, estimate
from gigafactory.specs.layout import MULTI_STAGE_SCHEDULES, Layout, is_supported
from gigafactory.specs.model_spec import ModelSpec

MICRO_BATCHES = (1, 2, 4, 8)
CP_DEGREES = (1, 2, 4, 8, 16, 32)
VIRTUAL = (2, 4)


@dataclass
class SearchResult:
    ranked: list[StepCost]
    evaluated: int
    fitting: int
    seconds: float
    leanest: StepCost | None  # smallest memory among all evaluated (to explain "nothing fits")
    rank_by: str
    why: list[str] = field(default_factory=list)
    enumerated: int = 0  # layouts that divide the GPUs and the model (before the batch cap)
    smallest_batch: int = 0  # smallest global batch (sequences) any enumerated layout can run

    def empty_reason(self, n_gpus: int, target_seqs: int, seq_len: int, factor: float) -> str:
        """Why nothing was evaluated: divisibility or the batch cap (empty when something was)."""
        if self.evaluated:
            return ""
        if not self.enumerated:
            return (f"no layout divides {n_gpus:,} GPUs for this model (tp must divide the heads and fit a node, "
                    f"tp·pp·cp·dp must equal the GPUs, ep must divide dp_shard); use a multiple of 8 with more "
                    f"small factors, e.g. {n_gpus // 256 * 256 or n_gpus // 8 * 8 or 8:,}")
        return (f"every layout for {n_gpus:,} GPUs needs a global batch of at least {self.smallest_batch:,} "
                f"sequences, over {factor:g}× the target of {target_seqs:,}; raise --global-batch to "
                f"{self.smallest_batch * seq_len / factor / 1e6:,.0f}M tokens or use fewer GPUs")

    @property
    def best(self) -> StepCost:
        return self.ranked[0]


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, int(math.isqrt(n)) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def _shard_options(dp: int, per_node_dp: int) -> list[int]:
    """FSDP shard-group sizes: 1 (DDP / ZeRO-1), dp (plain FSDP) and HSDP groups of any size that divides dp,
    not only powers of two. To keep the search fast, within each power-of-two band [2^k, 2^(k+1)) we keep the
    smallest and largest divisor (e.g. dp = 12,500: 1, 2, 4, 5, 10, 20, 25, 50, 100, 125, 250, 500, ...)."""
    bands: dict[int, list[int]] = {}
    for d in _divisors(dp):
        bands.setdefault(d.bit_length(), []).append(d)
    opts = {1, dp, max(1, min(per_node_dp, dp))}
    for ds in bands.values():
        opts.update((ds[0], ds[-1]))
    return sorted(d for d in opts if dp % d == 0)


RECOMPUTES = ("none", "selective", "full")


def enumerate_layouts(spec: ModelSpec, cluster: Cluster, seq_len: int, stack: Stack = MODERN,
                      recomputes: tuple[str, ...] = RECOMPUTES,
                      ) -> Iterator[Layout]:
    for base in _base_layouts(spec, cluster, seq_len):
        for mb in MICRO_BATCHES:
            for rec in recomputes:
                yield base.model_copy(update={"micro_batch": mb, "recompute": rec})


def _base_layouts(spec: ModelSpec, cluster: Cluster, seq_len: int) -> Iterator[Layout]:
    """The parallel degrees and schedules the trainer supports (micro-batch and recompute left at defaults)."""
    n = cluster.n_gpus
    per_node = cluster.gpus_per_node
    heads_gcd = math.gcd(spec.n_heads, spec.n_kv_heads)
    for tp in _divisors(heads_gcd):
        if tp > per_node or n % tp:
            continue
        for pp in _divisors(spec.n_layers):
            if (n // tp) % pp:
                continue
            for cp in CP_DEGREES:
                if (n // (tp * pp)) % cp or seq_len % (2 * cp) or (cp > 1 and seq_len // cp < 1024):
                    continue
                dp = n // (tp * pp * cp)
                for shard in _shard_options(dp, max(1, per_node // tp)):
                    for ep in _divisors(spec.n_experts):
                        if (shard * cp) % ep:  # experts borrow data-parallel ranks (Layout.validate's rule)
                            continue
                        for sched, v in _schedules(spec, pp):
                            base = Layout(dp_replicate=dp // shard, dp_shard=shard, tp=tp, pp=pp, ep=ep, cp=cp,
                                          pp_schedule=sched, pp_virtual=v)  # type: ignore[arg-type]
                            # The trainer's own answer (specs.layout): never propose what it refuses.
                            if is_supported(base, spec, n, per_node):
                                yield base


def _schedules(spec: ModelSpec, pp: int) -> list[tuple[str, int]]:
    """Pipeline schedules with their virtual stages per rank: 1F1B, interleaved 1F1B, zero-bubble."""
    if pp == 1:
        return [("1f1b", 1)]
    # zero-bubble with one stage per rank only: its virtual-stage variants would double the pipelined search
    out: list[tuple[str, int]] = [("1f1b", 1), ("zero_bubble", 1)]
    for v in VIRTUAL:
        if spec.n_layers % (pp * v) == 0:
            out.append(("interleaved", v))
    return out


def search(
    spec: ModelSpec,
    cluster: Cluster,
    global_batch_tokens: float,
    seq_len: int,
    stack: Stack = MODERN,
    rank_by: Literal["time", "cost"] = "time",
    max_batch_factor: float = 2.0,
    top: int = 5,
    progress: Callable[[int], None] | None = None,
    fp8: bool = False,
    capacity_factor: float | None = None,
) -> SearchResult:
    """Evaluate every layout; keep those that fit; rank by step time per token (or $ per token). ``fp8``: GEMMs
    in FP8 where Transformer Engine runs them (`costmodel._gemm_time`). ``capacity_factor``: the trainer's MoE
    capacity factor (None: dropless).

    The global batch is a target: each layout rounds it up to a multiple of dp × micro_batch (× pp for the
    interleaved schedule) and is dropped when that exceeds ``max_batch_factor`` × the target, since a batch
    far above the target changes the optimisation, not only the speed.
    """
    if seq_len > spec.max_seq_len:
        raise UserError(f"seq_len={seq_len} exceeds the model's context {spec.max_seq_len}")
    target = max(1, round(global_batch_tokens / seq_len))
    t0 = time.perf_counter()
    ranked: list[StepCost] = []
    leanest: StepCost | None = None
    evaluated = enumerated = 0
    smallest = 0
    # the batch cap depends only on dp, the micro-batch and the schedule: test it before building each layout
    for base in _base_layouts(spec, cluster, seq_len):
        pipe = base.pp if base.pp_schedule in MULTI_STAGE_SCHEDULES else 1
        for mb in MICRO_BATCHES:
            unit = base.dp * mb * pipe
            gbs = math.ceil(target / unit) * unit
            enumerated += len(RECOMPUTES)
            smallest = min(smallest, gbs) if smallest else gbs
            if gbs > max_batch_factor * target:
                continue
            fits_plain = False
            for rec in RECOMPUTES:
                if rec != "none" and fits_plain:
                    continue  # dominated: the same layout without recomputation fits and does less work
                lay = base.model_copy(update={"micro_batch": mb, "recompute": rec})
                evaluated += 1
                if progress and evaluated % 256 == 0:
                    progress(256)
                cost = estimate(spec, lay, cluster, gbs, seq_len, stack, with_bytes=False, fp8=fp8,
                                capacity_factor=capacity_factor)
                if leanest is None or cost.memory_total < leanest.memory_total:
                    leanest = cost
                if cost.fits:
                    ranked.append(cost)
                    fits_plain = rec == "none"
    ranked.sort(key=lambda c: c.step_time_s / (c.global_batch_seqs * c.seq_len))
    if rank_by == "cost":  # with one GPU type and count, $/token follows time/token; ties go to smaller batch
        ranked.sort(key=lambda c: (round(c.step_time_s / (c.global_batch_seqs * c.seq_len), 15),
                                   c.global_batch_seqs))
    result = SearchResult(ranked=ranked, evaluated=evaluated, fitting=len(ranked),
                          seconds=time.perf_counter() - t0, leanest=leanest, rank_by=rank_by,
                          enumerated=enumerated, smallest_batch=smallest)
    if ranked:
        result.why = explain(ranked)
        # recompute the per-collective byte counts only for the layouts we show
        result.ranked = [estimate(spec, c.layout, cluster, c.global_batch_seqs, seq_len, stack, fp8=fp8,
                                  capacity_factor=capacity_factor)
                         for c in ranked[:top]] + ranked[top:]
    return result


def _per_token(c: StepCost) -> float:
    return c.step_time_s / (c.global_batch_seqs * c.seq_len)


def _parts(c: StepCost) -> dict[str, float]:
    out = {"compute": c.compute_s, "pipeline bubble": c.bubble_s, "optimizer": c.optimizer_s}
    for k, v in c.exposed_comm_s.items():
        out[f"exposed {k} comm"] = v
    tokens = c.global_batch_seqs * c.seq_len
    return {k: v / tokens for k, v in out.items()}


def explain(ranked: list[StepCost]) -> list[str]:
    """Say why the winner wins: against the best layout of each other family, which time terms differ."""
    best = ranked[0]
    lines = [
        f"winner {best.layout.short()}: {best.mfu:.1%} MFU, step {best.step_time_s:.2f} s for "
        f"{best.global_batch_seqs} sequences, {best.memory_total / 1e9:.0f} of {best.memory_capacity / 1e9:.0f} GB"
    ]
    families: dict[str, StepCost] = {}
    for c in ranked[1:]:
        lay = c.layout
        key = f"tp={lay.tp},pp={lay.pp},cp={lay.cp},ep={lay.ep},shard={'none' if lay.dp_shard == 1 else lay.dp_shard}"
        bl = best.layout
        if (lay.tp, lay.pp, lay.cp, lay.ep, lay.dp_shard) == (bl.tp, bl.pp, bl.cp, bl.ep, bl.dp_shard):
            key = f"same degrees, mb={lay.micro_batch}, recompute={lay.recompute}"
        families.setdefault(key, c)
    bp = _parts(best)
    for _, c in list(families.items())[:4]:
        cp_ = _parts(c)
        diffs = sorted(((cp_.get(k, 0) - bp.get(k, 0)) / _per_token(best), k) for k in set(bp) | set(cp_))
        worse = [f"{k} +{d:.0%}" for d, k in reversed(diffs) if d > 0.01][:2]
        better = [f"{k} {d:.0%}" for d, k in diffs if d < -0.01][:1]
        slower = _per_token(c) / _per_token(best) - 1
        why = ", ".join(worse) or "about equal"
        lines.append(f"vs {c.layout.short()}: {slower:+.1%} time/token ({why}"
                     + (f"; it saves {better[0]}" if better else "") + ")")
    return lines
