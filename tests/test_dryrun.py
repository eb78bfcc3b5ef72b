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


@pytest.mark.parametrize(("layout", "world"), [("dp_shard=4", 4), ("dp_shard=4,ep=2", 4), ("dp_shard=2,tp=2", 4),
                                               ("dp_shard=6,ep=2", 6)])  # experts FSDP over 3: d_model=128 ∤ 3
def test_tiny_dry_run_matches_the_planner(layout: str, world: int) -> None:
    r = dry_run(load_spec("tiny"), Layout.parse(layout), world, batch_size=12 if world == 6 else 8, grad_accum=1,
                seq_len=32)
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


def _two_layers(name: str):  # noqa: ANN202
    """The real Grok dimensions (d_model, heads, vocabulary, experts, FFN widths) with 2 of the 64 layers: every
    per-layer term is the real one and the run takes seconds (64 layers: minutes)."""
    from gigafactory.specs import ModelSpec

    return ModelSpec(**{**load_spec(name).model_dump(), "n_layers": 2, "name": f"{name}-2-layers"})


# (model, layout, world size, global batch in sequences, grad_accum): layouts `gigafactory plan --model M
# --gpus N` chose (plan --export's plan.json; the planner has since moved on for some), plus one with TP, EP and
# FSDP together.
GROK = [
    ("grok-1", "dp_replicate=4,dp_shard=512,ep=2,micro_batch=2,recompute=full", 2048, 8192, 2),
    ("grok-1", "dp_replicate=8,dp_shard=1024,ep=4,recompute=full", 8192, 8192, 1),
    ("grok-1", "dp_shard=64,tp=2,ep=4,recompute=full", 128, 128, 1),
    ("grok-2", "dp_replicate=4,dp_shard=1024,ep=2,micro_batch=2,recompute=full", 4096, 8192, 1),
    pytest.param("grok-2", "dp_shard=64,tp=2,ep=4,recompute=full", 128, 128, 1,
                 marks=pytest.mark.xfail(strict=True, reason="this trainer keeps grok-2's untied embedding and "
                                         "head whole on every tp rank; the planner splits the vocabulary (state "
                                         "+13% with 2 layers, ~0.4% with all 64; FSDP's gather +9%)")),
    pytest.param("grok-2", "dp_replicate=10,dp_shard=1000,tp=2,ep=4,recompute=full", 20000, 10000, 1,
                 marks=pytest.mark.xfail(strict=True, reason="the vocabulary under tp, as above (state +15% with 2 "
                                         "layers; with all 64 the Done-when run agrees, docs/train.md)")),
    # the seed plans' expert sharding (FSDP over 250 ranks, which d_model=8192 does not split into) without their
    # tp: with expert parallelism (experts their own FSDP unit) and without (today's plan, whole-layer units)
    ("grok-2", "dp_replicate=20,dp_shard=1000,ep=4,recompute=full", 20000, 20000, 1),
    ("grok-2", "dp_replicate=80,dp_shard=250,recompute=full", 20000, 20000, 1),
]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "layout", "world", "batch", "accum"), GROK)
def test_grok_dry_run_at_true_world_size(name: str, layout: str, world: int, batch: int, accum: int) -> None:
    lay = Layout.parse(layout)
    r = dry_run(_two_layers(name), lay, world, batch_size=batch, grad_accum=accum, seq_len=8192)
    mem, coll = r["memory"], r["collectives"]
    print(json.dumps(r))
    for key in MEMORY_KEYS:
        assert _rel(mem["measured"][key], mem["predicted"][key]) <= 0.10, (key, mem)
    assert set(coll["measured"]) == set(coll["predicted"])
    for kind in coll["predicted"]:
        assert _rel(coll["measured"][kind], coll["predicted"][kind]) <= 0.10, (kind, coll)
