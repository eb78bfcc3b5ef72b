import json

import pytest

from gigafactory.errors import UserError
from gigafactory.specs import hardware


def test_catalog_has_required_gpus_with_sane_values() -> None:
    for name in ("a100-40g", "a100-80g", "h100-sxm", "h800", "h200", "b200"):
        g = hardware.get_gpu(name)
        assert g.bf16_dense_flops > 1e14 and g.hbm_bytes >= 40e9 and g.tdp_w >= 400
    assert hardware.get_gpu("h100-sxm").bf16_dense_flops == pytest.approx(989.4e12)
    assert hardware.get_gpu("h100-sxm").fp8_dense_flops == pytest.approx(2 * 989.4e12, rel=1e-3)
    assert hardware.get_gpu("h800").nvlink_bw < hardware.get_gpu("h100-sxm").nvlink_bw


def test_unknown_gpu_lists_known_ones() -> None:
    with pytest.raises(UserError, match="h100-sxm"):
        hardware.get_gpu("v100")


def test_device_name_mapping() -> None:
    assert hardware.gpu_by_device_name("NVIDIA H100 80GB HBM3").name == "h100-sxm"
    assert hardware.gpu_by_device_name("NVIDIA A100-SXM4-80GB").name == "a100-80g"
    assert hardware.gpu_by_device_name("NVIDIA A100-SXM4-40GB").name == "a100-40g"
    assert hardware.gpu_by_device_name("NVIDIA H200").name == "h200"
    assert hardware.gpu_by_device_name("NVIDIA GeForce RTX 3090") is None


def test_catalog_override_from_file(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(hardware, "GPUS", dict(hardware.GPUS))
    monkeypatch.setattr(hardware, "SITE", hardware.SITE)
    f = tmp_path / "cat.json"
    f.write_text(json.dumps({"gpu": {"h100-sxm": {"lease_usd_per_h": 1.5}}, "site": {"pue": 1.5}}))
    hardware.load_catalog(f)
    assert hardware.get_gpu("h100-sxm").lease_usd_per_h == 1.5
    assert hardware.get_site().pue == 1.5
    f.write_text(json.dumps({"gpu": {"h100-sxm": {"tdp_w": -3}}}))
    with pytest.raises(UserError, match="tdp_w"):
        hardware.load_catalog(f)
