"""Monte Carlo discrete-event simulation of a training campaign, vectorised over replicas and events.

The model, and why it can be vectorised without approximating the event logic:

- Failures of every cause are independent Poisson processes in wall-clock time (hardware breaks whether or not the
  job is running at that moment). Their superposition is one Poisson process whose events carry a cause drawn in
  proportion to the rates, so a replica costs one Poisson draw, N sorted uniforms and N categorical draws.
  Planned maintenance comes at a fixed interval with a random phase per replica.
- After an unexpected failure at time f the job is down until e = max(f + detection, spare ready) + restart; after
  a planned stop, e = f + final checkpoint + restart + extra. A failure during a recovery aborts it and the job
  comes back at the later of the two ends, so the time the job is up again after event k is the running maximum
  t_up[k] = max(t_up[k-1], e[k]) -- one `np.maximum.accumulate`.
- Spares: with S hot-spare nodes and a fixed repair time M, the node swapped in at the i-th failure needing a swap
  is the one that failed at the (i-S)-th (first in, first out), back from repair at h[i-S] + M. With S = 0 the job
  waits for its own node. This depends only on failure times, so it is computed for all events at once.
- The running stretches between recoveries do not depend on the checkpoint interval, so the interval sweep reuses
  them (common random numbers, which is what makes the comparison between intervals sharp) and only re-evaluates
  the closed-form accounting of each stretch: with checkpoints every tau of work, a stall s per checkpoint and a
  delay W before a checkpoint is restorable, a stretch cut by a failure after L seconds keeps
  k = floor((L - W) / (tau + s)) checkpoints, i.e. k * tau of work; the rest of L is stalls (k * s) and rework.
  A stretch ended by planned maintenance or by the end of the campaign keeps all its work.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gigafactory.sim.config import SimConfig

PLANNED = "planned maintenance"
CHECKPOINTING = "checkpoint stalls"
_CHUNK = 10  # replicas per vectorised batch; fixed so that results do not depend on how progress is shown


def _t975(df: int) -> float:
    """Two-sided 95% Student-t quantile (Cornish-Fisher expansion; exact table for the smallest df)."""
    table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571}
    if df in table:
        return table[df]
    z = 1.959963984540054
    return (
        z
        + (z**3 + z) / (4 * df)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3)
    )


def mean_ci95(x: np.ndarray) -> tuple[float, tuple[float, float]]:
    """Mean over replicas and its 95% confidence interval."""
    n = len(x)
    m = float(np.mean(x))
    h = _t975(n - 1) * float(np.std(x, ddof=1)) / math.sqrt(n) if n > 1 else 0.0
    return m, (m - h, m + h)


def young_daly_s(stall_s: float, mtbf_s: float) -> float:
    """First-order optimal checkpoint interval sqrt(2 C M) (Young 1974; Daly 2006)."""
    return math.sqrt(2.0 * stall_s * mtbf_s)


@dataclass
class _Segments:
    """Everything the interval sweep needs, flattened across replicas."""

    n_rep: int
    n_causes: int
    lost_len: list[np.ndarray] = field(default_factory=list)  # stretches cut by an unexpected failure
    lost_rep: list[np.ndarray] = field(default_factory=list)
    lost_cause: list[np.ndarray] = field(default_factory=list)
    kept_len: list[np.ndarray] = field(default_factory=list)  # stretches ended by maintenance or the campaign's end
    kept_rep: list[np.ndarray] = field(default_factory=list)
    down_by_cause: list[np.ndarray] = field(default_factory=list)  # (replicas, causes + 1) seconds
    count_by_cause: list[np.ndarray] = field(default_factory=list)
    degraded: list[np.ndarray] = field(default_factory=list)  # (replicas,) whole-job seconds lost to shrinking
    swaps: list[np.ndarray] = field(default_factory=list)  # (replicas,) nodes taken out of the job for repair
    timeline: dict[str, np.ndarray] | None = None

    def joined(self, name: str) -> np.ndarray:
        return np.concatenate(getattr(self, name))


@dataclass(frozen=True)
class _Modes:
    """Per-cause arrays the vectorised chunk needs (index C, one past the causes, is planned maintenance)."""

    rates: np.ndarray  # events per second for this job
    swap: np.ndarray  # needs a node swap
    hang: np.ndarray  # noticed at the watchdog's timeout
    lost_nodes: np.ndarray  # nodes one event takes down (correlated failures > 1)


def _with_companions(t: np.ndarray, cause: np.ndarray, lost_nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A correlated event that takes k nodes down is followed, at the same instant, by k - 1 companions: they find
    the job already down (so they interrupt nothing), but each needs its own swap."""
    ts, cs = [t], [cause]
    for c in np.nonzero(lost_nodes > 1)[0]:
        tc = np.where(cause == c, t, np.inf)
        tc = tc[:, np.isfinite(tc).any(axis=0)]
        if tc.size:
            ts += [tc] * (int(lost_nodes[c]) - 1)
            cs += [np.full(tc.shape, c, dtype=np.int32)] * (int(lost_nodes[c]) - 1)
    return (np.concatenate(ts, axis=1), np.concatenate(cs, axis=1)) if len(ts) > 1 else (t, cause)


def _recoveries(end: np.ndarray, f0: np.ndarray, kept: np.ndarray) -> tuple[np.ndarray, ...]:
    """(time the job is up again after each event, up before it, whether the job was running when it came), with
    only the `kept` events taking effect; `running` is evaluated for every event."""
    n, ncol = end.shape
    up = np.maximum.accumulate(np.where(kept, end, 0.0), axis=1) if ncol else np.zeros((n, 0))
    prev = np.concatenate([np.zeros((n, 1)), up[:, :-1]], axis=1)
    return up, prev, f0 >= prev


def _only_while_running(end: np.ndarray, f0: np.ndarray, valid: np.ndarray, sticky: np.ndarray) -> np.ndarray:
    """The events that take effect: those that find the job running, and every `sticky` one (a node that breaks
    during a recovery still needs its swap). Whether an event finds the job running depends on which earlier
    ones took effect, so iterate to the fixed point: each pass settles at least the earliest undecided event, and
    chains of recoveries overlapping each other are short, so a few passes suffice."""
    kept = valid
    for _ in range(1000):
        _, _, running = _recoveries(end, f0, kept)
        new = valid & (running | sticky)
        if np.array_equal(new, kept):
            return kept
        kept = new
    raise RuntimeError("recovery chains did not settle")  # unreachable: at most one pass per event


def _simulate_chunk(
    cfg: SimConfig, modes: _Modes, rng: np.random.Generator, n: int, first: int, seg: _Segments
) -> None:
    T = cfg.campaign_s
    rates = modes.rates
    C = len(rates)
    lam = float(rates.sum())
    counts = rng.poisson(lam * T, n)
    width = int(counts.max())
    t = rng.random((n, width)) * T
    t[np.arange(width)[None, :] >= counts[:, None]] = np.inf
    cdf = np.cumsum(rates) / lam
    cdf[-1] = 1.0
    cause = np.searchsorted(cdf, rng.random((n, width)), side="right").astype(np.int32)
    t, cause = _with_companions(t, cause, modes.lost_nodes)

    interval = cfg.maintenance_interval_s
    if interval is not None:
        p = int(math.ceil(T / interval)) + 1
        tp = rng.random(n)[:, None] * interval + interval * np.arange(p)[None, :]
        tp[tp >= T] = np.inf
        t = np.concatenate([t, tp], axis=1)
        cause = np.concatenate([cause, np.full((n, p), C, dtype=np.int32)], axis=1)

    order = np.argsort(t, axis=1, kind="stable")
    f = np.take_along_axis(t, order, axis=1)
    cause = np.take_along_axis(cause, order, axis=1)
    valid = f < T
    ncol = int(valid.sum(axis=1).max()) if f.size else 0
    f, cause, valid = f[:, :ncol], cause[:, :ncol], valid[:, :ncol]
    f0 = np.where(valid, f, 0.0)
    planned = valid & (cause == C)

    # Recovery end per event, spares first-in-first-out (see the module docstring).
    needs_swap = valid & np.append(modes.swap, False)[cause]
    detect = np.where(np.append(modes.hang, False)[cause], cfg.watchdog_s, cfg.detection_s)
    ready = f0 + detect
    degraded = np.zeros(n)
    if needs_swap.any():
        swapped = np.sort(np.where(needs_swap, f, np.inf), axis=1)
        idx = np.cumsum(needs_swap, axis=1) - 1 - cfg.spares
        back = np.take_along_axis(swapped, np.clip(idx, 0, None), axis=1) + cfg.repair_h * 3600.0
        short = needs_swap & (idx >= 0) & (back > ready)
        if cfg.node_loss == "wait":
            ready = np.where(short, back, ready)
        else:
            # Elastic: restart now on one node fewer. A repaired node rejoins at the job's next restart (elastic
            # launchers re-form the group then; a restart just for it would cost a whole recovery), on average one
            # job MTBF after it is back (failures are memoryless). Meanwhile the job runs at (nodes - 1) / nodes.
            start = np.minimum(ready + cfg.restart_s, T)
            missing = np.clip(np.minimum(back + 1.0 / lam, T) - start, 0.0, None)
            degraded = np.where(short, missing / cfg.nodes, 0.0).sum(axis=1)
    end = ready + cfg.restart_s
    end = np.where(planned, f0 + cfg.stall_s + cfg.durable_delay_s + cfg.restart_s + cfg.maintenance_extra_s, end)
    end = np.where(valid, end, 0.0)

    # Only a running job can be interrupted: a software fault or a planned stop cannot strike a job that is down,
    # so such events during a recovery have no effect (a node that breaks meanwhile still needs its swap).
    valid = _only_while_running(end, f0, valid, needs_swap)
    up, prev, running = _recoveries(end, f0, valid)
    running = running & valid
    length = np.where(running, f0 - prev, 0.0)
    # Downtime added by each event (a failure during a recovery only adds the extension it causes).
    down = np.where(valid, np.clip(np.minimum(up, T) - np.maximum(prev, f0), 0.0, None), 0.0)
    last_up = up[:, -1] if ncol else np.zeros(n)
    final = np.maximum(T - last_up, 0.0)

    rows = np.arange(n)[:, None] + np.zeros((1, ncol), dtype=np.int64)
    lost = running & ~planned
    kept = running & planned
    seg.lost_len.append(length[lost])
    seg.lost_rep.append(rows[lost] + first)
    seg.lost_cause.append(cause[lost])
    seg.kept_len.append(np.concatenate([length[kept], final]))
    seg.kept_rep.append(np.concatenate([rows[kept], np.arange(n)]) + first)
    key = (rows * (C + 1) + cause)[valid]
    seg.down_by_cause.append(np.bincount(key, weights=down[valid], minlength=n * (C + 1)).reshape(n, C + 1))
    key_run = (rows * (C + 1) + cause)[running]
    seg.count_by_cause.append(np.bincount(key_run, minlength=n * (C + 1)).reshape(n, C + 1))
    seg.degraded.append(degraded)
    seg.swaps.append((valid & needs_swap).sum(axis=1))
    if seg.timeline is None:
        m = valid[0]
        seg.timeline = {
            "f": f0[0, m],
            "cause": cause[0, m],
            "prev": prev[0, m],
            "up": up[0, m],
            "running": running[0, m],
            "final": final[0:1],
        }


def _work(tau: float, s: float, w: float, lost_len: np.ndarray, kept_len: np.ndarray) -> tuple[np.ndarray, ...]:
    """Closed-form accounting of stretches for one interval: (kept work, stalls) for cut and for whole stretches."""
    cyc = tau + s
    k = np.floor(np.maximum(lost_len - w, 0.0) / cyc)
    nk = np.floor(kept_len / cyc)
    rem = kept_len - nk * cyc
    return k * tau, k * s, nk * tau + np.minimum(rem, tau), nk * s + np.maximum(rem - tau, 0.0)


@dataclass
class SimResult:
    """Monte Carlo summary. Goodput is useful training time / wall-clock time; CIs are 95% over replicas."""

    config: SimConfig
    interruptions: np.ndarray  # per replica
    goodput: np.ndarray  # per replica, at checkpoint_interval_s
    interruptions_mean: float
    interruptions_ci95: tuple[float, float]
    unexpected_mean: float
    goodput_mean: float
    goodput_ci95: tuple[float, float]
    checkpoint_interval_s: float
    best_checkpoint_interval_s: float
    young_daly_interval_s: float
    goodput_at_young_daly: float
    mtbf_s: float
    lost_gpu_hours_by_cause: dict[str, float]
    interruptions_by_cause: dict[str, float]
    swaps_mean: float
    time_fractions: dict[str, float]
    rework_per_failure_s: float
    sweep_intervals_s: np.ndarray
    sweep_goodput_mean: np.ndarray
    sweep_goodput_halfwidth: np.ndarray
    timeline: dict[str, Any]
    elapsed_s: float

    @property
    def interruptions_per_day(self) -> float:
        return self.interruptions_mean / self.config.days

    @property
    def mtti_h(self) -> float | None:
        """Mean time to interruption: hours the job was up over interruptions (planned ones included), as job
        MTTF is measured in the field (time waiting for a repair is not time the job could fail in). None if no
        interruption."""
        up_h = self.config.days * 24 * (1 - self.time_fractions["down"])
        return up_h / self.interruptions_mean if self.interruptions_mean > 0 else None

    def to_dict(self) -> dict[str, Any]:
        c = self.config
        return {
            "gpus": c.gpus,
            "days": c.days,
            "replicas": c.replicas,
            "seed": c.seed,
            "checkpoint_mode": c.checkpoint_mode,
            "checkpoint_cost_s": c.checkpoint_cost_s,
            "spare_nodes": c.spares,
            "interruptions_mean": self.interruptions_mean,
            "interruptions_ci95": list(self.interruptions_ci95),
            "interruptions_per_day": self.interruptions_per_day,
            "mtti_h": self.mtti_h,
            "profile": c.profile,
            "fabric": c.fabric,
            "node_loss": c.node_loss,
            "unexpected_interruptions_mean": self.unexpected_mean,
            "mtbf_s": self.mtbf_s,
            "goodput_mean": self.goodput_mean,
            "goodput_ci95": list(self.goodput_ci95),
            "checkpoint_interval_s": self.checkpoint_interval_s,
            "best_checkpoint_interval_s": self.best_checkpoint_interval_s,
            "young_daly_interval_s": self.young_daly_interval_s,
            "goodput_at_young_daly": self.goodput_at_young_daly,
            "rework_per_failure_s": self.rework_per_failure_s,
            "time_fractions": self.time_fractions,
            "lost_gpu_hours_by_cause": self.lost_gpu_hours_by_cause,
            "interruptions_by_cause": self.interruptions_by_cause,
            "node_swaps_mean": self.swaps_mean,
            "elapsed_s": self.elapsed_s,
        }


def _sweep_grid(lo: float, hi: float, n: int) -> np.ndarray:
    return np.unique(np.geomspace(lo, hi, n)) if hi > lo else np.array([lo])


def simulate(cfg: SimConfig, progress: Callable[[int, int], None] | None = None) -> SimResult:
    """Run `cfg.replicas` replicas of the campaign and sweep the checkpoint interval on the same failure draws."""
    start = time.perf_counter()
    T = cfg.campaign_s
    fm = cfg.failure_modes
    rates = np.array([m.job_rate_per_s(cfg.gpus, cfg.gpus_per_node) for m in fm]) * cfg.rate_scale
    modes = _Modes(
        rates=rates,
        swap=np.array([m.needs_swap for m in fm]),
        hang=np.array([m.hang for m in fm]),
        lost_nodes=np.array([m.nodes_lost(cfg.gpus, cfg.gpus_per_node) for m in fm]),
    )
    names = [m.name for m in cfg.failure_modes] + [PLANNED]
    C = len(rates)
    n_rep = cfg.replicas

    seg = _Segments(n_rep, C)
    streams = np.random.SeedSequence(cfg.seed).spawn(math.ceil(n_rep / _CHUNK))
    for i, stream in enumerate(streams):
        first = i * _CHUNK
        n = min(_CHUNK, n_rep - first)
        _simulate_chunk(cfg, modes, np.random.default_rng(stream), n, first, seg)
        if progress is not None:
            progress(first + n, n_rep)
    degraded = seg.joined("degraded")
    lost_len, lost_rep, lost_cause = seg.joined("lost_len"), seg.joined("lost_rep"), seg.joined("lost_cause")
    kept_len, kept_rep = seg.joined("kept_len"), seg.joined("kept_rep")
    s, w = cfg.stall_s, cfg.durable_delay_s

    def goodput_at(tau: float) -> np.ndarray:
        a, _, b, _ = _work(tau, s, w, lost_len, kept_len)
        return np.maximum(np.bincount(lost_rep, a, n_rep) + np.bincount(kept_rep, b, n_rep) - degraded, 0.0) / T

    # Sweep: a log grid around Young/Daly, then a finer one around the best point.
    mtbf = 1.0 / float(rates.sum())
    yd = young_daly_s(s, mtbf)
    lo = min(max(yd / 8.0, w, 1.0), T)  # an interval longer than the campaign means no checkpoint at all
    hi = min(T, max(yd * 8.0, lo * 64.0))
    taus = list(_sweep_grid(lo, hi, 33))
    curves = [goodput_at(x) for x in taus]
    best = int(np.argmax([c.mean() for c in curves]))
    fine = _sweep_grid(max(lo, taus[max(best - 1, 0)]), min(hi, taus[min(best + 1, len(taus) - 1)]), 17)
    taus += list(fine)
    curves += [goodput_at(x) for x in fine]
    order = np.argsort(taus)
    taus_arr = np.asarray(taus)[order]
    curves = [curves[i] for i in order]
    means = np.array([c.mean() for c in curves])
    best_tau = float(taus_arr[int(np.argmax(means))])
    half = np.array([mean_ci95(c)[1][1] - c.mean() for c in curves])
    yd_in_range = min(max(yd, w, 1e-9), T)
    goodput_yd = float(goodput_at(yd_in_range).mean())

    tau = cfg.checkpoint_interval_s if cfg.checkpoint_interval_s is not None else best_tau
    kept_a, stall_a, kept_b, stall_b = _work(tau, s, w, lost_len, kept_len)
    useful = np.bincount(lost_rep, kept_a, n_rep) + np.bincount(kept_rep, kept_b, n_rep)
    stalls = np.bincount(lost_rep, stall_a, n_rep) + np.bincount(kept_rep, stall_b, n_rep)
    rework = lost_len - kept_a - stall_a
    rework_by_cause = np.bincount(lost_rep * (C + 1) + lost_cause, rework, n_rep * (C + 1)).reshape(n_rep, C + 1)
    down_by_cause = seg.joined("down_by_cause")
    count_by_cause = seg.joined("count_by_cause")
    downtime = down_by_cause.sum(axis=1)
    degraded = seg.joined("degraded")
    goodput = np.maximum(useful - degraded, 0.0) / T
    interruptions = count_by_cause.sum(axis=1).astype(float)

    gpu_h = cfg.gpus / 3600.0
    lost_mean = (rework_by_cause + down_by_cause).mean(axis=0) * gpu_h
    lost_by_cause = {names[i]: float(lost_mean[i]) for i in np.argsort(-lost_mean) if lost_mean[i] > 0}
    lost_by_cause[CHECKPOINTING] = float(stalls.mean() * gpu_h)
    counts_mean = count_by_cause.mean(axis=0)
    by_cause = {names[i]: float(counts_mean[i]) for i in np.argsort(-counts_mean) if counts_mean[i] > 0}

    g_mean, g_ci = mean_ci95(goodput)
    i_mean, i_ci = mean_ci95(interruptions)
    return SimResult(
        config=cfg,
        interruptions=interruptions,
        goodput=goodput,
        interruptions_mean=i_mean,
        interruptions_ci95=i_ci,
        unexpected_mean=float(count_by_cause[:, :C].sum(axis=1).mean()),
        goodput_mean=g_mean,
        goodput_ci95=g_ci,
        checkpoint_interval_s=float(tau),
        best_checkpoint_interval_s=best_tau,
        young_daly_interval_s=yd,
        goodput_at_young_daly=goodput_yd,
        mtbf_s=mtbf,
        lost_gpu_hours_by_cause=lost_by_cause,
        interruptions_by_cause=by_cause,
        swaps_mean=float(seg.joined("swaps").mean()),
        time_fractions={
            "useful": float(goodput.mean()),
            "checkpoint": float(stalls.mean() / T),
            "rework": float(rework_by_cause.sum(axis=1).mean() / T),
            "down": float(downtime.mean() / T),
            "degraded": float(np.minimum(degraded, useful).mean() / T),
        },
        rework_per_failure_s=float(rework.mean()) if rework.size else 0.0,
        sweep_intervals_s=taus_arr,
        sweep_goodput_mean=means,
        sweep_goodput_halfwidth=half,
        timeline=_timeline(seg.timeline or {}, tau, s, w, names, T),
        elapsed_s=time.perf_counter() - start,
    )


def _timeline(
    tl: dict[str, np.ndarray], tau: float, s: float, w: float, names: list[str], horizon: float
) -> dict[str, Any]:
    """Committed training progress of replica 0 over wall-clock time, and its interruptions."""
    if not tl:
        return {"t_s": [], "work_s": [], "events": []}
    ts: list[float] = [0.0]
    work: list[float] = [0.0]
    done = 0.0
    planned = len(names) - 1
    for f, c, p, up, run in zip(tl["f"], tl["cause"], tl["prev"], tl["up"], tl["running"], strict=True):
        if run:
            length = np.array([f - p])
            kept_a, _, whole, _ = _work(tau, s, w, length, length)
            reached = done + float(whole[0])
            done += float(whole[0]) if c == planned else float(kept_a[0])
            ts += [float(p), float(f), float(f)]
            work += [work[-1], reached, done]
        ts.append(min(float(up), horizon))
        work.append(done)
    length = tl["final"]
    _, _, whole, _ = _work(tau, s, w, length, length)
    ts += [ts[-1], ts[-1] + float(length[0])]
    work += [done, done + float(whole[0])]
    events = [
        {"t_s": float(f), "cause": names[int(c)], "down_s": float(max(up - f, 0.0))}
        for f, c, up in zip(tl["f"], tl["cause"], tl["up"], strict=True)
    ]
    return {"t_s": ts, "work_s": work, "events": events}
