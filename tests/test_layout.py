import pytest

from gigafactory.errors import UserError
from gigafactory.specs.layout import Layout
from gigafactory.specs.model_spec import PRESETS

GROK2 = PRESETS["grok-2"]


def test_parse_and_roundtrip() -> None:
    lay = Layout.parse("dp_shard=2,tp=2,recompute=full")
    assert (lay.dp_shard, lay.tp, lay.recompute, lay.world_size) == (2, 2, "full", 4)
    assert Layout.from_json(lay.to_json()) == lay


@pytest.mark.parametrize("text,msg", [("tp=two", "not an integer"), ("foo=2", "unknown layout key"),
                                      ("tp", "key=value"), ("recompute=some", "recompute")])
def test_parse_errors(text: str, msg: str) -> None:
    with pytest.raises(UserError, match=msg):
        Layout.parse(text)


@pytest.mark.parametrize("text,world,msg", [
    ("dp_shard=8,tp=8", 100, "multiply"),
    ("dp_shard=1,tp=16", 16, "larger than a node"),
    ("dp_shard=6,ep=3", 6, "does not divide n_experts"),
    ("dp_shard=2,ep=4", 2, "must divide dp_shard"),
    ("pp=128", 128, "only 64 layers"),
    ("tp=3", 3, "n_heads"),
])
def test_validate_errors(text: str, world: int, msg: str) -> None:
    with pytest.raises(UserError, match=msg) as err:
        Layout.parse(text).validate(GROK2, world, gpus_per_node=8)
    assert "\n" not in str(err.value)


def test_valid_layout_passes() -> None:
    Layout.parse("dp_replicate=2,dp_shard=8,tp=8,pp=4,ep=8").validate(GROK2, 512, 8)


@pytest.mark.parametrize("model", ["grok-1", "grok-2"])
@pytest.mark.parametrize("gpus", [1024, 20_000, 100_000])
def test_planner_proposes_only_layouts_the_trainer_runs(model: str, gpus: int) -> None:
    from gigafactory.plan.costmodel import MODERN, Cluster
    from gigafactory.plan.search import search
    from gigafactory.specs.hardware import get_gpu
    from gigafactory.specs.layout import check_supported

    spec = PRESETS[model]
    res = search(spec, Cluster.of(get_gpu("h100-sxm"), gpus, "spectrum-x"), 64 * 2**20, 8192, MODERN, top=3)
    assert res.ranked, f"no plan for {model} on {gpus}"
    for cost in res.ranked:
        check_supported(cost.layout, spec, gpus, 8)  # raises on any layout the trainer would refuse


@pytest.mark.parametrize("text,world,msg", [
    ("dp_shard=2,ep=4,cp=2", 4, "must divide dp_shard=2"),
    ("pp=4,pp_virtual=3,pp_schedule=interleaved", 4, "use pp in"),
    ("pp=2,pp_schedule=interleaved", 2, "needs pp_virtual > 1"),
])
def test_trainer_refusals_are_one_line(text: str, world: int, msg: str) -> None:
    from gigafactory.specs.layout import check_supported, unsupported_reason

    lay = Layout.parse(text)
    with pytest.raises(UserError, match=msg) as err:
        check_supported(lay, GROK2, world)
    assert "\n" not in str(err.value) and unsupported_reason(lay, GROK2) == str(err.value)


def test_tp_must_divide_the_vocabulary() -> None:
    """The trainer splits the vocabulary over tp without padding: a vocabulary tp does not divide is refused."""
    from gigafactory.specs.layout import check_supported

    tiny = PRESETS["tiny"]
    with pytest.raises(UserError, match="tp=2 must divide vocab_size=1031") as err:
        check_supported(Layout.parse("tp=2"), tiny.model_copy(update={"vocab_size": 1031}), 2)
    assert "\n" not in str(err.value)
    check_supported(Layout.parse("tp=2"), tiny.model_copy(update={"vocab_size": 1030}), 2)
