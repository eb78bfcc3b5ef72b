"""Surviving failures: kill a rank under torchrun's elastic agent and lose nothing; NaN guard and rollback;
watchdog; spike and straggler detection; Young/Daly cadence."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from gigafactory import checkpoint as ckpt
from gigafactory.errors import UserError
from gigafactory.train.config import make_config
from gigafactory.train.loop import Trainer
from gigafactory.train.resilience import Checkpointer, SpikeDetector, StepGuard, stragglers, young_daly_steps

FAST = dict(model="tiny", batch_size=4, seq_len=64, eval_every=100, eval_windows=2, warmup_steps=2, dtype="fp32")


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def torchrun_train(run_dir, steps, fault=None, max_restarts=0):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           f"--max-restarts={max_restarts}", "-m", "gigafactory", "train", "--model", "tiny", "--steps", str(steps),
           "--run-dir", str(run_dir), "--layout", "dp_shard=2", "--batch-size", "4", "--seq-len", "64",
           "--dtype", "fp32", "--checkpoint-every", "4", "--eval-every", "100", "--warmup-steps", "2"]
    # Without this, torchrun's shared rendezvous store hands restarted ranks their dead peers' addresses
    # (pytorch/pytorch#135712): the restart then fails to connect.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    env.pop("GIGAFACTORY_FAULT", None)
    if fault:
        env["GIGAFACTORY_FAULT"] = fault
    return subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)


@pytest.fixture(scope="module")
def hurt(tmp_path_factory, tiny_run):
    """One 2-rank job under torchrun's elastic agent, two faults: rank 1 is a straggler in step 3 (3 s of extra
    work between two collectives) and is SIGKILLed before step 7, after the checkpoint of step 4 and before that
    of step 8. (One job for both: each torchrun start costs more than the training.)"""
    root = tmp_path_factory.mktemp("hurt")
    run = tiny_run(root / "run")
    return torchrun_train(run, 10, fault="slow:rank=1:step=3:ms=3000,kill:rank=1:step=7", max_restarts=3), run


def test_kill_a_rank_and_the_job_recovers_with_identical_losses(tmp_path, hurt, tiny_run):
    # The uninterrupted run is the one-process reference (the same training at any layout; a second torchrun job
    # would take longer than the whole one-process run). Two ranks sum in another order than one process: their
    # losses differ by up to 3 float32 ulps here (1.4e-6); a resume that lost anything (data position, optimizer
    # state, schedule step) is off by orders of magnitude more.
    Trainer(make_config(run_dir=tiny_run(tmp_path / "clean"), steps=10, checkpoint_every=4, **FAST), quiet=True).fit()
    proc, run = hurt
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from step_000004" in proc.stderr
    assert "Signals.SIGKILL" in proc.stderr or "SIGKILL" in proc.stderr or "exitcode: -9" in proc.stderr
    a, b = metrics(tmp_path / "clean"), metrics(run)
    assert [r["step"] for r in b] == list(range(1, 11))
    for x, y in zip(a, b, strict=True):
        assert math.isclose(x["loss"], y["loss"], rel_tol=0, abs_tol=1e-5), (x["step"], x["loss"], y["loss"])
    assert all("step_time_max_s" in r for r in b)
    assert [p.name for p in ckpt.list_checkpoints(run)][0] == "step_000010"


def test_nan_batch_skips_the_update_and_training_goes_on(tmp_path, monkeypatch, tiny_run):
    monkeypatch.setenv("GIGAFACTORY_FAULT", "nan:step=3")
    tr = Trainer(make_config(run_dir=tiny_run(tmp_path / "run"), steps=6, checkpoint_every=2, **FAST), quiet=True)
    before = {}

    def snapshot(trainer):
        return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}

    original = tr.train_step

    def spy():
        if tr.step == 2:
            before["params"] = snapshot(tr)
        out = original()
        if tr.step == 3:
            before["after"] = snapshot(tr)
        return out

    tr.train_step = spy
    tr.fit()
    rows = metrics(tmp_path / "run")
    assert rows[2]["step"] == 3 and rows[2]["loss"] is None and "skipped" in rows[2]
    assert all(r["loss"] is not None and math.isfinite(r["loss"]) for r in rows if r["step"] != 3)
    assert [r["step"] for r in rows] == list(range(1, 7))
    for k, v in before["params"].items():  # the poisoned step changed nothing
        assert (v == before["after"][k]).all(), k
    assert tr.guard.skipped == 1


def test_repeated_non_finite_steps_roll_back_to_the_last_checkpoint(tmp_path, monkeypatch, capsys, tiny_run):
    monkeypatch.setenv("GIGAFACTORY_FAULT", "nan:step=5,nan:step=6")
    cfg = make_config(run_dir=tiny_run(tmp_path / "run"), steps=8, checkpoint_every=4, max_bad_steps=2, **FAST)
    Trainer(cfg, quiet=True).fit()
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, 9))  # the history restarts at 4 after the rollback
    assert all(r["loss"] is not None for r in rows)  # the bad steps were replaced (their batches skipped)
    assert "rolled back to step 4" in capsys.readouterr().err


def test_async_checkpoints_commit_with_verified_manifests(tmp_path, tiny_run):
    run = tiny_run(tmp_path / "run")
    Trainer(make_config(run_dir=run, steps=6, checkpoint_every=2, async_checkpoint=True, **FAST), quiet=True).fit()
    found = ckpt.list_checkpoints(run)
    assert [p.name for p in found] == ["step_000006", "step_000004", "step_000002"]
    for p in found:
        manifest = ckpt.verify(p)
        assert manifest["data_position"] == manifest["step"]
    assert not list((run / "ckpt").glob(".*"))  # nothing half-written left behind


def test_auto_cadence_uses_young_daly(tmp_path, capsys, tiny_run):
    cfg = make_config(run_dir=tiny_run(tmp_path / "run"), steps=6, checkpoint_every="auto", fleet_gpus=100_000, **FAST)
    Trainer(cfg, quiet=True).fit()
    err = capsys.readouterr().err
    assert "checkpoint every" in err and "Young/Daly" in err and "100,000 GPUs" in err
    assert ckpt.list_checkpoints(tmp_path / "run")[0].name == "step_000006"


def test_young_daly_closed_form():
    # C = 10 s, MTBF = 5 h: sqrt(2·10·18000) = 600 s; at 2 s per step, 300 steps.
    assert young_daly_steps(10.0, 18_000.0, 2.0, 10_000) == 300
    assert young_daly_steps(10.0, 18_000.0, 2.0, 100) == 100
    assert young_daly_steps(1e-3, 1.0, 10.0, 100) == 1


def test_guards_spikes_and_stragglers():
    guard = StepGuard(max_bad=2)
    assert guard.allows(1.0) and not guard.allows(float("nan")) and not guard.wants_rollback
    assert not guard.allows(float("inf")) and guard.wants_rollback
    assert guard.allows(2.0) and not guard.wants_rollback
    spikes = SpikeDetector(window=20, sigmas=4, warmup=10)
    assert not any(spikes.is_spike(3.0 + 0.01 * (i % 3)) for i in range(15))
    assert spikes.is_spike(6.0)
    assert not spikes.is_spike(3.01)
    assert stragglers([1.0, 1.1, 0.9, 2.5]) == [3]
    assert stragglers([1.0, 1.2]) == []


def test_watchdog_ends_a_hung_process():
    code = ("import time; from gigafactory.train.resilience import Watchdog; Watchdog(1.0); time.sleep(30)")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 70 and "watchdog" in proc.stderr
    assert time.monotonic() - t0 < 20


@pytest.mark.parametrize("bad", ["0", "-3", "soon"])
def test_bad_checkpoint_cadence_is_a_one_line_error(tmp_path, cli, cli_here, bad):
    args = ("train", "--model", "tiny", "--steps", "2", "--run-dir", str(tmp_path / "r"), "--checkpoint-every", bad)
    if bad == "0":  # once in a fresh process, as a user sees it
        proc = cli(*args)
        code, err = proc.returncode, proc.stderr
    else:
        code, _, err = cli_here(*args)
    assert code != 0 and "Traceback" not in err and "checkpoint_every" in err


# --- checkpoints: fallback, per-rank checksums, disk full, run-directory lock -------------------------------------


def _tiny_state(n):
    return {"model": {"w": torch.arange(n, dtype=torch.float32)}}


def test_checkpoint_that_passes_checksums_but_does_not_load_falls_back(tmp_path):
    # Step 4 holds a tensor of another shape: its checksums are right, but DCP cannot load it into this state and
    # raises CheckpointException (a BaseException): the loader must fall back to step 2 like for any bad one.
    ckpt.save(tmp_path, 2, _tiny_state(3), {"data_position": 2})
    ckpt.save(tmp_path, 4, _tiny_state(5), {"data_position": 4})
    assert ckpt.verify(ckpt.list_checkpoints(tmp_path)[0])["step"] == 4
    state = {"model": {"w": torch.zeros(3)}}
    loaded = ckpt.load_latest(tmp_path, state)
    assert loaded is not None and loaded.path.name == "step_000002"
    assert "step_000004 failed to load" in loaded.skipped[0]
    assert torch.equal(state["model"]["w"], torch.arange(3, dtype=torch.float32))


def test_manifest_records_per_rank_digests_and_each_rank_verifies_its_share(tmp_path):
    path = ckpt.save(tmp_path, 2, {"model": {f"w{i}": torch.randn(64) for i in range(4)}}, {"data_position": 2})
    manifest = json.loads((path / ckpt.MANIFEST).read_text())
    assert manifest["world_size"] == 1 and len(manifest["hash_s_by_rank"]) == 1
    names = sorted(manifest["files"])
    assert ".metadata" in names and all(info["rank"] == ckpt.writer_rank(n) for n, info in manifest["files"].items())
    assert ckpt.writer_rank("__3_0.distcp") == 3 and ckpt.writer_rank(".metadata") == 0
    # Flip a byte (same size) in the file that is rank 0's share of two: rank 1 does not hash it, rank 0 does.
    victim = path / names[0]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    ckpt.verify(path, rank=1, world=2)
    with pytest.raises(ckpt.CorruptCheckpoint, match="checksum mismatch"):
        ckpt.verify(path, rank=0, world=2)
    with pytest.raises(ckpt.CorruptCheckpoint, match="checksum mismatch"):
        ckpt.verify(path)


def test_full_disk_is_a_one_line_error_before_and_during_a_save(tmp_path, monkeypatch):
    def enospc(state, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(UserError, match="^disk full: cannot write a checkpoint"):
        ckpt.save(tmp_path, 2, _tiny_state(3), {}, writer=enospc)
    assert ckpt.list_checkpoints(tmp_path) == []
    saver = Checkpointer(tmp_path, keep_last=2, asynchronous=False)
    saver.save(2, _tiny_state(3), {})
    real = shutil.disk_usage
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: real(p)._replace(free=10))
    with pytest.raises(UserError, match="^disk full: the next checkpoint needs about"):
        saver.save(4, _tiny_state(3), {})
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_000002"]


def test_run_directory_lock_names_its_holder_and_detects_stale_locks(tmp_path):
    run = tmp_path / "run"
    (run / "ckpt" / ".step_000009.tmp").mkdir(parents=True)  # a save cut short by a crash
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from gigafactory.checkpoint import RunLock; "
         f"RunLock({str(run)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=f"in use by another job \\(pid {holder.pid} on host"):
            ckpt.lock_run_dir(run)
    finally:
        holder.kill()
        holder.wait()
    # The holder died without releasing: the kernel dropped its flock; the lock file still names it.
    lock, notes = ckpt.lock_run_dir(run)
    try:
        assert any(f"stale run-directory lock (pid {holder.pid}" in n for n in notes)
        assert any(".step_000009.tmp" in n for n in notes) and not (run / "ckpt" / ".step_000009.tmp").exists()
        assert ckpt.RunLock(run).acquire() is lock  # re-entrant within one process (one job)
    finally:
        lock.release()
    lock2, notes2 = ckpt.lock_run_dir(run)  # released cleanly: nothing stale
    lock2.release()
    assert notes2 == []


# --- the trainer: no phantom optimizer step, the spec checked first, the lock from the CLI ---------------------------


def test_auto_resume_with_no_checkpoint_yet_trains_like_a_fresh_run(tmp_path, tiny_run):
    fresh = Trainer(make_config(run_dir=tiny_run(tmp_path / "a"), steps=3, checkpoint_every=3, **FAST),
                    quiet=True).fit()
    auto = Trainer(make_config(run_dir=tiny_run(tmp_path / "b"), steps=3, checkpoint_every=3, auto_resume=True, **FAST),
                   quiet=True)
    assert auto.resumed_from is None and not auto.optimizer.state  # no phantom Adam step left behind
    assert auto.fit().losses == fresh.losses


def test_resuming_with_another_model_names_the_model_not_the_data(tmp_path, tiny_run):
    run = tiny_run(tmp_path / "run")
    Trainer(make_config(run_dir=run, steps=1, checkpoint_every=1, **FAST), quiet=True).fit()
    other = {**FAST, "model": "small"}
    with pytest.raises(UserError, match="holds a run of another model"):
        Trainer(make_config(run_dir=run, steps=2, resume=True, **other), quiet=True)


def test_a_second_job_on_a_run_directory_is_refused(tmp_path, cli_here):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time; from gigafactory.checkpoint import RunLock; "
         f"RunLock({str(run)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, _, err = cli_here("train", "--model", "tiny", "--steps", "1", "--run-dir", str(run), "--batch-size",
                                "4", "--seq-len", "64", "--dtype", "fp32")
    finally:
        holder.kill()
        holder.wait()
    assert code != 0 and "Traceback" not in err
    assert f"in use by another job (pid {holder.pid}" in err
    assert not (run / "ckpt").exists()


def test_a_slow_rank_is_named_from_its_compute_time_not_its_step_time(hurt):
    # Rank 1 does 3 s of extra work inside step 3 (between two collectives): both ranks' step takes >3 s, but
    # rank 0 spends it waiting in a collective; only rank 1's compute is long. (Step 3's row is from before the
    # kill: the job resumed from step 4.)
    proc, run = hurt
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["step"]: r for r in metrics(run)}
    slow = rows[3]
    assert slow["step_time_max_s"] > 3.0 and slow["step_time_s"] > 3.0  # rank 0's own step time is long too
    assert slow["stragglers"] == [1]
    assert slow["compute_time_s"][1] > 2.9 and slow["compute_time_s"][0] < 1.5
    assert slow["collective_wait_s"][0] > 2.5
    assert all("stragglers" not in rows[s] for s in (1, 2, 4))
