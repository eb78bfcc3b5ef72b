import json
import math

import pytest
import torch

from gigafactory.errors import UserError
from gigafactory.model import GrokModel
from gigafactory.specs import PRESETS, ModelSpec, expert_ffn_size, load_spec


@pytest.mark.parametrize("name", list(PRESETS))
def test_module_parameter_count_equals_spec_formula(name):
    spec = PRESETS[name]
    with torch.device("meta"):
        model = GrokModel(spec)
    assert sum(p.numel() for p in model.parameters()) == spec.params_total
    # Active = total minus the experts a token does not visit, counted from the module's own tensors.
    experts = sum(sum(p.numel() for p in m.experts.parameters()) for m in model.moe_layers())
    idle = experts * (spec.n_experts - spec.top_k) // spec.n_experts
    assert spec.params_total - idle == spec.params_active


def test_grok_counts_match_published_sizes():
    g1, g2 = PRESETS["grok-1"], PRESETS["grok-2"]
    assert 314e9 <= g1.params_total <= 316e9
    assert 80e9 <= g1.params_active <= 90e9
    assert abs(g2.params_total - 269.5e9) / 269.5e9 < 0.005
    assert expert_ffn_size(8, 6144) == 32_768


def test_cpu_presets_are_sized_for_tests_and_demo():
    assert 1e6 <= PRESETS["tiny"].params_total < 10e6
    assert 20e6 <= PRESETS["small"].params_total <= 50e6


def test_flops_per_token_convention_by_hand():
    s = PRESETS["tiny"]
    attn = s.d_model * (2 * s.n_heads * s.head_dim + 2 * s.n_kv_heads * s.head_dim)
    per_layer = attn + s.top_k * 3 * s.d_model * s.expert_ffn + s.d_model * s.n_experts
    head = s.vocab_size * s.d_model
    expected = 6 * (s.n_layers * per_layer + head) + 12 * s.n_layers * s.n_heads * s.head_dim * 64
    assert s.flops_per_token(64) == expected


def test_user_spec_from_toml_and_json(tmp_path):
    base = PRESETS["tiny"].model_dump()
    (tmp_path / "mine.json").write_text(json.dumps({**base, "n_layers": 3, "name": "mine"}))
    assert load_spec(str(tmp_path / "mine.json")).n_layers == 3
    toml = "\n".join(f"{k} = {json.dumps(v) if not isinstance(v, bool) else str(v).lower()}"
                     for k, v in base.items() if v is not None)
    (tmp_path / "mine.toml").write_text(toml)
    assert load_spec(str(tmp_path / "mine.toml")).params_total == PRESETS["tiny"].params_total


@pytest.mark.parametrize(
    "change, message",
    [
        ({"n_heads": 3}, "does not divide d_model"),
        ({"top_k": 5}, "exceeds n_experts"),
        ({"n_kv_heads": 3}, "n_kv_heads"),
    ],
)
def test_bad_specs_fail_with_one_line(tmp_path, change, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({**PRESETS["tiny"].model_dump(), **change}))
    with pytest.raises(UserError, match=message) as err:
        load_spec(str(path))
    assert "\n" not in str(err.value)


def test_unknown_preset():
    with pytest.raises(UserError, match="unknown model"):
        load_spec("grok-9")


def test_spec_is_torch_free():
    import subprocess
    import sys

    code = "import sys, gigafactory.specs; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_spec_cli_json(cli):
    out = cli("spec", "grok-1", "--json", check=True)
    info = json.loads(out.stdout)
    assert info["params_total"] == PRESETS["grok-1"].params_total
    assert info["flops_per_token"] == PRESETS["grok-1"].flops_per_token()
    bad = cli("spec", "grok-9")
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and "unknown model" in bad.stderr


def test_embedding_multiplier_default_is_neutral():
    assert ModelSpec(**{**PRESETS["tiny"].model_dump(), "embedding_multiplier": 1.0}).embedding_multiplier == 1.0
    assert math.isclose(PRESETS["grok-1"].embedding_multiplier, math.sqrt(6144), rel_tol=1e-3)


def test_cli_start_up_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, gigafactory.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"  # planning and simulating stay instant
