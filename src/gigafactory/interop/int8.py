"""8-bit weights for serving: the release's scheme (symmetric int8 per output channel, one scale per channel).

`quantize_model` swaps the attention projections, the experts and Grok-2's dense FFN for int8 versions in
place; the router, embeddings, output head and norms stay in full precision (as in the Grok-1 release, whose
router, embeddings and norms are not quantised). Matmuls run on the int8 weights with the scales applied
inside the kernel (``aten._weight_int8pack_mm``: int8 weight [out, in], per-channel scales) for decode-sized
inputs (at most `FUSED_MAX_ROWS` rows), so no full-precision copy of the weight is made. For larger inputs
(prefill) and where that kernel is missing (other devices), the weight is dequantised just for its own matmul
and dropped: on this project's CPU the fused kernel's time grows with every input row (measured: 16 rows ×
256 × 1024 took 28× one row), while one dequantisation is amortised over the rows.

Resident bytes of a quantised matrix: ``out * in`` (int8) + ``4 * out`` (fp32 scales), about half of bf16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gigafactory.model.grok import DenseFFN, Experts, GrokModel


def quantize_rows(w: Tensor) -> tuple[Tensor, Tensor]:
    """[out, in] float -> (int8 [out, in], fp32 scales [out]): scale = max|row| / 127, round to nearest."""
    w = w.detach().float()
    scale = w.abs().amax(dim=-1) / 127.0
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.clamp(torch.round(w / safe[..., None]), -127, 127).to(torch.int8)
    return q, scale


FUSED_MAX_ROWS = 4


def int8_matmul(x: Tensor, q: Tensor, scale: Tensor) -> Tensor:
    """x [..., in] @ (q [out, in] * scale[:, None]).T (see the module docstring for which kernel runs)."""
    flat = x.reshape(-1, x.shape[-1])
    fused_ok = flat.device.type == "cpu" and flat.dtype in (torch.float32, torch.bfloat16)
    if fused_ok and 0 < flat.shape[0] <= FUSED_MAX_ROWS:
        out = torch.ops.aten._weight_int8pack_mm(flat.contiguous(), q, scale.to(flat.dtype))
    else:
        out = F.linear(flat, q.to(flat.dtype) * scale.to(flat.dtype)[:, None])
    return out.reshape(*x.shape[:-1], q.shape[0])


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        q, s = quantize_rows(linear.weight)
        self.register_buffer("weight_q", q)
        self.register_buffer("scale", s)

    def forward(self, x: Tensor) -> Tensor:
        return int8_matmul(x, self.weight_q, self.scale)


class Int8Experts(nn.Module):
    """`Experts` with each expert's matrices as int8 [out, in] plus per-output-channel scales."""

    def __init__(self, experts: Experts) -> None:
        super().__init__()
        for name in ("w_gate", "w_up", "w_down"):
            q, s = quantize_rows(getattr(experts, name).detach().transpose(1, 2))  # [E, in, out] -> [E, out, in]
            self.register_buffer(f"{name}_q", q.contiguous())
            self.register_buffer(f"{name}_scale", s)

    def forward(self, x: Tensor, counts: Tensor | list[int]) -> Tensor:
        """Same contract as `Experts.forward`; one int8 matmul per expert (the counts come to the host)."""
        if isinstance(counts, Tensor):
            counts = counts.tolist()
        outs = []
        for e, chunk in enumerate(torch.split(x, counts)):
            if chunk.shape[0] == 0:
                continue
            gate = int8_matmul(chunk, self.w_gate_q[e], self.w_gate_scale[e])
            up = int8_matmul(chunk, self.w_up_q[e], self.w_up_scale[e])
            outs.append(int8_matmul(F.gelu(gate, approximate="tanh") * up, self.w_down_q[e], self.w_down_scale[e]))
        return torch.cat(outs) if outs else x.new_zeros(0, self.w_down_q.shape[1])


@torch.no_grad()
def quantize_model(model: GrokModel) -> GrokModel:
    """In place: attention projections, experts and the dense FFN become int8 (see the module docstring)."""
    for block in model.layers.values():
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(block.attn, name, Int8Linear(getattr(block.attn, name)))
        block.moe.experts = Int8Experts(block.moe.experts)
        if isinstance(block.dense, DenseFFN):
            for name in ("gate", "up", "down"):
                setattr(block.dense, name, Int8Linear(getattr(block.dense, name)))
    return model


def weight_bytes(model: nn.Module) -> int:
    """Resident bytes of every parameter and buffer (the weights a server keeps in memory)."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
