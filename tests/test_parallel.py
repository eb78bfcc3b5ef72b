"""Multi-process equivalence (gloo, 2-4 ranks, `tiny`, fp32): every layout trains what one process trains.

One launch per layout checks losses and step-1 gradients together; the FSDP and TP launches also leave the
checkpoints the resharding tests resume from; the FSDP, TP and EP launches' metrics give the measured bytes per
collective that are compared with the planner."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gigafactory.errors import UserError

sys.path.insert(0, str(Path(__file__).parent))
from test_parallel_worker import config, run  # noqa: E402

WORKER = Path(__file__).with_name("test_parallel_worker.py")
LAYOUTS = {  # name -> (layout, ranks)
    "fsdp2": ("dp_shard=2", 2),
    "tp2": ("tp=2", 2),
    "ep2": ("dp_shard=2,ep=2", 2),
    "pp2": ("pp=2,pp_schedule=1f1b", 2),
    "fsdp2_tp2": ("dp_shard=2,tp=2", 4),
    "fsdp2_ep2": ("dp_shard=4,ep=2", 4),  # experts: ep=2 × FSDP over the other 2 of dp_shard
    "hsdp": ("dp_replicate=2,dp_shard=2", 4),
    "ep2_tp2": ("dp_shard=2,ep=2,tp=2", 4),  # experts whole over the 2 data-parallel ranks, attention over tp
}
REL = 1e-4


def _copy_prepared(src: Path, dst: Path) -> Path:
    """A run directory with the tokenizer and token arrays already made (no checkpoints, no metrics)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("ckpt", "metrics.jsonl"))
    return dst


def _launch(run_dir: Path, layout: str, nproc: int, resume: bool = False, dtype: str = "fp32") -> dict:
    out = run_dir.parent / f"{run_dir.name}.out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", str(WORKER),
           str(run_dir), layout, str(out), "resume" if resume else "fresh", dtype]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, f"{layout} failed:\n{proc.stderr[-4000:]}"
    losses: list[float] = []
    grads: dict[str, torch.Tensor] = {}
    for r in range(nproc):
        part = torch.load(f"{out}.rank{r}.pt")
        losses = losses or part["losses"]
        grads.update(part["grads"])
    return {"losses": losses, "grads": grads, "metrics": run_dir / "metrics.jsonl"}


class _Runs(dict):
    """Layout runs launched on first use (so a `-k` selection starts only the runs it needs)."""

    def __missing__(self, name: str) -> dict:
        layout, nproc = LAYOUTS[name]
        self[name] = _launch(_copy_prepared(self["root"] / "single", self["root"] / name), layout, nproc)
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
    assert len(got["losses"]) == 5
    for step, (a, b) in enumerate(zip(got["losses"], ref["losses"], strict=True), 1):
        assert _rel(a, b) <= REL, f"{name} step {step}: loss {a} vs single-process {b}"
    assert set(got["grads"]) == set(ref["grads"])
    for key, g_ref in ref["grads"].items():
        g = got["grads"][key]
        assert g.shape == g_ref.shape, key
        err = float((g - g_ref).norm() / g_ref.norm().clamp_min(1e-12))
        assert err <= REL, f"{name}: gradient of {key} differs by {err:.2e} (relative norm)"


def _resume_copy(runs: dict, src: str, dst: str) -> Path:
    """`src`'s run directory cut back to its step-3 checkpoint (as if it stopped there)."""
    root = runs["root"]
    path = root / dst
    shutil.copytree(root / src, path)
    shutil.rmtree(path / "ckpt" / "step_000005")
    return path


def test_checkpoint_reshards_fsdp_to_tp(runs: dict) -> None:
    got = _launch(_resume_copy(runs, "fsdp2", "fsdp2_then_tp2"), "tp=2", 2, resume=True)
    ref = runs["single"]["losses"][3:]
    assert len(got["losses"]) == 2
    for a, b in zip(got["losses"], ref, strict=True):
        assert _rel(a, b) <= REL, (got["losses"], ref)


def test_checkpoint_reshards_tp_to_one_process(runs: dict) -> None:
    path = _resume_copy(runs, "tp2", "tp2_then_single")
    got = run(str(path), None, resume=True)
    for a, b in zip(got["losses"], runs["single"]["losses"][3:], strict=True):
        assert _rel(a, b) <= REL


@pytest.mark.parametrize("name", ["fsdp2", "tp2", "ep2", "hsdp", "ep2_tp2"])
def test_measured_collective_bytes_match_the_planner(runs: dict, name: str) -> None:
    from gigafactory.parallel.report import comparison_rows, format_rows, measured_bytes, predicted_bytes
    from gigafactory.specs import load_spec
    from gigafactory.specs.layout import Layout

    layout = Layout.parse(LAYOUTS[name][0])
    cfg = config("unused", None)
    predicted = predicted_bytes(load_spec("tiny"), layout, cfg.batch_size, cfg.grad_accum, cfg.seq_len or 0, 4)
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
    from gigafactory.parallel.report import comparison_rows, format_rows, measured_bytes, predicted_bytes
    from gigafactory.specs import load_spec
    from gigafactory.specs.layout import Layout

    layout = "dp_shard=2"
    got = _launch(_copy_prepared(runs["root"] / "single", runs["root"] / "fsdp2_bf16"), layout, 2, dtype="bf16")
    cfg = config("unused", None)
    predicted = predicted_bytes(load_spec("tiny"), Layout.parse(layout), cfg.batch_size, cfg.grad_accum,
                                cfg.seq_len or 0, 2)
    rows = comparison_rows(measured_bytes(got["metrics"]), predicted)
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
    flops_per_token = load_spec("tiny").flops_per_token(cfg.seq_len)
    for rec in map(json.loads, path.read_text().splitlines()):
        assert 0 < rec["mfu"] <= 1, rec
        assert rec["tokens_per_s_per_gpu"] * world == pytest.approx(rec["tokens_per_s"])
        expected = rec["tokens_per_s"] * flops_per_token / (world * rec["peak_flops_per_gpu"])
        assert rec["mfu"] == pytest.approx(expected, rel=1e-9), rec


@pytest.mark.parametrize(
    ("layout", "world", "needle"),
    [
        ("dp_shard=3", 4, "multiply"),
        ("tp=3,dp_shard=1", 3, "tp=3 must divide"),
        ("dp_shard=3,ep=3", 3, "ep=3 does not divide"),
        ("pp=4", 4, "stages"),
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
        distributed.setup(config(str(tmp_path), layout), load_spec("tiny"), 32)
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert not dist.is_initialized()


def test_cli_wrong_layout_is_one_line(cli, tmp_path: Path) -> None:  # noqa: ANN001
    proc = cli("train", "--model", "tiny", "--run-dir", str(tmp_path / "r"), "--layout", "tp=3")
    assert proc.returncode == 2
    assert "not the 1 GPUs" in proc.stderr and "Traceback" not in proc.stderr
