"""Tensor- and expert-parallel serving on two gloo ranks (one torchrun job for both modes): greedy outputs equal
the single-process engine's, each rank's KV pool holds half the key/value heads, and each rank keeps half of
every split weight (the replicated embedding, head, norms and routers whole)."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from serve_helpers import trained_run

WORKER = Path(__file__).with_name("serve_parallel_worker.py")


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    run = trained_run(tmp_path_factory)
    out = tmp_path_factory.mktemp("tp") / "result.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(WORKER),
           str(run), str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    # Its own process group, so a hang kills the ranks too (not only torchrun).
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)  # fmt: skip
    try:
        _, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        pytest.fail(f"the two ranks did not finish in 300 s:\n{stderr[-3000:]}")
    assert proc.returncode == 0, stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("mode", ["tp", "ep"])
def test_two_ranks_give_one_process_greedy_output(result, mode):
    assert all(len(text) > 5 for text in result["reference"])
    assert result[mode] == result["reference"]
    assert result[f"{mode}_pool_heads"] == result["n_kv_heads"] // 2


@pytest.mark.parametrize("mode", ["tp", "ep"])
def test_each_rank_keeps_half_of_the_split_weights(result, mode):
    full, replicated = result["full_bytes"], result["replicated_bytes"]
    assert result[f"{mode}_bytes"] == [replicated + (full - replicated) // 2] * 2
