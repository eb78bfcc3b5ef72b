"""Weights that do not depend on the layout: each value is a pure function of (seed, parameter name, global index).

The trainer builds the model on the ``meta`` device, lets `parallel.parallelize` split it (tensor, expert,
pipeline, FSDP), and only then allocates each rank's local shards and fills them here. Because a value depends
only on where it sits in the *global* tensor, one process and any layout start from the same weights, and no
rank ever holds a full copy of the model.

The random numbers are counter-based: SplitMix64 of (key, index), with the key a SHA-256 of (seed, name), one
64-bit draw per value turned into a standard normal by Box-Muller. This is not PyTorch's generator (whose CPU
stream is sequential, so a shard could not be drawn without drawing everything before it).

The scales are those of `GrokModel.init_weights`: the embedding std is 1/embedding_multiplier, matrices get
1/√fan_in (fan_in from the global shape), norm scales start at 1.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from gigafactory.specs import ModelSpec

_CHUNK = 1 << 21  # values generated at a time (bounds the temporary int64 tensors)
_M1, _M2, _GOLD = -4658895280553007687, -7723592293110705685, -7046029254386353131  # SplitMix64 constants


def _shr(x: Tensor, k: int) -> Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _mix(x: Tensor) -> Tensor:
    """SplitMix64's finaliser on int64 (wrapping arithmetic)."""
    x = (x ^ _shr(x, 30)) * _M1
    x = (x ^ _shr(x, 27)) * _M2
    return x ^ _shr(x, 31)


def _key(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little", signed=True)


def normal_at(seed: int, name: str, index: Tensor) -> Tensor:
    """Standard normal values (float32) at global flat indices `index` (int64) of parameter `name`: one SplitMix64
    draw per value, 24 bits of each half the two uniforms of Box-Muller."""
    bits = _mix(index * _GOLD + _key(seed, name))
    u1 = (_shr(bits, 40) + 1).float() * 2.0**-24  # 24 bits each (exact in float32); u1 in (0, 1]: finite log
    u2 = (bits & 0xFFFFFF).float() * 2.0**-24
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2 * math.pi) * u2)


def _local_view(p: Tensor) -> tuple[Tensor, tuple[int, ...], tuple[int, ...]]:
    """(local tensor to fill, its offset in the global tensor, the global shape)."""
    if isinstance(p, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        local = p.to_local()
        shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        assert tuple(shape) == tuple(local.shape), (shape, local.shape)
        return local, tuple(offset), tuple(p.shape)
    return p, (0,) * p.dim(), tuple(p.shape)


def _global_index(rows: range, lshape: tuple[int, ...], offset: tuple[int, ...], gshape: tuple[int, ...]) -> Tensor:
    """Global flat indices of local rows `rows` (dim 0) of a block at `offset` in a tensor of shape `gshape`."""
    strides = [math.prod(gshape[d + 1 :]) for d in range(len(gshape))]
    idx = (torch.arange(rows.start, rows.stop, dtype=torch.int64) + offset[0]) * strides[0]
    for d in range(1, len(lshape)):
        part = (torch.arange(lshape[d], dtype=torch.int64) + offset[d]) * strides[d]
        idx = idx[..., None] + part
    return idx


def fill_normal(p: Tensor, seed: int, name: str, std: float) -> None:
    """Fill `p` (a plain tensor or this rank's shard of a DTensor) with std · N(0, 1) at its global indices."""
    local, offset, gshape = _local_view(p)
    fill_block(local, offset, gshape, seed, name, std)


def fill_block(local: Tensor, offset: tuple[int, ...], gshape: tuple[int, ...], seed: int, name: str,
               std: float) -> None:
    """Fill `local`, the block at `offset` of a global tensor of shape `gshape`, with its values."""
    if local.numel() == 0:
        return
    if local.dim() == 0:
        local.fill_(float(normal_at(seed, name, torch.zeros((), dtype=torch.int64))) * std)
        return
    row = math.prod(local.shape[1:])
    step = max(1, _CHUNK // max(1, row))
    for r0 in range(0, local.shape[0], step):
        rows = range(r0, min(local.shape[0], r0 + step))
        vals = normal_at(seed, name, _global_index(rows, tuple(local.shape), offset, gshape)) * std
        local[rows.start : rows.stop].copy_(vals)


def init_std(spec: ModelSpec, name: str, global_shape: tuple[int, ...]) -> float | None:
    """The std of a parameter's initial values, or None for a norm scale (filled with 1)."""
    if name.endswith("norm.weight"):
        return None
    if name == "embed.weight":
        return 1.0 / spec.embedding_multiplier
    if name == "lm_head.weight":
        return 1.0 / math.sqrt(spec.d_model)
    if ".experts.w_" in name:  # 3-D [E, in, out], or 2-D when FSDP stores them flat (`parallel.fsdp`)
        fan_in = spec.expert_ffn if name.endswith("w_down") else spec.d_model
    else:
        fan_in = global_shape[-1]
    return 1.0 / math.sqrt(fan_in)


@torch.no_grad()
def init_params(model: nn.Module, spec: ModelSpec, seed: int) -> None:
    """Fill every parameter of `model` (whole, sharded, or a pipeline stage's part) from (seed, name, index)."""
    for name, p in model.named_parameters():
        std = init_std(spec, name, tuple(p.shape))
        if std is None:
            p.fill_(1.0)
        elif p.dim() == 2 and name.endswith("experts.w_down"):
            _fill_flat_down(p, spec, seed, name, std)
        else:
            fill_normal(p, seed, name, std)


def _fill_flat_down(p: Tensor, spec: ModelSpec, seed: int, name: str, std: float) -> None:
    """w_down stored [E·d, ffn] (transposed and flattened, `parallel.fsdp.flatten_experts`): the value at row
    e·d + j, column f is the 3-D [E, ffn, d] weight's value at [e, f, j]."""
    local, offset, _ = _local_view(p)
    d, ffn = spec.d_model, spec.expert_ffn
    cols = (torch.arange(local.shape[1], dtype=torch.int64) + offset[1]) * d
    step = max(1, _CHUNK // max(1, local.shape[1]))
    for r0 in range(0, local.shape[0], step):
        rows = torch.arange(r0, min(local.shape[0], r0 + step), dtype=torch.int64) + offset[0]
        idx = ((rows // d) * ffn * d + rows % d)[:, None] + cols
        local[r0 : r0 + len(rows)].copy_(normal_at(seed, name, idx) * std)


def materialize(model: nn.Module, spec: ModelSpec, device: torch.device, seed: int) -> nn.Module:
    """Allocate a meta-device (possibly already parallelised) model's local shards on `device` and initialise
    them; a model that is not on ``meta`` is left as it is."""
    if not any(p.is_meta for p in model.parameters()):
        return model
    model.to_empty(device=device)
    from torch._subclasses.fake_tensor import is_fake

    if not any(is_fake(p.to_local() if isinstance(p, DTensor) else p) for p in model.parameters()):
        init_params(model, spec, seed)  # under fake tensors (the dry run) there are no values to fill
    return model
