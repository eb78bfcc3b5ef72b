"""Recovering a rank from its peer's host memory instead of the disk checkpoint (`train/peer.py`): after a crash the
restarted ranks restore the newest peer snapshot with the losses of an uninterrupted run; a missing, corrupt or
stale copy sends them to the disk checkpoint; the first step after a restart logs a `recovered` event."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gigafactory import checkpoint as ckpt
from gigafactory.train.config import make_config
from gigafactory.train.loop import Trainer
from gigafactory.train.peer import decode, encode, judge, ring

FAST = dict(model="tiny", batch_size=4, seq_len=32, eval_every=100, eval_windows=2, warmup_steps=2, dtype="fp32",
            steps=8, checkpoint_every=4, peer_snapshot_every=2, async_checkpoint=False)


class Crash(Exception):
    pass


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_run):
    """An uninterrupted run (its losses), whose tokenizer and token arrays the other runs reuse."""
    run = tiny_run(tmp_path_factory.mktemp("peer") / "ref")
    return run, Trainer(make_config(run_dir=run, **FAST), quiet=True).fit().losses


def prepared(reference, run):
    """A new run directory holding only the reference's prepared data (tokenizing takes longer than training)."""
    src: Path = reference[0]
    run.mkdir(parents=True)
    shutil.copytree(src / "data", run / "data")
    for name in ("tokenizer.json", "personas.json"):
        shutil.copy(src / name, run / name)
    return run


def rows(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def crash_before(step, cfg):
    """Train until just before `step`, then die as a killed rank would (no clean-up runs)."""
    tr = Trainer(cfg, quiet=True)

    def fault(s):
        if s == step:
            raise Crash

    tr.faults.before_step = fault
    with pytest.raises(Crash):
        tr.fit()
    if tr.lock is not None:
        tr.lock.release()
    return tr


def test_ring_puts_each_copy_on_the_next_host():
    assert [ring(r, 4, 2)[0] for r in range(4)] == [2, 3, 0, 1]  # 2 hosts x 2 ranks: never the own host
    assert [ring(r, 2, 2)[0] for r in range(2)] == [1, 0]  # one host: the next rank
    assert ring(0, 1, 1) == (0, 0)


def test_snapshot_checksum_and_agreement():
    blob = encode({"w": torch.arange(4.0)}, {"step": 6})
    assert decode(blob)["meta"]["step"] == 6 and torch.equal(decode(blob)["state"]["w"], torch.arange(4.0))
    bad = bytearray(blob)
    bad[-3] ^= 0xFF
    with pytest.raises(ValueError, match="checksum mismatch"):
        decode(bytes(bad))
    ok = [{"problem": None, "meta": {"step": 6, "owner": o, "world": 2, "fingerprint": "f"}} for o in (1, 0)]
    assert judge(ok, [1, 0], 2, "f", disk_step=4) == ""
    assert "older than the newest checkpoint (step 8)" in judge(ok, [1, 0], 2, "f", disk_step=8)
    assert "another job shape" in judge(ok, [1, 0], 4, "f", disk_step=4)
    mixed = [ok[0], {**ok[1], "meta": {**ok[1]["meta"], "step": 4}}]
    assert "different steps" in judge(mixed, [1, 0], 2, "f", disk_step=4)


def test_restart_restores_from_peer_memory_with_identical_losses(tmp_path, monkeypatch, reference):
    monkeypatch.setenv("GIGAFACTORY_PEER_STORE", str(tmp_path / "shm"))
    run = prepared(reference, tmp_path / "run")
    first = crash_before(7, make_config(run_dir=run, **FAST))  # snapshot of step 6 held, checkpoint of step 4
    assert first.peer is not None and first.peer.path.is_file()
    monkeypatch.setenv("GIGAFACTORY_RESTARTS", "1")
    again = Trainer(make_config(run_dir=run, **FAST), quiet=True)
    assert again.resumed_from == 6 and any("resumed from peer memory (step 6)" in n for n in again.notes)
    again.fit()
    got = rows(run)
    assert [r["step"] for r in got] == list(range(1, 9))
    assert [r["loss"] for r in got] == reference[1]  # bitwise
    event = got[6]["recovered"]
    assert event["from"] == "peer" and event["downtime_s"] > 0 and event["lost_steps"] == 0
    assert not first.peer.dir.exists()  # the run ended: the host memory is freed


@pytest.mark.parametrize("damage", ["corrupt", "missing"])
def test_a_bad_peer_copy_falls_back_to_the_disk_checkpoint(tmp_path, monkeypatch, reference, damage):
    monkeypatch.setenv("GIGAFACTORY_PEER_STORE", str(tmp_path / "shm"))
    run = prepared(reference, tmp_path / "run")
    first = crash_before(7, make_config(run_dir=run, **FAST))
    held = first.peer.path
    if damage == "corrupt":
        data = bytearray(held.read_bytes())
        data[len(data) // 2] ^= 0xFF
        held.write_bytes(bytes(data))
    else:
        held.unlink()
    monkeypatch.setenv("GIGAFACTORY_RESTARTS", "1")
    again = Trainer(make_config(run_dir=run, **FAST), quiet=True)
    assert again.resumed_from == 4 and again.recovery["from"] == "disk"
    want = "is corrupt (checksum mismatch)" if damage == "corrupt" else "holds no snapshot"
    assert any("peer snapshots not used" in n and want in n for n in again.notes), again.notes


def torchrun(run, store, fault=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=1",
           "-m", "gigafactory", "train", "--model", "tiny", "--steps", "8", "--run-dir", str(run), "--layout",
           "dp_shard=2", "--batch-size", "4", "--seq-len", "32", "--dtype", "fp32", "--checkpoint-every", "4",
           "--peer-snapshot-every", "2", "--eval-every", "100", "--warmup-steps", "2", "--sync-checkpoint"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
           "GIGAFACTORY_PEER_STORE": str(store), "GIGAFACTORY_FAULT": fault or ""}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_two_ranks_kill_one_and_it_resumes_from_its_peer(tmp_path, reference):
    # Rank 1 is SIGKILLed before step 7, after the peer snapshot of step 6 and the disk checkpoint of step 4. The
    # uninterrupted run is the one-process reference (the same training at any layout; a second torchrun job would
    # double the test's time): within 1e-6 at every step.
    hurt = torchrun(prepared(reference, tmp_path / "hurt"), tmp_path / "shm-hurt", fault="kill:rank=1:step=7")
    _, hurt_err = hurt.communicate(timeout=300)
    assert hurt.returncode == 0, hurt_err[-4000:]
    assert "SIGKILL" in hurt_err or "exitcode: -9" in hurt_err
    assert "resumed from peer memory (step 6)" in hurt_err and "resumed from step_" not in hurt_err
    b = rows(tmp_path / "hurt")
    assert [r["step"] for r in b] == list(range(1, 9))
    for want, y in zip(reference[1], b, strict=True):
        assert math.isclose(want, y["loss"], rel_tol=0, abs_tol=1e-6), (y["step"], want, y["loss"])
    event = b[6]["recovered"]
    assert event["from"] == "peer" and event["downtime_s"] > 0 and event["resumed_step"] == 6
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "hurt")][0] == "step_000008"


def test_a_snapshot_store_that_cannot_be_written_is_a_note_not_a_crash(tmp_path, monkeypatch, reference):
    (tmp_path / "not-a-dir").write_text("")  # as a full or missing /dev/shm: every write fails, even as root
    monkeypatch.setenv("GIGAFACTORY_PEER_STORE", str(tmp_path / "not-a-dir" / "shm"))
    tr = Trainer(make_config(run_dir=prepared(reference, tmp_path / "run"), **FAST), quiet=True)
    assert tr.fit().losses == reference[1]
    assert any("peer snapshot not kept" in n for n in tr.notes)
