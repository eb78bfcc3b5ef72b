"""The device to train on and its peak FLOP/s, the denominator of MFU.

On a GPU the peak comes from the hardware catalog (dense BF16); on a CPU there is no datasheet figure worth
trusting, so a short matmul probe measures it once per process, in the dtype training will use."""

from __future__ import annotations

import time
from functools import cache

import torch


def pick_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    """bf16 autocast on CUDA (where supported). On a CPU "auto" means fp32: even with AMX, autocast's casts cost
    more than its faster matmuls save at CPU model sizes (small preset: 0.87x the fp32 speed, measured here),
    and CPU bf16 kernels are not bitwise reproducible run to run. `--dtype bf16` still forces it."""
    if requested == "fp32":
        return torch.float32
    if requested == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


@cache
def measured_peak_flops(dtype_name: str = "float32", n: int = 1024, seconds: float = 0.25) -> float:
    """Best-of-several square matmul FLOP/s on this CPU (or GPU when no catalog entry matches)."""
    dtype = getattr(torch, dtype_name)
    device = pick_device()
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best = 0.0
    deadline = time.perf_counter() + seconds
    for _ in range(3):
        a @ b  # warm-up: thread pools, kernel selection
    while time.perf_counter() < deadline or best == 0.0:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - t0))
    return best


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """(peak FLOP/s, where the figure comes from)."""
    if device.type == "cuda":
        try:
            from gigafactory.specs.hardware import gpu_by_device_name

            gpu = gpu_by_device_name(torch.cuda.get_device_name(device))
        except ImportError:
            gpu = None
        if gpu is not None:
            return gpu.bf16_dense_flops, f"catalog: {gpu.name} dense BF16"
    name = "bfloat16" if dtype == torch.bfloat16 else "float32"
    return measured_peak_flops(name), f"measured {name} matmul peak"
