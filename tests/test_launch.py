import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gigafactory.errors import UserError
from gigafactory.train.launch import RestartBudget, parse_duration


def test_launch_runs_torchrun_ranks_locally(tmp_path, cli, tiny_run):
    run = tiny_run(tmp_path / "run")
    proc = cli("launch", "--nproc", "2", "train", "--model", "tiny", "--steps", "2", "--run-dir", str(run),
               "--layout", "dp_shard=2", "--batch-size", "4", "--seq-len", "64", "--dtype", "fp32", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["comm_all_gather_bytes"] > 0 for r in rows)  # really sharded over two ranks


def test_launch_without_a_command_is_a_one_line_error(cli):
    proc = cli("launch", "--nproc", "2")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and "needs a command" in proc.stderr


# --- restarts per time window; workers die with their agent ---------------------------------------------------------


def test_restart_budget_counts_within_a_sliding_window():
    now = [0.0]
    budget = RestartBudget(3, parse_duration("1h"), clock=lambda: now[0])
    assert [budget.allow() for _ in range(3)] == [True, True, True]
    assert not budget.allow()  # a 4th within the hour
    now[0] = 3600.0  # the first three leave the window together
    assert budget.allow()
    lifetime = RestartBudget(1, parse_duration("0"), clock=lambda: now[0])
    now[0] = 1e9
    assert lifetime.allow() and not lifetime.allow()
    assert parse_duration("90") == 90 and parse_duration("30m") == 1800 and parse_duration("2d") == 172800
    with pytest.raises(UserError, match="not a duration"):
        parse_duration("soon")


def test_launch_restarts_a_failing_job_then_gives_up_with_one_line(cli):
    proc = cli("launch", "--nproc", "1", "--max-restarts", "1", "--restart-window", "1h", "train", "--model",
               "no-such-model", timeout=300)
    assert proc.returncode != 0
    assert "restart 1 of 1 within 1h" in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]  # torchrun prints its own report of each attempt before
    assert last.startswith("error:") and "has used its 1 restarts within 1h" in last
    assert proc.stderr.count("unknown model") == 2  # two attempts ran


def _children(pid):
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_workers_die_when_their_agent_is_killed(tmp_path, tiny_run):
    run = tiny_run(tmp_path / "run")
    agent = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1", "--max-restarts=0",
         "-m", "gigafactory", "train", "--model", "tiny", "--steps", "100000", "--run-dir", str(run),
         "--batch-size", "2", "--seq-len", "32", "--dtype", "fp32", "--checkpoint-every", "100000"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    workers = []
    try:
        deadline = time.monotonic() + 120
        metrics = run / "metrics.jsonl"
        while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
            assert time.monotonic() < deadline and agent.poll() is None, "the job did not start training"
            time.sleep(0.5)
        workers = _children(agent.pid)
        assert workers
        agent.send_signal(signal.SIGKILL)
        agent.wait()
        deadline = time.monotonic() + 15
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(w) for w in workers), "a worker outlived its agent"
    finally:
        agent.kill()
        for w in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(w, signal.SIGKILL)
