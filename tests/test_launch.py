import json


def test_launch_runs_torchrun_ranks_locally(tmp_path, cli):
    run = tmp_path / "run"
    proc = cli("launch", "--nproc", "2", "train", "--model", "tiny", "--steps", "2", "--run-dir", str(run),
               "--layout", "dp_shard=2", "--batch-size", "4", "--seq-len", "64", "--dtype", "fp32", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["comm_all_gather_bytes"] > 0 for r in rows)  # really sharded over two ranks


def test_launch_without_a_command_is_a_one_line_error(cli):
    proc = cli("launch", "--nproc", "2")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and "needs a command" in proc.stderr
