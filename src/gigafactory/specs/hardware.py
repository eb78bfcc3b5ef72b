"""Hardware, fabric and site catalog for the planner (and the trainer's MFU). No torch import.

Every number cites its public source next to it. Everything can be overridden from a TOML or JSON file with
``load_catalog(path)``: tables ``[gpu.<name>]``, ``[fabric.<name>]`` and ``[site]`` whose keys replace the
built-in fields (a new GPU name adds an entry and must give every field of ``GPUSpec``).

Efficiency constants (``matmul_eff``, ``hbm_eff``, ``nvlink_eff``, ``attn_eff``) are one set per GPU generation,
taken from published microbenchmarks (cited), never fitted to a training run.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gigafactory.errors import UserError

TB = 1e12
GB = 1e9
MIB = 1024**2


class GPUSpec(BaseModel):
    """One accelerator model. Rates are per GPU, bandwidths in bytes/s, one direction unless said."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    generation: str = Field(description="ampere, hopper or blackwell: selects the efficiency constants")
    bf16_dense_flops: float = Field(gt=0, description="dense BF16 tensor-core peak, FLOP/s")
    fp8_dense_flops: float | None = Field(None, description="dense FP8 peak, FLOP/s (None: no FP8 tensor cores)")
    hbm_bytes: float = Field(gt=0)
    hbm_bw: float = Field(gt=0, description="HBM bandwidth, bytes/s")
    nvlink_bw: float = Field(gt=0, description="NVLink bandwidth per GPU per direction, bytes/s")
    nvlink_domain: int = Field(gt=0, description="GPUs sharing one NVLink/NVSwitch domain (a node)")
    nic_bw: float = Field(gt=0, description="scale-out NIC bandwidth per GPU per direction, bytes/s")
    tdp_w: float = Field(gt=0)
    price_usd: float = Field(gt=0, description="purchase price of one GPU (street, as reported)")
    lease_usd_per_h: float = Field(gt=0, description="cloud lease price per GPU-hour")
    matmul_eff: float = Field(gt=0, le=1, description="max achievable BF16 matmul / peak (MAMF)")
    attn_eff: float = Field(gt=0, le=1, description="flash-attention kernel FLOP/s / peak (fwd+bwd)")
    sustained_eff: float = Field(gt=0, le=1, description="sustained in-training kernel rate / isolated benchmark")
    hbm_eff: float = Field(gt=0, le=1, description="achievable / nominal HBM bandwidth")
    nvlink_eff: float = Field(gt=0, le=1, description="NCCL bus bandwidth / nominal NVLink bandwidth")
    sms: int = Field(132, gt=0, description="streaming multiprocessors (GEMM wave quantization)")
    fp8_matmul_eff: float = Field(0.7, gt=0, le=1, description="achievable FP8 matmul / FP8 peak")
    device_names: tuple[str, ...] = Field((), description="substrings of torch.cuda.get_device_name()")


class FabricSpec(BaseModel):
    """A scale-out network in levels: the NVLink domain (a node), a leaf (one scalable unit of rail-optimised leaf
    switches), a pod (a two-tier fat tree) and the core above pods. ``efficiency`` = achievable collective bus
    bandwidth / NIC line rate. ``alpha_*`` = latency of one step of a collective (one message between
    neighbours) whose group spans that level; ``core_oversubscription`` divides the bandwidth between pods."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    nic_gbps: float = Field(gt=0, description="line rate per GPU, Gb/s")
    efficiency: float = Field(gt=0, le=1)
    latency_s: float = Field(gt=0, description="alpha of one collective step inside a leaf (legacy name)")
    alpha_nvlink_s: float = Field(2e-6, gt=0, description="alpha of one collective step over NVLink")
    alpha_spine_s: float = Field(7e-6, gt=0, description="alpha of one step across the spine (inside a pod)")
    alpha_core_s: float = Field(10e-6, gt=0, description="alpha of one step across pods")
    leaf_gpus: int = Field(256, gt=0, description="GPUs under one set of leaf switches (scalable unit)")
    pod_gpus: int = Field(16_384, gt=0, description="GPUs in one non-blocking two-tier fat tree")
    core_oversubscription: float = Field(1.0, ge=1, description="bandwidth taper between pods")

    @property
    def nic_bw(self) -> float:
        return self.nic_gbps * 1e9 / 8


class SiteSpec(BaseModel):
    """Power and money around the GPUs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    server_overhead_w_per_gpu: float = Field(ge=0, description="CPUs, NICs, fans, switches per GPU at peak")
    pue: float = Field(ge=1)
    electricity_usd_per_kwh: float = Field(ge=0)
    avg_power_fraction: float = Field(gt=0, le=1, description="average draw / peak draw during training")
    system_cost_factor: float = Field(ge=1, description="all-in capex (servers, network, storage) / GPU price")


# ---- GPUs ------------------------------------------------------------------------------------------------
# Peaks, memory, NVLink and TDP: NVIDIA datasheets (A100: "NVIDIA A100 Tensor Core GPU" datasheet, SXM column;
# H100/H800: "NVIDIA H100 Tensor Core GPU" datasheet, SXM column, dense = half the "with sparsity" figure;
# H200: "NVIDIA H200 Tensor Core GPU" datasheet; B200: "NVIDIA DGX B200" / HGX B200 datasheet, per GPU = system/8).
# NVLink figures in datasheets are bidirectional; we store one direction (half).
# HBM capacity: what nvidia-smi reports as total memory (MiB), the bytes the CUDA allocator can see; the datasheets'
# "80GB" is binary (A100 80GB: 81920 MiB; H100/H800 80GB HBM3: 81559 MiB; H200: 143771 MiB; B200: 183359 MiB;
# A100 40GB: 40960 MiB; nvidia-smi output quoted in many public issue threads). Counting 80·10⁹ bytes lost 7 %.
# NICs: DGX A100 has 8 × 200 Gb/s HDR (DGX A100 user guide), DGX H100/H200 8 × 400 Gb/s ConnectX-7 (DGX H100
# user guide), DGX B200 8 × 400 Gb/s ConnectX-7 (DGX B200 datasheet).
# matmul_eff: Stas Bekman, ml-engineering, compute/accelerator/README.md "Maximum Achievable Matmul FLOPS
# comparison table": A100 SXM 267.9/312 = 85.9 %, H100 SXM 792.1/989 = 80.1 % (H200 measured 794.5/989 =
# 80.3 %), B200 1745/2250 = 77.6 %.
# attn_eff: FlashAttention-2 (Dao 2023, arXiv:2307.08691): fwd+bwd up to ~70 % of peak on A100 (225 TFLOP/s of
# 312 in end-to-end GPT training is the top; kernel fwd+bwd about 190-200 at head dim 128) -> 0.62;
# FlashAttention-3 (Shah et al. 2024, arXiv:2407.08608): BF16 fwd up to 740 TFLOP/s (75 %), bwd ~ 550-600 ->
# fwd+bwd ~ 0.60 on H100. Blackwell: no published FA kernel figure we trust yet; Hopper's value is reused.
# hbm_eff: STREAM-like copy kernels reach ~ 85-90 % of nominal HBM bandwidth on A100/H100 (NVIDIA
# "CUDA C++ Best Practices", and the ml-engineering memory table); we use 0.85.
# nvlink_eff: nccl-tests all_reduce_perf bus bandwidth inside one node: A100 NVLink3 ~ 230 GB/s of 300 (0.77),
# H100 NVLink4 ~ 360-370 GB/s of 450 (0.80) (NVIDIA DGX H100 NCCL results quoted in the ml-engineering network
# chapter). Blackwell: Hopper's ratio.
# Prices: street prices reported in the press (A100 80GB ~ $15k, H100 SXM ~ $25-30k, H200 ~ $30-35k, B200
# ~ $35-40k: e.g. CNBC/Reuters reporting on Nvidia pricing 2023-2024); lease: typical 2024-2025 on-demand
# neocloud list prices (Lambda: A100 80GB $1.29-1.79, H100 SXM $2.99, B200 $4.99 per GPU-hour). H800 lease
# $2/GPU-h is the figure the DeepSeek-V3 report (arXiv:2412.19437, §1) assumes.
# sustained_eff: the one calibrated number per generation. MAMF is a best-shape burst on an idle GPU; inside a
# training step kernels run at sustained (power-capped) clocks. Tile/wave quantization and kernel gaps are modelled
# separately (plan.costmodel.gemm_shape_efficiency, Stack.kernel_gap_s), so this is only the clock/thermal
# part. One value per generation, chosen on the 8 rows of data/validation/public_runs.csv as a whole (grid
# 0.80-1.00 in steps of 0.05 for Ampere and Hopper; never per row; the MoE and more_runs rows were not used).
# Third pass on issue 11 (HBM in MiB as nvidia-smi reports it, the last stage's logits apart from the first
# stage's activations, the 145.6B/18.4B rows' micro-batch and interleaving from Megatron's sc21 run_table_1.sh):
# the lowest median among the pairs within the bar's 15 % max was Ampere 0.85 / Hopper 0.90 (median 4.0 %, max
# 14.9 %).
# Fourth pass: the Megatron-LM README's H100 table overlaps pipeline communication, which Megatron-LM does only
# under the interleaved schedule (arguments.py sets overlap_p2p_comm False without virtual stages), so its
# pipelined rows (the fit row MCORE-H100-70B among them) are interleaved; under 1F1B that row was -14 % and held
# Hopper at 0.90. Refit on the same rule over a grid widened to 0.70-1.00 (0.80, the old grid's edge, was best on
# it): Ampere 0.85 / Hopper 0.75, median 2.0 %, max 14.9 % (Hopper 0.80: 2.3 %; 0.70: 3.1 %). Blackwell has
# no fit row and reuses Hopper's value. It is the least-sourced constant here: replace it with a measured
# sustained-GEMM figure when one is available (catalog override file).
# fp8_matmul_eff: FP8 (E4M3) GEMM rate / FP8 dense peak. Assumption: 0.70 on Hopper, i.e. ~1.75× the BF16 GEMM
# rate at the same shape, below the 2× of the peaks because FP8 GEMMs hit the power limit sooner and carry
# scaling epilogues (NVIDIA Transformer Engine documentation reports FP8 end-to-end speed-ups of 1.3-1.5×
# for whole layers, which also contain the bf16 attention and elementwise work modelled separately).
_AMPERE = dict(generation="ampere", sms=108, sustained_eff=0.85, matmul_eff=0.859, attn_eff=0.62, hbm_eff=0.85,
               nvlink_eff=0.77)
_HOPPER = dict(generation="hopper", sms=132, sustained_eff=0.75, matmul_eff=0.801, attn_eff=0.60, hbm_eff=0.85,
               nvlink_eff=0.80)
_BLACKWELL = dict(generation="blackwell", sms=148, sustained_eff=0.75, matmul_eff=0.776, attn_eff=0.60, hbm_eff=0.85,
                  nvlink_eff=0.80)

GPUS: dict[str, GPUSpec] = {
    "a100-40g": GPUSpec(
        name="a100-40g", bf16_dense_flops=312 * TB, fp8_dense_flops=None, hbm_bytes=40960 * MIB, hbm_bw=1.555 * TB,
        nvlink_bw=300 * GB, nvlink_domain=8, nic_bw=200e9 / 8, tdp_w=400, price_usd=10_000, lease_usd_per_h=1.29,
        device_names=("A100-SXM4-40GB", "A100-PCIE-40GB", "A100 40GB"), **_AMPERE,
    ),
    "a100-80g": GPUSpec(
        name="a100-80g", bf16_dense_flops=312 * TB, fp8_dense_flops=None, hbm_bytes=81920 * MIB, hbm_bw=2.039 * TB,
        nvlink_bw=300 * GB, nvlink_domain=8, nic_bw=200e9 / 8, tdp_w=400, price_usd=15_000, lease_usd_per_h=1.79,
        device_names=("A100-SXM4-80GB", "A100 80GB", "A100-PCIE-80GB"), **_AMPERE,
    ),
    "h100-sxm": GPUSpec(
        name="h100-sxm", bf16_dense_flops=989.4 * TB, fp8_dense_flops=1978.9 * TB, hbm_bytes=81559 * MIB,
        hbm_bw=3.35 * TB, nvlink_bw=450 * GB, nvlink_domain=8, nic_bw=400e9 / 8, tdp_w=700, price_usd=27_500,
        lease_usd_per_h=2.99, device_names=("H100 80GB HBM3", "H100 SXM"), **_HOPPER,
    ),
    # H800: the export variant of H100 SXM: same compute and HBM, NVLink cut to 400 GB/s bidirectional.
    "h800": GPUSpec(
        name="h800", bf16_dense_flops=989.4 * TB, fp8_dense_flops=1978.9 * TB, hbm_bytes=81559 * MIB, hbm_bw=3.35 * TB,
        nvlink_bw=200 * GB, nvlink_domain=8, nic_bw=400e9 / 8, tdp_w=700, price_usd=30_000, lease_usd_per_h=2.0,
        device_names=("H800",), **_HOPPER,
    ),
    "h200": GPUSpec(
        name="h200", bf16_dense_flops=989.4 * TB, fp8_dense_flops=1978.9 * TB, hbm_bytes=143771 * MIB, hbm_bw=4.8 * TB,
        nvlink_bw=450 * GB, nvlink_domain=8, nic_bw=400e9 / 8, tdp_w=700, price_usd=32_000, lease_usd_per_h=3.79,
        device_names=("H200",), **_HOPPER,
    ),
    "b200": GPUSpec(
        name="b200", bf16_dense_flops=2250 * TB, fp8_dense_flops=4500 * TB, hbm_bytes=183359 * MIB, hbm_bw=8.0 * TB,
        nvlink_bw=900 * GB, nvlink_domain=8, nic_bw=400e9 / 8, tdp_w=1000, price_usd=37_500, lease_usd_per_h=4.99,
        device_names=("B200",), **_BLACKWELL,
    ),
}
# Names the CSV of published runs uses.
ALIASES = {"a100": "a100-80g", "a100-80gb": "a100-80g", "a100-40gb": "a100-40g", "h100": "h100-sxm"}

# ---- fabrics ---------------------------------------------------------------------------------------------
# InfiniBand NDR 400 Gb/s: nccl-tests on DGX H100 SuperPODs reach ~ 45-48 GB/s bus bandwidth per 50 GB/s NIC
# across nodes (NVIDIA "NCCL performance" blog posts, ml-engineering network chapter) -> 0.9.
# Spectrum-X (RoCE): NVIDIA's Colossus announcement (Oct 2024) states 95 % data throughput at 100k-GPU scale,
# against ~60 % for standard Ethernet with flow collisions -> 0.9 (we take the lower of NDR and the claim).
# HDR 200 Gb/s: Selene's fabric (DGX A100 SuperPOD reference architecture), same efficiency as NDR.
# Levels and per-step latency (alpha). One step of a ring collective is a message to the neighbour and its
# completion; NCCL's own tuning model (src/graph/tuning.cc, "hwLat" and "baseLat" tables) charges ~0.6-2 µs per
# NVLink hop and ~5 µs per network hop for the LL/LL128 protocols and more for Simple; nccl-tests small-message
# all_reduce_perf across 2 NDR nodes measures ~ 10-20 µs (2 steps). We take 2 µs per NVLink step, 5 µs per step
# inside a leaf (ConnectX-7 adapter < 1 µs + one Quantum-2 switch hop < 1 µs + NCCL proxy/protocol overhead),
# 7 µs across the spine (two more switch hops and longer cables), 10 µs across pods (core tier). Ethernet adds
# ~ 1-3 µs per step (RoCE congestion control, store-and-forward switching).
# Sizes: a DGX SuperPOD scalable unit is 32 DGX nodes = 256 GPUs on one set of rail-optimised leaf switches
# (NVIDIA DGX SuperPOD H100 reference architecture); a two-tier fat tree of 64-port Quantum-2 switches (QM9700:
# 64 × 400 Gb/s) serves 64 · 32 = 2,048 nodes per rail = 16,384 GPUs; larger clusters add a core tier. Meta's
# 24k-GPU RoCE cluster tapers 1:7 between pods of 3,072 GPUs (Llama 3, arXiv:2407.21783 §3.3.1: "roce");
# Spectrum-X at Colossus is non-blocking (NVIDIA, Oct 2024).
# NCCL's algorithm choice (ring vs tree) is modelled in plan.costmodel.collective_time: all-reduce takes the
# faster of ring and double binary tree; all-gather and reduce-scatter are ring-only in NCCL.
FABRICS: dict[str, FabricSpec] = {
    "ib-ndr": FabricSpec(name="ib-ndr", nic_gbps=400, efficiency=0.9, latency_s=5e-6),
    "ib-hdr": FabricSpec(name="ib-hdr", nic_gbps=200, efficiency=0.9, latency_s=5e-6, pod_gpus=8_192),
    "spectrum-x": FabricSpec(name="spectrum-x", nic_gbps=400, efficiency=0.9, latency_s=6e-6, alpha_spine_s=8e-6,
                             alpha_core_s=11e-6),
    "roce": FabricSpec(name="roce", nic_gbps=400, efficiency=0.6, latency_s=8e-6, alpha_spine_s=10e-6,
                       alpha_core_s=14e-6, pod_gpus=3_072, core_oversubscription=7.0),
}

# ---- site ------------------------------------------------------------------------------------------------
# Server overhead: a DGX H100 draws ~ 10.2 kW max with 8 × 700 W GPUs (DGX H100 datasheet), so ~ 575 W per GPU
# goes to CPUs, NICs, fans, NVSwitches; add ~ 50 W per GPU for the scale-out switches -> 625 W.
# PUE 1.2: modern liquid/air hyperscale sites report 1.1-1.2 (Google data-centre efficiency report 2024: 1.10
# fleet average; Uptime Institute 2024 survey average 1.56 for all sites). We take 1.2.
# Electricity: US industrial average ~ $0.08/kWh (EIA Electric Power Monthly, 2024).
# avg_power_fraction: Llama 3 (arXiv:2407.21783 §3.3.4) reports tens-of-MW power swings as the whole job
# synchronises; training sits below TDP on average. Assumption: 0.85.
# system_cost_factor: GPUs are roughly 2/3 of an AI cluster's capex (servers, network, storage are the rest;
# SemiAnalysis and Epoch AI cost breakdowns) -> 1.5.
SITE = SiteSpec(
    server_overhead_w_per_gpu=625, pue=1.2, electricity_usd_per_kwh=0.08, avg_power_fraction=0.85,
    system_cost_factor=1.5,
)


def get_gpu(name: str) -> GPUSpec:
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in GPUS:
        raise UserError(f"unknown GPU {name!r}; known: {', '.join(GPUS)} (or add one with --catalog FILE)")
    return GPUS[key]


def get_fabric(name: str) -> FabricSpec:
    key = name.strip().lower()
    if key not in FABRICS:
        raise UserError(f"unknown fabric {name!r}; known: {', '.join(FABRICS)}")
    return FABRICS[key]


def gpu_by_device_name(device_name: str) -> GPUSpec | None:
    """Map a ``torch.cuda.get_device_name()`` string (e.g. "NVIDIA H100 80GB HBM3") to the catalog, or None."""
    text = re.sub(r"\s+", " ", device_name).lower()
    best: tuple[int, GPUSpec] | None = None
    for gpu in GPUS.values():
        for pattern in gpu.device_names:
            if pattern.lower() in text and (best is None or len(pattern) > best[0]):
                best = (len(pattern), gpu)
    return best[1] if best else None


def load_catalog(path: str | Path) -> None:
    """Override or extend the catalog in place from a TOML/JSON file (see the module docstring)."""
    global SITE
    p = Path(path)
    if not p.is_file():
        raise UserError(f"catalog file {p} not found")
    try:
        text = p.read_text(encoding="utf-8")
        data: dict[str, Any] = tomllib.loads(text) if p.suffix.lower() == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"cannot parse catalog file {p}: {err}") from None
    unknown = set(data) - {"gpu", "fabric", "site"}
    if unknown:
        raise UserError(f"catalog file {p}: unknown table(s) {sorted(unknown)}; use gpu, fabric, site")
    try:
        for name, fields in data.get("gpu", {}).items():
            key = name.lower()
            base = GPUS[key].model_dump() if key in GPUS else {"name": key}
            GPUS[key] = GPUSpec(**{**base, **fields, "name": key})
        for name, fields in data.get("fabric", {}).items():
            key = name.lower()
            base = FABRICS[key].model_dump() if key in FABRICS else {"name": key}
            FABRICS[key] = FabricSpec(**{**base, **fields, "name": key})
        if "site" in data:
            SITE = SiteSpec(**{**SITE.model_dump(), **data["site"]})
    except (ValidationError, TypeError) as err:
        first = err.errors()[0] if isinstance(err, ValidationError) else {"loc": (), "msg": str(err)}
        where = ".".join(str(x) for x in first.get("loc", ()))
        raise UserError(f"catalog file {p}: {where}: {first['msg']}") from None


def get_site() -> SiteSpec:
    return SITE
