"""Multi-process equivalence (gloo, 2-8 ranks, a 4-layer test model, fp32): every layout trains what one process
trains.

One torchrun job per world size runs all of its layouts (`test_parallel_worker`); each run gives losses and
step-1 gradients (compared with one process), its metrics give the measured bytes per collective (compared with
the planner), and its checkpoints feed the resharding tests, which resume them under other layouts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gigafactory.errors import UserError

sys.path.insert(0, str(Path(__file__).parent))
from test_parallel_worker import EVERY, SPEC, STEPS, config, resume_copy, run  # noqa: E402

WORKER = Path(__file__).with_name("test_parallel_worker.py")
LAYOUTS = {  # name -> (layout, ranks)
    "fsdp2": ("dp_shard=2", 2),
    "tp2": ("tp=2", 2),
    "ep2": ("dp_shard=2,ep=2", 2),
    "ep2_capacity": ("dp_shard=2,ep=2", 2),  # the fixed-shape dispatch, with the capacity in CAPACITY
    "pp2": ("pp=2,pp_schedule=1f1b", 2),
    "pp2_interleaved": ("pp=2,pp_schedule=interleaved,pp_virtual=2", 2),
    "pp2_zero_bubble": ("pp=2,pp_schedule=zero_bubble", 2),
    "cp2": ("cp=2", 2),
    "zero1": ("dp_replicate=2", 2),  # a distributed optimizer: FSDP2 over dp_replicate, gathered once per step
    "fsdp2_tp2": ("dp_shard=2,tp=2", 4),
    "fsdp2_ep2": ("dp_shard=4,ep=2", 4),  # experts: ep=2 × FSDP over the other 2 of dp_shard
    "hsdp": ("dp_replicate=2,dp_shard=2", 4),
    "ep2_tp2": ("dp_shard=2,ep=2,tp=2", 4),  # experts whole over the 2 data-parallel ranks, attention over tp
    "pp2_fsdp2": ("pp=2,dp_shard=2", 4),
    "pp2_tp2": ("pp=2,tp=2", 4),
    "fsdp2_cp2": ("dp_shard=2,cp=2", 4),
    "pp2_fsdp2_tp2": ("pp=2,dp_shard=2,tp=2", 8),
    "fsdp4_ep2_tp2": ("dp_shard=4,ep=2,tp=2", 8),
    "pp2_cp2_fsdp2": ("pp=2,cp=2,dp_shard=2", 8),
}
# Resumed at step EVERY from another layout's checkpoint: name -> (source run, layout, ranks)
RESUMES = {
    "fsdp2_then_fsdp2_tp2": ("fsdp2", "dp_shard=2,tp=2", 4),
    "pp2_tp2_then_fsdp4": ("pp2_tp2", "dp_shard=4", 4),
    "pp2_tp2_then_cp2_fsdp2": ("pp2_tp2", "cp=2,dp_shard=2", 4),
}
BF16 = {"fsdp2_bf16": ("dp_shard=2", 2)}  # FSDP2 mixed precision, for the byte test only
# moe_capacity_factor per run. n_experts / top_k gives every expert a slot for every token (C = tokens), so nothing
# is dropped and the run must match one process (dropless) while sending n_experts / top_k times its bytes.
_SPEC = json.loads(Path(SPEC).read_text())
CAPACITY = {"ep2_capacity": _SPEC["n_experts"] / _SPEC["top_k"]}
REL = 1e-4


def _copy_prepared(src: Path, dst: Path) -> Path:
    """A run directory with the tokenizer and token arrays already made (no checkpoints, no metrics)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("ckpt", "metrics.jsonl"))
    return dst


def _launch(root: Path, jobs: dict[str, tuple[Path, str, bool, str]], nproc: int) -> dict[str, dict]:
    """One torchrun job running every (run_dir, layout, resume, source run or "") in `jobs` in turn."""
    spec = [[str(d), lay, str(root / f"{name}.out"), "resume" if res else "fresh", "bf16" if name in BF16 else "fp32",
             CAPACITY.get(name), src] for name, (d, lay, res, src) in jobs.items()]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", str(WORKER),
           json.dumps(spec)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, f"{list(jobs)} failed:\n{proc.stderr[-4000:]}"
    out = {}
    for name, (d, _, _, _) in jobs.items():
        losses: list[float] = []
        grads: dict[str, torch.Tensor] = {}
        for r in range(nproc):
            part = torch.load(root / f"{name}.out.rank{r}.pt")
            losses = losses or part["losses"]
            grads.update(part["grads"])
        out[name] = {"losses": losses, "grads": grads, "metrics": d / "metrics.jsonl"}
    return out


class _Runs(dict):
    """Runs launched on first use, all layouts of one world size in one job (so a `-k` selection starts only
    the jobs it needs). A job also runs the resumes of its world size whose source runs are done or in it."""

    def __missing__(self, name: str) -> dict:
        root = self["root"]
        if name in RESUMES:
            src, lay, nproc = RESUMES[name]
            self[src]  # the source run first; its job may have run this resume too
            if name in self:
                return self[name]
            todo = {name: (resume_copy(root / src, root / name), lay, True, "")}
        else:
            nproc = {**LAYOUTS, **BF16}[name][1]
            todo = {n: (_copy_prepared(root / "single", root / n), lay, False, "")
                    for n, (lay, k) in {**LAYOUTS, **BF16}.items() if k == nproc and n not in self}
            for n, (src, lay, k) in RESUMES.items():  # after the fresh runs: a source in this job is done by then
                if k == nproc and n not in self and src in self:
                    todo[n] = (resume_copy(root / src, root / n), lay, True, "")
                elif k == nproc and n not in self and src in todo:
                    todo[n] = (root / n, lay, True, str(root / src))  # the worker copies it once it is trained
        self.update(_launch(root, todo, nproc))
        return self[name]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("parallel")
    ref = run(str(root / "single"), None, resume=False)
    return _Runs(single=ref, root=root)


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_losses_and_gradients_match_one_process(runs: dict, name: str) -> None:
    ref, got = runs["single"], runs[name]
    assert len(got["losses"]) == STEPS
    assert set(got["grads"]) == set(ref["grads"])
    loss_err = [_rel(a, b) for a, b in zip(got["losses"], ref["losses"], strict=True)]
    grad_err = {}
    for key, g_ref in ref["grads"].items():
        g = got["grads"][key]
        assert g.shape == g_ref.shape, key
        grad_err[key] = float((g - g_ref).norm() / g_ref.norm().clamp_min(1e-12))
    print(f"\n{name} ({LAYOUTS[name][0]}): worst loss diff {max(loss_err):.1e}, worst gradient diff "
          f"{max(grad_err.values()):.1e}")
    for step, err in enumerate(loss_err, 1):
        assert err <= REL, f"{name} step {step}: loss {got['losses'][step - 1]} vs one process (rel {err:.1e})"
    for key, err in grad_err.items():
        assert err <= REL, f"{name}: gradient of {key} differs by {err:.2e} (relative norm)"


@pytest.mark.parametrize("name", list(RESUMES))
def test_checkpoint_reshards_across_layouts(runs: dict, name: str) -> None:
    got, ref = runs[name]["losses"], runs["single"]["losses"][EVERY:]
    assert len(got) == STEPS - EVERY == 2
    for a, b in zip(got, ref, strict=True):
        assert _rel(a, b) <= REL, (name, got, ref)


def test_checkpoint_reshards_pipeline_tp_to_one_process(runs: dict) -> None:
    runs["pp2_tp2"]
    got = run(str(resume_copy(runs["root"] / "pp2_tp2", runs["root"] / "pp2_tp2_then_single")), None, resume=True)
    for a, b in zip(got["losses"], runs["single"]["losses"][EVERY:], strict=True):
        assert _rel(a, b) <= REL


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_measured_collective_bytes_match_the_planner(runs: dict, name: str) -> None:
    from gigafactory.parallel.compare import comparison_rows, format_rows, measured_bytes, predicted_bytes
    from gigafactory.specs import load_spec
    from gigafactory.specs.layout import Layout

    layout = Layout.parse(LAYOUTS[name][0])
    cfg = config("unused", None)
    predicted = predicted_bytes(load_spec(SPEC), layout, cfg.batch_size, cfg.grad_accum, cfg.seq_len or 0, 4,
                                capacity_factor=CAPACITY.get(name))
    rows = comparison_rows(measured_bytes(runs[name]["metrics"]), predicted)
    print(f"\n{layout.short()}\n{format_rows(rows)}")
    for row in rows:
        if row["collective"] == "other":  # bookkeeping scalars (loss mean, global grad norm), not model traffic
            assert row["measured"] < 1024, row
            continue
        assert row["predicted"] and abs(row["rel_diff"]) <= 0.10, row  # every collective used is predicted


def test_bf16_collective_bytes_match_the_planner(runs: dict) -> None:
    """bf16 (FSDP2 mixed precision): parameters are gathered in bf16, gradients reduced in fp32 — the planner's
    convention (dtype_bytes=2, grad_bytes=4) within 10% for every collective."""
    from gigafactory.parallel.compare import comparison_rows, format_rows, measured_bytes, predicted_bytes
    from gigafactory.specs import load_spec
    from gigafactory.specs.layout import Layout

    layout = BF16["fsdp2_bf16"][0]
    cfg = config("unused", None)
    predicted = predicted_bytes(load_spec(SPEC), Layout.parse(layout), cfg.batch_size, cfg.grad_accum,
                                cfg.seq_len or 0, 2)
    rows = comparison_rows(measured_bytes(runs["fsdp2_bf16"]["metrics"]), predicted)
    print(f"\nbf16 {layout}\n{format_rows(rows)}")
    assert {r["collective"] for r in rows} >= {"all_gather", "reduce_scatter"}
    for row in rows:
        if row["collective"] != "other":
            assert row["predicted"] and abs(row["rel_diff"]) <= 0.10, row


@pytest.mark.parametrize("name", ["single", "fsdp2", "fsdp2_tp2"])
def test_mfu_is_per_gpu(runs: dict, name: str) -> None:
    """MFU = global model FLOP/s / (world size × one device's peak): one definition for 1 and N ranks."""
    import json

    from gigafactory.specs import load_spec

    world = 1 if name == "single" else LAYOUTS[name][1]
    path = runs[name]["metrics"] if name != "single" else runs["root"] / "single" / "metrics.jsonl"
    cfg = config("unused", None)
    flops_per_token = load_spec(SPEC).flops_per_token(cfg.seq_len)
    for rec in map(json.loads, path.read_text().splitlines()):
        assert rec["mfu"] > 0, rec
        # The bound guards the per-GPU division (2 ranks once printed 290%). It is asserted for N ranks only: on a
        # CPU the 1-process denominator is a matmul probe taken under whatever load the machine has, so a busy
        # probe can put a tiny model's honest 1-process figure just above 1 (seen: probe 31 vs 75-96 GFLOP/s).
        if world > 1:
            assert rec["mfu"] <= 1, rec
        assert rec["tokens_per_s_per_gpu"] * world == pytest.approx(rec["tokens_per_s"])
        expected = rec["tokens_per_s"] * flops_per_token / (world * rec["peak_flops_per_gpu"])
        assert rec["mfu"] == pytest.approx(expected, rel=1e-9), rec


@pytest.mark.parametrize(
    ("layout", "world", "needle"),
    [
        ("dp_shard=3", 4, "multiply"),
        ("tp=3,dp_shard=1", 3, "tp=3 must divide"),
        ("dp_shard=3,ep=3", 3, "ep=3 does not divide"),
        ("pp=8", 8, "stages"),
    ],
)
def test_wrong_layouts_fail_before_any_process_group_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layout: str, world: int, needle: str
) -> None:
    import torch.distributed as dist

    from gigafactory.specs import load_spec
    from gigafactory.train import distributed

    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(UserError) as err:
        distributed.setup(config(str(tmp_path), layout), load_spec(SPEC), 32)
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert not dist.is_initialized()


def test_cli_wrong_layout_is_one_line(cli_here, tmp_path: Path) -> None:  # noqa: ANN001
    code, _, err = cli_here("train", "--model", "tiny", "--run-dir", str(tmp_path / "r"), "--layout", "tp=3")
    assert code == 2
    assert "not the 1 GPUs" in err and "Traceback" not in err
