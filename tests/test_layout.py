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
