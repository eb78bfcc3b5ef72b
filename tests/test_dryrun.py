"""`gigafactory train --dry-run`: one step of rank 0 on fake tensors and a fake process group of the layout's
world size, its per-rank memory terms and collective bytes beside the planner's (`train/dryrun.py`)."""

from __future__ import annotations

import json

import pytest

from gigafactory.specs import load_spec
from gigafactory.specs.layout import Layout
from gigafactory.train.dryrun import MEMORY_KEYS, dry_run

STATE = ("params", "grads", "optimizer")  # held all step: the planner's state_split


def _rel(m: float, p: float) -> float:
    return abs(m - p) / p


@pytest.mark.parametrize(("layout", "world"), [("dp_shard=4", 4), ("dp_shard=4,ep=2", 4), ("dp_shard=2,tp=2", 4)])
def test_tiny_dry_run_matches_the_planner(layout: str, world: int) -> None:
    r = dry_run(load_spec("tiny"), Layout.parse(layout), world, batch_size=8, grad_accum=1, seq_len=32)
    mem, coll = r["memory"], r["collectives"]
    assert set(mem["measured"]) == set(mem["predicted"]) == set(MEMORY_KEYS)
    assert set(coll["measured"]) == set(coll["predicted"])
    for key in STATE:
        assert _rel(mem["measured"][key], mem["predicted"][key]) <= 0.10, (key, mem)
    for kind in ("all_gather", "reduce_scatter", "all_to_all"):
        if kind in coll["predicted"]:
            assert _rel(coll["measured"][kind], coll["predicted"][kind]) <= 0.10, (kind, coll)
    assert mem["measured"]["activations_peak"] > 0 and mem["measured"]["total_peak"] >= sum(
        mem["measured"][k] for k in STATE)


def test_cli_dry_run_json(cli, tmp_path) -> None:  # noqa: ANN001
    proc = cli("train", "--model", "tiny", "--layout", "dp_shard=4", "--batch-size", "8", "--seq-len", "32",
               "--run-dir", str(tmp_path / "r"), "--dry-run", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["world_size"] == 4 and report["layout"]["dp_shard"] == 4
    assert set(report["memory"]["measured"]) == set(report["memory"]["predicted"])
    assert not (tmp_path / "r").exists()  # a dry run trains nothing and writes nothing
