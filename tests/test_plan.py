"""Cost-model formulas against hand-computed values, and the planner's end-to-end behaviour."""

import json
import math
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from gigafactory.errors import UserError
from gigafactory.plan.campaign import campaign, expected_goodput
from gigafactory.plan.costmodel import (
    MODERN,
    Cluster,
    collective_bytes,
    collective_time,
    estimate,
    gemm_shape_efficiency,
    in_flight_last_stage,
    in_flight_microbatches,
    korthikanti_activation_bytes,
    pipeline_bubble_fraction,
    ring_time,
    state_bytes_per_param,
)
from gigafactory.plan.search import search
from gigafactory.specs.hardware import get_gpu, get_site
from gigafactory.specs.layout import Layout, check_supported
from gigafactory.specs.model_spec import PRESETS

ROOT = Path(__file__).resolve().parents[1]
CSV = ROOT / "src" / "gigafactory" / "data" / "validation" / "public_runs.csv"
MOE_CSV = CSV.with_name("moe_runs.csv")
EXE = str(Path(sys.executable).with_name("gigafactory"))


def test_korthikanti_activation_memory() -> None:
    # GPT-3 175B layer: s=2048, b=1, h=12288, a=96, t=8 (Korthikanti et al. 2022, Table 2 rows)
    s, b, h, a, t = 2048, 1, 12288, 96, 8
    sbh = s * b * h
    assert korthikanti_activation_bytes(s, b, h, a, 1) == pytest.approx(sbh * (34 + 5 * 96 * 2048 / 12288))
    assert korthikanti_activation_bytes(s, b, h, a, t, "none", False) == pytest.approx(sbh * (10 + 3 + 80 / 8))
    assert korthikanti_activation_bytes(s, b, h, a, t, "none", True) == pytest.approx(sbh / 8 * 114)
    assert korthikanti_activation_bytes(s, b, h, a, t, "selective", True) == pytest.approx(sbh / 8 * 34)
    assert korthikanti_activation_bytes(s, b, h, a, t, "full", True) == pytest.approx(2 * sbh / 8)


def test_ring_all_reduce_time() -> None:
    # 1 GB over 8 ranks at 100 GB/s: wire 2·7/8 GB -> 17.5 ms, plus 14 steps of 1 µs latency
    assert ring_time("all_reduce", 1e9, 8, 100e9) == pytest.approx(0.0175)
    assert ring_time("all_reduce", 1e9, 8, 100e9, 1e-6) == pytest.approx(0.0175 + 14e-6)
    assert ring_time("all_gather", 1e9, 4, 100e9) == pytest.approx(0.0075)
    assert ring_time("all_reduce", 1e9, 1, 100e9) == 0.0


def test_pipeline_bubble_fraction() -> None:
    assert pipeline_bubble_fraction(8, 64) == pytest.approx(7 / 64)
    assert pipeline_bubble_fraction(8, 64, virtual=4) == pytest.approx(7 / 256)
    assert pipeline_bubble_fraction(1, 1) == 0.0
    assert in_flight_microbatches(Layout(pp=4), 32) == 4  # 1F1B keeps p micro-batches
    assert in_flight_microbatches(Layout(pp=4, pp_schedule="gpipe"), 32) == 32
    assert in_flight_microbatches(Layout(pp=4, pp_schedule="interleaved", pp_virtual=2), 32) == pytest.approx(5.5)


def test_optimizer_bytes_per_param() -> None:
    # bf16 weights 2 + fp32 grads 4 + fp32 master 4 + Adam 8
    assert state_bytes_per_param(1, "ddp") == 18
    assert state_bytes_per_param(8, "zero1") == pytest.approx(6 + 12 / 8)
    assert state_bytes_per_param(8, "zero2") == pytest.approx(2 + 16 / 8)
    assert state_bytes_per_param(8, "fsdp") == pytest.approx(2)


def test_collective_bytes_tiny_fsdp_by_hand() -> None:
    tiny = PRESETS["tiny"]
    lay = Layout(dp_shard=2)
    got = collective_bytes(tiny, lay, global_batch_seqs=4, seq_len=128)  # 2 micro-batches per rank
    # every layer parameter gathered in forward and backward of each micro-batch, the root's (tied) embedding once
    # (FSDP2 does not reshard the root after forward; measured on gloo, tests/test_parallel.py), bf16
    p = tiny.params_total - tiny.d_model  # the final norm is not counted per layer/embedding
    emb = tiny.embedding_params
    assert got["all_gather"] == pytest.approx(2 * (2 * (p - emb) + emb) * 2, rel=1e-3)
    assert got["reduce_scatter"] == pytest.approx(2 * p * 4, rel=1e-3)  # fp32 gradients after each micro-batch
    assert set(got) == {"all_gather", "reduce_scatter"}
    tp = collective_bytes(tiny, Layout(tp=2), 2, 128, reshard_after_forward=False)
    # 2 layers × (attention + FFN) × (fwd + bwd) × 2 micro-batches × 128 tokens × 128 dims × 2 bytes, plus the
    # vocabulary split: per micro-batch the embedding's reduce-scatter (its backward's gather), the head's gather
    # (its backward's reduce-scatter), and the loss's max, Σexp and target logit (fp32 per token)
    assert tp["all_gather"] == tp["reduce_scatter"] == pytest.approx((2 * 2 * 2 + 2) * 2 * 128 * 128 * 2)
    assert tp["all_reduce"] == pytest.approx(2 * (2 * tiny.norm_params_per_layer + tiny.d_model) * 2
                                             + 2 * 3 * 128 * 4)
    ep = collective_bytes(tiny, Layout(dp_shard=2, ep=2), 2, 128, reshard_after_forward=False)
    # 2 layers × (dispatch + combine) × (fwd + bwd) × top-2 copies of 128 tokens × 128 dims × 2 bytes
    assert ep["all_to_all"] == pytest.approx(2 * 2 * 2 * 2 * 128 * 128 * 2)


def test_estimate_flops_come_from_the_spec() -> None:
    g2 = PRESETS["grok-2"]
    cluster = Cluster.of(get_gpu("h100-sxm"), 1024)
    lay = Layout(dp_shard=128, tp=8, ep=8, recompute="full")
    c = estimate(g2, lay, cluster, 1024, 8192)
    assert c.model_flops_per_gpu == pytest.approx(g2.flops_per_token(8192) * 8192 * 1024 / 1024)
    assert c.hw_flops_per_gpu > c.model_flops_per_gpu  # full recompute redoes the forward
    assert 0.05 < c.mfu < 0.8
    assert c.step_time_s >= c.compute_s


def test_goodput_and_campaign_by_hand() -> None:
    g, src = expected_goodput(16_384, 30, 300)
    assert 0.85 < g < 0.95 and src
    assert expected_goodput(100_000, 30, 300)[0] < g
    cluster = Cluster.of(get_gpu("h100-sxm"), 1024)
    c = estimate(PRESETS["grok-1"], Layout(dp_shard=128, tp=8, ep=8, recompute="full"), cluster, 512, 8192)
    site = get_site()
    camp = campaign(c, get_gpu("h100-sxm"), 1024, 1e12, site)
    assert camp.peak_site_mw == pytest.approx(1024 * (700 + site.server_overhead_w_per_gpu) * site.pue / 1e6)
    assert camp.days == pytest.approx(camp.days_ideal / camp.goodput)
    assert camp.gpu_hours == pytest.approx(1024 * camp.days * 24)
    assert camp.lease_usd == pytest.approx(camp.gpu_hours * 2.99)


def test_full_100k_search_is_fast_and_finds_a_plan() -> None:
    cluster = Cluster.of(get_gpu("h100-sxm"), 100_000, "spectrum-x")
    t0 = time.perf_counter()
    res = search(PRESETS["grok-2"], cluster, 64 * 2**20, 8192, MODERN)
    assert time.perf_counter() - t0 < 1.0
    # The space is what the trainer runs (specs.layout.check_supported); it grows as the trainer learns layouts.
    assert res.ranked and res.evaluated > 100 and res.best.fits
    best = res.best
    check_supported(best.layout, PRESETS["grok-2"], 100_000, 8)
    assert all(_per_tok(best) <= _per_tok(c) for c in res.ranked)
    assert res.why and "winner" in res.why[0]


def _per_tok(c) -> float:
    return c.step_time_s / (c.global_batch_seqs * c.seq_len)


def test_validation_meets_the_bar() -> None:
    from gigafactory.plan.validate import validate_csv

    res = validate_csv(CSV)
    assert res["rows_not_fitting_memory"] == 0
    assert res["median_abs_rel_error"] <= 0.05
    assert res["max_abs_rel_error"] <= 0.15
    assert {"id", "reported", "predicted", "rel_error", "fits_memory", "stack"} <= set(res["rows"][0])
    moe = validate_csv(MOE_CSV)  # never fitted: the published layouts must fit; the error bar is below
    assert moe["rows_not_fitting_memory"] == 0


def test_moe_rows_meet_the_check_bar() -> None:
    from gigafactory.plan.validate import validate_csv

    assert validate_csv(MOE_CSV)["max_abs_rel_error"] <= 0.25


def test_moe_rows_meet_the_issue_bar() -> None:
    """Issue 11's bar for the MoE rows. Qwen3-30B-A3B (128 experts of width 768, 16 per GPU) is +19.8 % when the
    token permutation is charged as one write and one read of each routed copy: the re-sort by local expert
    around the all-to-all and the unpermute's probability gradient are what bring it within 15 %."""
    from gigafactory.plan.validate import validate_csv

    rows = validate_csv(CSV)["rows"] + validate_csv(MOE_CSV)["rows"]  # the bar is on the two sets together
    errs = [abs(r["rel_error"]) for r in rows if r["fits_memory"]]
    assert len(errs) == len(rows)
    assert statistics.median(errs) <= 0.05 and max(errs) <= 0.15


def test_permutation_bytes_by_hand() -> None:
    from gigafactory.plan.costmodel import MEGATRON_CORE_2024, permutation_bytes

    moe = PRESETS["tiny"]
    k, h = moe.top_k, moe.d_model
    copy, token = 2 * k * h, 2 * h  # bf16 bytes of a token's k routed copies, and of the token
    # Megatron-Core fused: permute (write copies, read token) + unpermute (read copies, write token); with an
    # all-to-all onto several local experts, sort and unsort read + write every copy; backward: the same passes
    # plus the probability gradient's read of the experts' outputs
    fwd, bwd = permutation_bytes(moe, MEGATRON_CORE_2024, ep=2, local_experts=2)
    assert fwd == pytest.approx((2 + 4) * copy + 2 * token)
    assert bwd == pytest.approx((3 + 4) * copy + 2 * token)
    assert permutation_bytes(moe, MEGATRON_CORE_2024, ep=1, local_experts=moe.n_experts)[0] == \
        pytest.approx(2 * copy + 2 * token)  # no all-to-all: nothing to re-sort
    assert permutation_bytes(moe, MEGATRON_CORE_2024, ep=8, local_experts=1)[0] == pytest.approx(2 * copy + 2 * token)
    # eager PyTorch (the trainer): gather 2, gate product 2, index_add 3 per copy, a zeroed output per token
    fwd_e, _ = permutation_bytes(moe, MODERN, ep=1, local_experts=moe.n_experts)
    assert fwd_e == pytest.approx(7 * copy + token)
    dense = moe.model_copy(update={"n_experts": 1, "top_k": 1})
    assert permutation_bytes(dense, MODERN, ep=1, local_experts=1) == (0.0, 0.0)



def test_capacity_factor_counts_every_padded_expert_slot() -> None:
    """With a MoE capacity factor f each rank dispatches n_experts · C rows, C = ⌈f · tokens · top_k / n_experts⌉
    (by hand here), instead of top_k per token: in the all-to-all, the permutation and the saved activations."""
    from gigafactory.plan.costmodel import layer_activation_bytes, permutation_bytes

    g = PRESETS["grok-1"]
    k, h, seq, f = g.top_k, g.d_model, 4096, 1.3
    lay = Layout(dp_shard=8, ep=8)
    cap = math.ceil(f * seq * k / g.n_experts)  # 1,332 slots per expert for 4,096 tokens
    rows = g.n_experts * cap / seq  # per token: 2.6 instead of top_k = 2
    dropless = collective_bytes(g, lay, 8, seq)["all_to_all"]
    assert collective_bytes(g, lay, 8, seq, capacity_factor=f)["all_to_all"] == pytest.approx(dropless * rows / k)
    (fwd, bwd), (fwd_c, bwd_c) = (permutation_bytes(g, MODERN, 8, 1, r) for r in (None, rows))
    assert fwd_c - fwd == pytest.approx(7 * 2 * h * (rows - k))  # eager: 7 touches per copy forward, 9 backward
    assert bwd_c - bwd == pytest.approx(9 * 2 * h * (rows - k))
    # eager PyTorch keeps, per routed row, its bf16 input and output (the gates' gradient) and 8 bytes per
    # expert-FFN element
    extra = layer_activation_bytes(g, lay, MODERN, seq, capacity_factor=f) - layer_activation_bytes(g, lay, MODERN, seq)
    assert extra == pytest.approx(seq * (rows - k) * (4 * h + 8 * g.expert_ffn))


MORE_CSV = CSV.with_name("more_runs.csv")  # "check" rows: predicted only, never used to choose a constant


@pytest.fixture(scope="module")
def more_runs() -> dict:
    from gigafactory.plan.validate import validate_csv

    return validate_csv(MORE_CSV)


def test_check_rows_physics_that_matters(more_runs) -> None:
    """Each piece of physics the second pass added is needed by some check rows: break it and this fails."""
    errs = {r["id"]: r["rel_error"] for r in more_runs["rows"]}
    fits = {r["id"]: r["fits_memory"] for r in more_runs["rows"]}
    titan = [k for k in errs if k.startswith("TITAN-")]
    # torchtitan's FSDP2 shards over every data-parallel rank (replicating Llama 3 8B on 64 A100s does not fit)
    assert sum(fits[k] for k in titan) >= 3
    # eager PyTorch norms / RoPE / SwiGLU move their bytes op by op: without that the A100 rows are 12-30 % fast
    assert max(abs(errs[k]) for k in titan if fits[k]) <= 0.10
    # Llama 3 interleaved its pipeline without saying how finely: ~2 layers per virtual stage, not one chunk
    llama = [k for k in errs if k.startswith("LLAMA3-405B")]
    assert len(llama) == 3 and max(abs(errs[k]) for k in llama) <= 0.20
    lay = next(r["layout"] for r in more_runs["rows"] if r["id"] == llama[0])
    assert lay["pp_schedule"] == "interleaved" and lay["pp_virtual"] == 4  # 126 layers / 16 ranks ≈ 8 → 4 × 2


def test_default_virtual_stages() -> None:
    from gigafactory.plan.costmodel import default_virtual_stages

    assert default_virtual_stages(80, 8) == 5  # NeMo's Llama 3 70B recipe: pp 8, vp 5
    assert default_virtual_stages(96, 8) == 6  # GPT-3 175B: pp 8, vp 6
    assert default_virtual_stages(4, 4) == 2  # one layer per rank still needs two chunks to interleave


def test_check_rows_meet_the_held_out_bar(more_runs) -> None:
    assert more_runs["median_abs_rel_error"] <= 0.05 and more_runs["max_abs_rel_error"] <= 0.25


def test_megatron_core_table_pipelines_interleave(more_runs) -> None:
    """The Megatron-LM README overlaps pipeline communication in its H100 table; Megatron-LM only does that under
    the interleaved schedule (arguments.py turns overlap_p2p_comm off without virtual stages)."""
    from gigafactory.plan.validate import validate_csv

    res = validate_csv(CSV)["rows"] + more_runs["rows"]
    piped = [r for r in res if r["id"].startswith("MCORE-H100-") and r["layout"]["pp"] > 1]
    assert len(piped) == 5 and all(r["layout"]["pp_virtual"] > 1 for r in piped)
    assert max(abs(r["rel_error"]) for r in piped) <= 0.15


def test_eager_elementwise_costs_more_than_fused() -> None:
    g = PRESETS["tiny"]
    lay = Layout(dp_shard=8)
    cl = Cluster.of(get_gpu("a100-80g"), 8)
    eager = estimate(g, lay, cl, 8, 2048, MODERN, with_bytes=False)
    fused = estimate(g, lay, cl, 8, 2048, replace(MODERN, fused_elementwise=True), with_bytes=False)
    assert eager.compute_s > fused.compute_s


def test_rows_that_do_not_fit_are_counted_apart(tmp_path) -> None:
    from gigafactory.plan.validate import validate_csv

    lines = CSV.read_text().splitlines()
    header, row = lines[0], lines[1]  # 1.7B on 32 A100s
    cols = header.split(",")
    big = row.split(",")
    # the 1008B model's shape on 8 GPUs with plain data parallelism cannot hold its weights
    for col, value in {"id": "TOO-BIG", "layers": "128", "d_model": "25600", "n_heads": "160",
                       "n_kv_heads": "160", "ffn_hidden": "102400", "n_gpus": "8", "dp": "8",
                       "global_batch_seqs": "8", "micro_batch": "1"}.items():
        big[cols.index(col)] = value
    f = tmp_path / "mixed.csv"
    f.write_text("\n".join([header, row, ",".join(big)]) + "\n")
    res = validate_csv(f)
    assert res["rows_fitting_memory"] == 1 and res["rows_not_fitting_memory"] == 1
    flags = {r["id"]: r["fits_memory"] for r in res["rows"]}
    assert flags == {"N21-T1-1.7B": True, "TOO-BIG": False}
    only = validate_csv(CSV.parent / "public_runs.csv")["rows"][0]
    assert res["median_abs_rel_error"] == pytest.approx(abs(only["rel_error"]))  # the misfit is not averaged in


def test_collective_latency_per_call_by_level() -> None:
    h100 = get_gpu("h100-sxm")
    cl = Cluster.of(h100, 100_000, "spectrum-x")
    fab = cl.fabric
    tiny = 8.0  # bytes: the alpha terms dominate
    # all-gather is a ring: (8-1) NVLink steps + (nodes-1) network steps at the level the group spans
    got = collective_time("all_gather", tiny, 64, 8, cl)  # 8 nodes, 64 GPUs: one leaf
    assert got == pytest.approx(7 * fab.alpha_nvlink_s + 7 * fab.latency_s, rel=1e-3)
    big = collective_time("all_gather", tiny, 8 * 4096, 8, cl)  # 32,768 GPUs: beyond one pod, the core tier
    assert big == pytest.approx(7 * fab.alpha_nvlink_s + 4095 * fab.alpha_core_s, rel=1e-3)
    # all-reduce: NCCL's double binary tree wins on latency, 2·log2(nodes) steps
    ar = collective_time("all_reduce", tiny, 8 * 4096, 8, cl)
    assert ar == pytest.approx(14 * fab.alpha_nvlink_s + 2 * 12 * fab.alpha_core_s, rel=1e-3)
    # ... but a large message on four nodes stays on the ring (the tree has 92 % of its bandwidth)
    nv, nic = h100.nvlink_bw * h100.nvlink_eff, fab.nic_bw * fab.efficiency
    big_ar = collective_time("all_reduce", 8e9, 32, 8, cl)
    ring = 2 * 7 / 8 * 8e9 / nv + 14 * fab.alpha_nvlink_s + 2 * 3 / 4 * 1e9 / nic + 6 * fab.latency_s
    assert big_ar == pytest.approx(ring, rel=1e-6)


def test_gemm_efficiency_by_shape() -> None:
    sms = 132
    tiles = 32 * 64  # 8192² output in 256×128 tiles, run in waves of 132
    want = 8192 / (8192 + 64) * tiles / (math.ceil(tiles / sms) * sms)
    assert gemm_shape_efficiency(8192, 8192, 8192, sms) == pytest.approx(want, rel=1e-6)
    # one more 256×128 tile than the SMs: two waves, the second nearly empty; smaller tiles do better
    m, n = 256 * 12, 128 * 11 + 1
    assert gemm_shape_efficiency(m, n, 4096, sms) < 0.8 * gemm_shape_efficiency(256 * 12, 128 * 11, 4096, sms)
    assert gemm_shape_efficiency(16, 4096, 4096, sms) < 0.1  # skinny: most of each tile is padding


def test_fsdp_latency_is_charged_per_layer_and_micro_batch() -> None:
    g2 = PRESETS["grok-2"]
    cl = Cluster.of(get_gpu("h100-sxm"), 100_000, "spectrum-x")
    huge = Layout(dp_shard=12_500, tp=4, ep=8, cp=2)
    c = estimate(g2, huge, cl, 12_500, 8192, with_bytes=False)
    # every layer's gather is a ring over 25,000 shard ranks (4 per node): 6,249 network steps at core alpha
    per_gather = 6_249 * cl.fabric.alpha_core_s
    assert c.comm_s["fsdp_gather"] >= c.n_micro * 2 * g2.n_layers * per_gather
    hsdp = Layout(dp_replicate=50, dp_shard=250, tp=4, ep=8, cp=2)
    h = estimate(g2, hsdp, cl, 12_500, 8192, with_bytes=False)
    assert h.step_time_s < c.step_time_s and h.mfu > 1.5 * c.mfu


def test_malformed_csv_row_names_id_and_column(tmp_path) -> None:
    from gigafactory.plan.validate import validate_csv

    lines = CSV.read_text().splitlines()
    header, row = lines[0], lines[1]
    cols = header.split(",")
    i = cols.index("tp")
    bad = row.split(",")
    # the source column is quoted in some rows; the first data row is not
    bad[i] = "eight"
    f = tmp_path / "bad.csv"
    f.write_text(header + "\n" + ",".join(bad) + "\n")
    with pytest.raises(UserError, match=r"row N21-T1-1.7B: column tp"):
        validate_csv(f)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=60)


def _main(capsys, monkeypatch, *args: str) -> tuple[int, str, str]:  # noqa: ANN001
    """`gigafactory ARGS` through gigafactory.cli.main in this process (no start-up cost): (exit code, out, err)."""
    from gigafactory.cli import main

    monkeypatch.setattr(sys, "argv", ["gigafactory", *args])
    capsys.readouterr()
    try:
        main()
        code = 0
    except SystemExit as ex:
        code = int(ex.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_errors_are_one_line(capsys, monkeypatch) -> None:  # noqa: ANN001
    r = _cli("plan", "--gpus", "-8")  # once end to end, in a fresh process
    assert r.returncode == 2 and r.stderr.startswith("error:") and "--gpus" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "╭" not in r.stderr
    for args, msg in [
        (("plan", "--gpus", "0"), "--gpus"),
        (("plan", "--seq-len", "0"), "--seq-len"),
        (("plan", "--gpu", "v100"), "unknown GPU"),
        (("plan", "--model", "grok-9"), "unknown model"),
        (("plan", "--gpus", "64", "--layout", "dp_shard=8,tp=4"), "multiply"),
        (("plan", "--model", "grok-2", "--gpus", "8", "--gpu", "a100-40g"), "smallest|at least|≥"),
        (("plan", "--gpus", "8", "--power", "1MW"), "both choose"),
        (("plan", "--gpus", "1000000"), "global batch of at least"),
        (("plan", "--checkpoint-s", "-1"), "--checkpoint-s"),
    ]:
        code, _, err = _main(capsys, monkeypatch, *args)
        assert code == 2, (args, err)
        assert any(m in err for m in msg.split("|")), err
        assert len(err.strip().splitlines()) == 1 and err.startswith("error:"), err
        assert "Traceback" not in err and "╭" not in err


def test_cli_plan_json_report_and_launch_files(tmp_path, capsys, monkeypatch) -> None:  # noqa: ANN001
    from gigafactory.plan import plan_report

    rep = tmp_path / "plan.html"
    # The report's sweep searches every layout the trainer runs at each fleet size (~2 s each; its 18 default
    # sizes, which test_report_curve_points_and_explanation checks, took 35 s here): 3 log-spaced sizes and the
    # asked one go through the same search, curve and rendering.
    real = plan_report.sweep_counts
    swept: list[int] = []

    def three_sizes(extra: int | None = None) -> list[int]:
        swept.extend(real(points=3, extra=extra))
        return swept

    monkeypatch.setattr(plan_report, "sweep_counts", three_sizes)
    code, stdout, err = _main(capsys, monkeypatch, "plan", "--gpus", "20000", "--json", "--report", str(rep),
                              "--export", str(tmp_path / "launch"))
    assert code == 0, err
    assert swept[0] == 1_000 and 20_000 in swept and len(swept) == 4, swept
    out = json.loads(stdout)
    assert out["n_gpus"] == 20000 and 0 < out["best"]["mfu"] < 1
    assert out["campaign"]["peak_site_mw"] > 10 and out["campaign"]["lease_usd"] > 0
    text = rep.read_text()
    assert "Plotly" in text and '<script src="http' not in text and len(text) > 1_000_000  # plotly.js inline
    assert f'"x":[{",".join(map(str, swept))}]' in text  # every swept size is a point of the curve
    plan = json.loads((tmp_path / "launch" / "plan.json").read_text())
    assert Layout(**plan["layout"]).world_size == 20000
    assert "#SBATCH --nodes=2500" in (tmp_path / "launch" / "train.sbatch").read_text()
    assert "kind: PyTorchJob" in (tmp_path / "launch" / "pytorchjob.yaml").read_text()


def test_plan_cli_moe_capacity_factor_reaches_the_bytes_and_the_training_plan(capsys, monkeypatch, tmp_path) -> None:  # noqa: ANN001
    """`plan --moe-capacity-factor f` costs the padded dispatch and exports f for `train --plan` to use."""
    from gigafactory.train.distributed import read_plan

    args = ("plan", "--model", "grok-1", "--gpus", "512", "--layout", "dp_shard=512,ep=8,recompute=full", "--json")
    code, dropless, err = _main(capsys, monkeypatch, *args)
    assert code == 0, err
    code, padded, err = _main(capsys, monkeypatch, *args, "--moe-capacity-factor", "2", "--export", str(tmp_path))
    assert code == 0, err
    a2a = [json.loads(o)["best"]["collective_bytes_per_rank_per_step"]["all_to_all"] for o in (dropless, padded)]
    assert a2a[1] == pytest.approx(2 * a2a[0])  # C = 2·tokens·top_k/n_experts exactly at these sizes
    assert read_plan(tmp_path / "plan.json")["moe_capacity_factor"] == 2
    code, _, err = _main(capsys, monkeypatch, *args, "--moe-capacity-factor", "0")
    assert code != 0 and "--moe-capacity-factor" in err and len(err.strip().splitlines()) == 1


def test_validate_plan_cli_json() -> None:
    r = _cli("validate-plan", str(CSV), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert {"rows", "median_abs_rel_error", "max_abs_rel_error"} <= set(out)
    assert len(out["rows"]) == len(CSV.read_text().strip().splitlines()) - 1


def test_validate_plan_takes_several_files() -> None:
    r = _cli("validate-plan", str(CSV), str(MORE_CSV), "--json")
    assert r.returncode == 0, r.stderr
    files = json.loads(r.stdout)["files"]
    assert [f["file"] for f in files] == [str(CSV), str(MORE_CSV)]
    assert [len(f["rows"]) for f in files] == [len(p.read_text().strip().splitlines()) - 1 for p in (CSV, MORE_CSV)]
    assert files[0]["max_abs_rel_error"] <= 0.15  # the fit rows keep their bar
    bad = _cli("validate-plan", str(CSV), "/nonexistent/runs.csv")
    assert bad.returncode != 0 and "runs.csv not found" in bad.stderr and "Traceback" not in bad.stderr


def test_plan_does_not_import_torch() -> None:
    """A whole plain `gigafactory plan`, in one process: none of the heavy libraries other commands use is
    imported on its way (torch for training, fastapi/httpx for serving, plotly for the report)."""
    heavy = ("torch", "fastapi", "httpx", "plotly", "pandas")
    code = ("import sys\nfrom gigafactory import cli\nsys.argv = ['gigafactory', 'plan']\ntry:\n    cli.main()\n"
            "except SystemExit:\n    pass\n"
            f"print('HEAVY', [m for m in {heavy!r} if m in sys.modules], file=sys.stderr)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "MFU" in r.stdout, r.stderr
    assert "HEAVY []" in r.stderr, r.stderr


def test_reverse_limits_by_hand() -> None:
    from gigafactory.plan.sizing import max_gpus, parse_duration, parse_money, parse_power

    h100, site = get_gpu("h100-sxm"), get_site()
    assert parse_power("100MW") == 1e8 and parse_money("$6B", "--budget") == 6e9 and parse_duration("90d") == 90 * 86400
    per_w = (h100.tdp_w + site.server_overhead_w_per_gpu) * site.pue
    assert max_gpus(h100, site, power_w=1e8) == math.floor(1e8 / per_w)
    assert max_gpus(h100, site, budget_usd=6e9) == math.floor(6e9 / (h100.price_usd * site.system_cost_factor))
    assert max_gpus(h100, site, lease_usd_month=3e8) == math.floor(3e8 / (h100.lease_usd_per_h * 730))
    assert max_gpus(h100, site, power_w=1e9, budget_usd=1e6) == math.floor(1e6 / (h100.price_usd * 1.5))
    for bad in ("-5MW", "0", "100XW", "lots"):
        with pytest.raises(UserError, match="--power"):
            parse_power(bad)
    with pytest.raises(UserError, match="--deadline"):
        parse_duration("-3d")


def test_largest_plannable_and_deadline_search() -> None:
    from gigafactory.plan.search import SearchResult
    from gigafactory.plan.sizing import largest_plannable, smallest_for_deadline

    calls: list[int] = []

    def run(n: int) -> SearchResult:  # plans up to 40,000 GPUs (say, the batch cap), not above
        calls.append(n)
        return SearchResult(["plan"] if n <= 40_000 else [], 1, 0, 0.0, None, "time")  # type: ignore[list-item]

    n, _ = largest_plannable(62_893, run, lambda n, r: "never")
    assert n == 40_000 // 256 * 256 and len(calls) < 25
    with pytest.raises(UserError, match="no layout fits"):
        largest_plannable(62_893, lambda n: SearchResult([], 0, 0, 0.0, None, "time"), lambda n, r: "because")
    n, days = smallest_for_deadline(90 * 86400, lambda n: 1e6 / n)  # days fall as 1/n
    assert n == math.ceil(1e6 / 90 / 256) * 256 and days <= 90
    assert smallest_for_deadline(90 * 86400, lambda n: 100 / n) == (8, 12.5)  # one node is enough


def test_hsdp_shard_groups_are_not_only_powers_of_two() -> None:
    from gigafactory.plan.search import _shard_options, enumerate_layouts

    opts = _shard_options(12_500, 2)
    assert {1, 20, 25, 625, 12_500} <= set(opts) and all(12_500 % d == 0 for d in opts)
    cl = Cluster.of(get_gpu("h100-sxm"), 100_000, "spectrum-x")
    shards = {lay.dp_shard for lay in enumerate_layouts(PRESETS["grok-2"], cl, 8192)}
    assert any(d & (d - 1) for d in shards)  # the search itself tries non-power-of-two groups


def test_cli_reverse_question_json(capsys, monkeypatch) -> None:  # noqa: ANN001
    code, out, err = _main(capsys, monkeypatch, "plan", "--power", "100MW", "--json")
    assert code == 0, err
    plan = json.loads(out)
    sz = plan["sizing"]
    assert sz["max_gpus_allowed"] == 62_893 and plan["n_gpus"] == sz["chosen_gpus"] <= 62_893
    assert sz["site_power_mw"] <= 100 and plan["campaign"]["peak_site_mw"] == pytest.approx(sz["site_power_mw"])


def test_report_curve_points_and_explanation() -> None:
    from gigafactory.plan.plan_report import LOSS_NAMES, explain_curve, sweep_counts, sweep_point

    counts = sweep_counts(extra=20_000)
    assert counts[0] == 1_000 and counts[-1] in (99_840, 100_096) and 20_000 in counts
    assert all(n % 256 == 0 for n in counts if n >= 1024 and n != 20_000)
    ratios = [b / a for a, b in zip(counts, counts[1:], strict=False)]
    assert max(ratios) < 1.5  # log-spaced, no gaps
    g2 = PRESETS["grok-2"]
    cl = Cluster.of(get_gpu("h100-sxm"), 100_000, "spectrum-x")
    slow = sweep_point(100_000, estimate(g2, Layout(dp_shard=12_500, tp=8), cl, 12_500, 8192, with_bytes=False), 9.0)
    assert sum(slow["fractions"].values()) == pytest.approx(1.0)
    fast = dict(slow, n_gpus=1_000, fractions={"compute": 0.95, "exposed_tp": 0.05})
    lines = explain_curve([fast, slow])
    assert lines[0].startswith("1,000 GPUs: compute-bound")
    worst = max((k for k in slow["fractions"] if k != "compute"), key=slow["fractions"].get)
    assert "100,000 GPUs: limited by" in lines[1] and LOSS_NAMES[worst] in lines[1]


def test_selective_recompute_with_flash_attention_drops_ffn_activations() -> None:
    from gigafactory.plan.costmodel import layer_activation_bytes

    g2 = PRESETS["grok-2"]
    lay = Layout(dp_shard=8, ep=8)
    sel_lay = lay.model_copy(update={"recompute": "selective"})
    fused = replace(MODERN, fused_elementwise=True)  # fused norms/activations: recomputing them is nearly free
    # Megatron-Core's moe_act + layernorm recompute (fused kernels, which keep no activation output anyway): the
    # product (2f per routed copy and per dense FFN) and the norm output feeding QKV (2h) are rebuilt in backward
    dropped = 8192 * (2 * (g2.top_k * g2.expert_ffn + g2.dense_ffn) + 2 * g2.d_model)
    none, sel = (layer_activation_bytes(g2, x, fused, 8192) for x in (lay, sel_lay))
    assert none - sel == pytest.approx(dropped)
    # eager (torch.utils.checkpoint, the trainer): only gelu's output (2f) goes; the product and the norm output
    # stay as the next GEMM's saved input
    none, sel = (layer_activation_bytes(g2, x, MODERN, 8192) for x in (lay, sel_lay))
    assert none - sel == pytest.approx(8192 * 2 * (g2.top_k * g2.expert_ffn + g2.dense_ffn))
    cl = Cluster.of(get_gpu("h100-sxm"), 64)
    t_none = estimate(g2, lay, cl, 64, 8192, fused, with_bytes=False)
    t_sel = estimate(g2, lay.model_copy(update={"recompute": "selective"}), cl, 64, 8192, fused, with_bytes=False)
    t_full = estimate(g2, lay.model_copy(update={"recompute": "full"}), cl, 64, 8192, fused, with_bytes=False)
    assert t_none.step_time_s < t_sel.step_time_s < 1.02 * t_none.step_time_s < t_full.step_time_s
    # eager PyTorch redoes its fp32 norms op by op: selective costs more there, still far less than full
    e_none = estimate(g2, lay, cl, 64, 8192, with_bytes=False)
    e_sel = estimate(g2, lay.model_copy(update={"recompute": "selective"}), cl, 64, 8192, with_bytes=False)
    assert t_sel.step_time_s / t_none.step_time_s < e_sel.step_time_s / e_none.step_time_s < 1.1


def test_activation_bytes_fused_and_fp8_by_hand() -> None:
    from gigafactory.plan.costmodel import layer_activation_bytes

    g = PRESETS["grok-2"]
    lay = Layout(dp_shard=8, ep=8)
    s = 4096
    fused = replace(MODERN, fused_elementwise=True)
    ffn = g.top_k * g.expert_ffn + g.dense_ffn
    # eager SwiGLU also keeps silu(gate) for the product's backward: 2 bytes per gated element
    assert layer_activation_bytes(g, lay, MODERN, s) - layer_activation_bytes(g, lay, fused, s) == pytest.approx(
        s * 2 * ffn)
    # FP8 (Transformer Engine) keeps each GEMM input in 1 byte: QKV, output projection, up and down projections
    q = g.n_heads * g.head_dim
    saved = s * (g.d_model + q + g.top_k * g.d_model + ffn)
    assert layer_activation_bytes(g, lay, fused, s) - layer_activation_bytes(g, lay, fused, s, fp8=True) == \
        pytest.approx(saved)


def test_fp8_gemms_by_hand() -> None:
    from gigafactory.plan.costmodel import _gemm_time

    h100 = get_gpu("h100-sxm")
    m = n = k = 8192
    shape = gemm_shape_efficiency(m, n, k, h100.sms)
    bf16 = 2 * m * n * k / (h100.matmul_eff * h100.sustained_eff * h100.bf16_dense_flops * shape)
    fp8 = 2 * m * n * k / (h100.fp8_matmul_eff * h100.sustained_eff * h100.fp8_dense_flops * shape)
    cast = 3 * m * k / (h100.hbm_eff * h100.hbm_bw)  # bf16 activation read, fp8 written
    assert _gemm_time(m, n, k, h100) == pytest.approx(bf16)
    assert _gemm_time(m, n, k, h100, fp8=True) == pytest.approx(fp8 + cast)
    a100 = get_gpu("a100-80g")  # no FP8 tensor cores: the bf16 path
    assert _gemm_time(m, n, k, a100, fp8=True) == pytest.approx(_gemm_time(m, n, k, a100))
    g2, cl = PRESETS["grok-2"], Cluster.of(h100, 64)
    lay = Layout(dp_shard=8, ep=8, recompute="full")
    slow, fast = (estimate(g2, lay, cl, 64, 8192, with_bytes=False, fp8=f) for f in (False, True))
    assert 1.2 < slow.compute_s / fast.compute_s < 2.0  # attention and elementwise stay bf16


def test_validation_stack_spellings_and_throughput_metric() -> None:
    import csv

    from gigafactory.plan.validate import predict_row

    row = next(csv.DictReader(CSV.open()))
    row.update(stack="Megatron-LM", metric="tokens_per_s_per_gpu", value="1000")
    r = predict_row(row)
    assert r.stack == "megatron-2021"
    assert r.predicted == pytest.approx(r.cost.tokens_per_s / int(row["n_gpus"]))
    row["stack"] = "megatron_deepspeed"
    assert predict_row(row).stack == "deepspeed"
    row["stack"] = "jax"
    with pytest.raises(UserError, match="column stack='jax'"):
        predict_row(row)


def test_pipeline_memory_is_the_busier_end_not_first_plus_logits() -> None:
    """The first stage holds p micro-batches of activations, the last one micro-batch plus the logits: the
    busiest GPU is one of the two, so a larger vocabulary must not add logits to a first-stage-bound peak."""
    g2 = PRESETS["grok-2"]
    cl = Cluster.of(get_gpu("h100"), 512)
    lay = Layout(dp_shard=8, tp=8, pp=8)

    def act_peak(vocab: int) -> float:
        c = estimate(g2.model_copy(update={"vocab_size": vocab}), lay, cl, 512, 8192, MODERN, with_bytes=False)
        return c.memory["activations"] + c.memory["logits"]

    assert act_peak(131072) == act_peak(2 * 131072)  # first stage dominates: logits live elsewhere
    one = Layout(dp_shard=64, tp=8)
    small, big = (estimate(g2.model_copy(update={"vocab_size": v}), one, cl, 512, 8192, MODERN, with_bytes=False)
                  for v in (131072, 8 * 131072))
    # one stage holds both, at different moments (the loss's backward, a layer's backward): the busier counts
    assert big.memory["logits"] > 0 and big.memory_total > small.memory_total
    assert small.memory["logits"] in (0.0, big.memory["logits"] / 8)
    if small.memory["logits"] == 0.0:  # a layer's backward was the busier moment: FSDP holds more layers then
        assert small.memory["gathered_weights"] > big.memory["gathered_weights"]


def test_last_stage_in_flight_follows_megatron_warmup() -> None:
    # 1F1B: the last stage runs each backward right after its forward; interleaved: (v−1)·p + 1 chunks of 1/v
    assert in_flight_last_stage(Layout(pp=8), 64) == 1.0
    assert in_flight_last_stage(Layout(pp=8, pp_schedule="interleaved", pp_virtual=2), 64) == (8 + 1) / 2
    assert in_flight_microbatches(Layout(pp=8, pp_schedule="interleaved", pp_virtual=2), 64) == 8 + 7 / 2


def test_loss_traffic_is_charged_per_logit_at_the_stacks_bytes() -> None:
    """Megatron's cross entropy moves 52 bytes per logit element (op by op, forward + backward); a stack that
    moved 36 would save exactly the difference over every logit of the step."""
    from gigafactory.plan.costmodel import MEGATRON_CORE_2024

    g2 = PRESETS["grok-2"]
    gpu = get_gpu("h100")
    cl = Cluster.of(gpu, 64)
    lay = Layout(dp_shard=8, tp=8)
    mc = estimate(g2, lay, cl, 16, 4096, MEGATRON_CORE_2024, with_bytes=False)
    lean = estimate(g2, lay, cl, 16, 4096, replace(MEGATRON_CORE_2024, loss_bytes=36), with_bytes=False)
    logits = mc.n_micro * lay.micro_batch * 4096 * g2.vocab_size / lay.tp
    assert MEGATRON_CORE_2024.loss_bytes == 52
    assert mc.compute_s - lean.compute_s == pytest.approx(logits * 16 / (gpu.hbm_eff * gpu.hbm_bw))


def test_deepspeed_train_schedule_blocks_on_every_transfer() -> None:
    """DeepSpeed's TrainSchedule: every stage runs each micro-batch forward then backward, every send meets a
    receive on the neighbour; with free transfers it takes 1F1B's (m + p − 1)(f + b), and blocking send/recv
    puts more than the two transfers per micro-batch an unblocked 1F1B exposes on the critical path."""
    from gigafactory.plan.costmodel import DEEPSPEED, blocking_pipeline_time, deepspeed_train_schedule

    p, m = 8, 32
    plans = [deepspeed_train_schedule(p, m, s) for s in range(p)]
    for s, ops in enumerate(plans):
        assert [k for kind, k in ops if kind == "F"] == list(range(m)) == [k for kind, k in ops if kind == "B"]
        assert all(ops.index(("F", k)) < ops.index(("B", k)) for k in range(m))
        if s + 1 < p:
            assert sorted(k for kind, k in ops if kind == "send_act") == sorted(
                k for kind, k in plans[s + 1] if kind == "recv_act") == list(range(m))
    assert blocking_pipeline_time(p, m, 1.0, 2.0, 0.0) == (m + p - 1) * 3.0
    assert blocking_pipeline_time(p, m, 1.0, 2.0, 0.1) - (m + p - 1) * 3.0 > 2 * m * 0.1
    # two stages, two micro-batches, f = 1, b = 2, transfer x, by hand: stage 0 sends micro-batch 1's activation
    # only when stage 1 reaches its receive, after its own backward of micro-batch 0 (4 + x), so the chain is
    # F0 x F0' B0' x x F1' B1' x B1 = 9 + 4x (1F1B with free transfers: 9)
    assert blocking_pipeline_time(2, 2, 1.0, 2.0, 0.1) == pytest.approx(9.4)
    g2 = PRESETS["grok-2"].model_copy(update={"n_experts": 1, "top_k": 1})
    lay = Layout(dp_shard=2, tp=8, pp=4)
    cl = Cluster.of(get_gpu("a100-80g"), 64)
    ds = estimate(g2, lay, cl, 64, 2048, DEEPSPEED, with_bytes=False)
    free = estimate(g2, lay, cl, 64, 2048, replace(DEEPSPEED, blocking_pipeline=False), with_bytes=False)
    assert ds.step_time_s > free.step_time_s
