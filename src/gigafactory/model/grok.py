"""A Grok-style mixture-of-experts transformer, built from a `ModelSpec`, readable top to bottom.

Single-device math only: how it is sharded lives in `gigafactory.parallel`, how it is trained in
`gigafactory.train`. The details follow the public grok-1 release (see ../shared/DESIGN.md):
- every residual branch is ``h + RMSNorm(branch(RMSNorm(h)))``: four norms per layer, each with its own scale;
- attention logits are scaled by 1/√head_dim, then soft-capped ``c·tanh(x/c)`` (`attention.attend`, fused or
  block-wise, never the full score matrix of a long sequence); RoPE is the half-split ("rotate_half") form over
  the whole head; token id 0 is padding and is never attended to;
- the router's softmax runs in fp32 over all experts and the top-k gates are *not* renormalised;
- experts are gated GELU (tanh approximation): ``W_down(W_v·x ⊙ gelu(W_gate·x))``, run as grouped matmuls over
  token copies sorted by expert, with no host synchronisation; Grok-2 adds a dense FFN
  beside the MoE and scales the sum by 1/√2;
- dispatch is dropless, or with a capacity factor (a training option, `MoE.capacity_factor`) each expert takes at
  most C copies of a layer's tokens in fixed-size, zero-padded slots (`specs.moe.expert_capacity`), the rest are
  dropped: fixed shapes, so expert parallelism's all-to-all needs no host synchronisation either;
- embeddings are multiplied on the way in, logits on the way out, optionally soft-capped.

The MoE's auxiliary losses (load balancing and router z-loss) do not travel in the return value: their
gradient is injected in backward (`_AuxLossGrad`), so the same module works unchanged when a pipeline stage
only sees hidden states. The load-balancing loss is computed per sequence and averaged (as DeepSeek-V3's
sequence-wise balance loss), so splitting a batch across data-parallel ranks does not change it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from gigafactory.model.attention import allowed, attend
from gigafactory.specs import ModelSpec
from gigafactory.specs.moe import expert_capacity

PAD_ID = 0


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()  # the mean square in fp32: bf16 loses too much here
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * self.weight.float()).to(x.dtype)


def softcap(x: Tensor, cap: float | None) -> Tensor:
    return x if cap is None else cap * torch.tanh(x / cap)


def rope_tables(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos/sin of shape [B, 1, T, head_dim] for integer positions [B, T]."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.float()[..., None] * inv_freq  # [B, T, D/2]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos()[:, None], angles.sin()[:, None]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class KeyPositions(NamedTuple):
    """What `attend` needs besides q, k, v: the queries' positions [B, T], and the keys' positions [B, S] and
    padding flags [B, S] (False = padding, never attended to)."""

    q_pos: Tensor
    k_pos: Tensor
    k_ok: Tensor


class KVCacheLike(Protocol):
    """What attention needs from a KV cache; `KVCache` below is contiguous, the server's is paged."""

    def begin(self, tokens: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """Register the new tokens; return the positions [B, S] and padding flags [B, S] of all keys."""
        ...

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store this step's keys/values [B, Hkv, T, D] for `layer`; return all keys/values [B, Hkv, S, D]."""
        ...


def key_positions(tokens: Tensor, positions: Tensor | None = None) -> KeyPositions:
    """Self-attention over `tokens` [B, T] at `positions` (default 0..T-1): keys are the tokens themselves."""
    if positions is None:
        b, t = tokens.shape
        positions = torch.arange(t, device=tokens.device).expand(b, t)
    return KeyPositions(positions, positions, tokens != PAD_ID)


def causal_mask(tokens: Tensor) -> Tensor:
    """[B, 1, T, T] (True = may attend): the rule `attend` applies, materialised (for tests and inspection)."""
    kp = key_positions(tokens)
    return allowed(kp.q_pos, kp.k_pos, kp.k_ok)[:, None]


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = spec.n_heads, spec.n_kv_heads, spec.head_dim
        self.softcap = spec.attn_softcap
        self.q_proj = nn.Linear(spec.d_model, spec.n_heads * spec.head_dim, bias=False)
        self.k_proj = nn.Linear(spec.d_model, spec.n_kv_heads * spec.head_dim, bias=False)
        self.v_proj = nn.Linear(spec.d_model, spec.n_kv_heads * spec.head_dim, bias=False)
        self.o_proj = nn.Linear(spec.n_heads * spec.head_dim, spec.d_model, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, keys: KeyPositions, cache: KVCacheLike | None) -> Tensor:
        b, t, _ = x.shape
        # Head counts come from the weights so a tensor-parallel shard (fewer local heads) runs the same code.
        q = self.q_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        out = attend(q, k, v, q_pos=keys.q_pos, k_pos=keys.k_pos, k_ok=keys.k_ok, softcap=self.softcap)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class _AuxLossGrad(torch.autograd.Function):
    """Identity on `x` in forward; in backward, also sends gradient 1 into `aux` (already weighted)."""

    @staticmethod
    def forward(ctx, x: Tensor, aux: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(aux)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        (aux,) = ctx.saved_tensors
        return grad, torch.ones_like(aux)


def gated_gelu(gate: Tensor, up: Tensor, recompute: bool = False) -> Tensor:
    """``gelu(gate) · up`` (tanh GELU). ``recompute`` (selective recompute): keep only `gate` and `up` for backward
    and redo the activation there, instead of also keeping gelu's output (2 bytes per element in bf16)."""
    if recompute and torch.is_grad_enabled():
        return checkpoint(_gated_gelu, gate, up, use_reentrant=False)  # type: ignore[no-any-return]
    return _gated_gelu(gate, up)


def _gated_gelu(gate: Tensor, up: Tensor) -> Tensor:
    return F.gelu(gate, approximate="tanh") * up


def combine(out: Tensor, gates: Tensor, order: Tensor) -> Tensor:
    """The MoE output [N, d] from the experts' outputs `out` [N·k, d] in expert order (`order`: the stable argsort
    of the flat expert ids [N·k]) and the gates [N, k]: each token's k outputs weighted by their gates and summed.
    Unsorted by indexing, then one product and a sum over k: backward keeps one copy of the outputs (for the gates'
    gradient); scaling in expert order and `index_add_` into zeros kept two (the product's input and its output,
    which `index_add_` saves)."""
    n, k = gates.shape
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    y = out[inverse].view(n, k, -1)
    return (y * gates[..., None].to(y.dtype)).sum(1)


class _Fp32Linear(torch.autograd.Function):
    """``x.float() @ w.float().T`` with autocast off (the router, in fp32 whether or not the caller autocasts),
    keeping `x` itself for backward rather than its fp32 copy (half the bytes for a bf16 `x`)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, w)
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.float(), w.float())

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        x, w = ctx.saved_tensors
        with torch.autocast(x.device.type, enabled=False):
            gx = grad @ w.float()
            gw = grad.flatten(0, -2).T @ x.flatten(0, -2).float()
        return gx.to(x.dtype), gw.to(w.dtype)


class Experts(nn.Module):
    """All experts' weights as 3-D tensors [E, in, out], so expert parallelism shards dimension 0."""

    def __init__(self, n_experts: int, d_model: int, ffn: int) -> None:
        super().__init__()
        self.recompute_act = False  # set by selective recompute (`parallel.fsdp.apply_recompute`)
        self.w_gate = nn.Parameter(torch.empty(n_experts, d_model, ffn))
        self.w_up = nn.Parameter(torch.empty(n_experts, d_model, ffn))
        self.w_down = nn.Parameter(torch.empty(n_experts, ffn, d_model))

    def forward(self, x: Tensor, counts: Tensor | list[int]) -> Tensor:
        """`x` holds tokens grouped by expert, `counts[e]` of them for local expert e. One grouped matmul per
        weight (`torch._grouped_mm`, CPU and GPU): the group boundaries stay on the device, so the host never
        waits for the routing."""
        if isinstance(counts, list):
            counts = torch.tensor(counts, device=x.device)
        offsets = counts.cumsum(0).to(torch.int32)
        # Autocast does not cover `_grouped_mm`: cast as it would for a matmul.
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        x = x.to(dtype)
        gate, up, down = (w.to(dtype) for w in (self.w_gate, self.w_up, self.w_down))
        if gate.dim() == 2:  # stored [E·d, ffn], w_down transposed, for FSDP over many ranks (`parallel.fsdp`)
            d, ffn = x.shape[-1], gate.shape[-1]
            gate, up, down = gate.view(-1, d, ffn), up.view(-1, d, ffn), down.view(-1, d, ffn).transpose(1, 2)
        h = gated_gelu(_grouped_mm(x, gate, offsets), _grouped_mm(x, up, offsets), self.recompute_act)
        return _grouped_mm(h, down, offsets)


def _grouped_mm(x: Tensor, w: Tensor, offsets: Tensor) -> Tensor:
    """Rows offsets[e-1]..offsets[e] of `x` times w[e]: [N, in] × [E, in, out] → [N, out]."""
    y = torch._grouped_mm(x, w, offs=offsets)
    if y.requires_grad:
        y.register_hook(torch.Tensor.contiguous)  # its backward rejects expanded (stride-0) gradients
    return y


class MoE(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.n_experts, self.top_k = spec.n_experts, spec.top_k
        self.router_softcap = spec.router_softcap
        self.router = nn.Linear(spec.d_model, spec.n_experts, bias=False)
        self.experts = Experts(spec.n_experts, spec.d_model, spec.expert_ffn)
        # Set by the trainer: loss weights, and the factor its loss is scaled by (1 / accumulation steps).
        self.lb_weight = 0.0
        self.z_weight = 0.0
        self.aux_scale = 1.0
        # Set by the trainer (`TrainConfig.moe_capacity_factor`): None = dropless dispatch.
        self.capacity_factor: float | None = None
        self.last_stats: dict[str, Tensor] = {}

    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """fp32 router: (logits [N, E], gates [N, k], expert ids [N, k]); gates are not renormalised."""
        logits = softcap(_Fp32Linear.apply(x, self.router.weight), self.router_softcap)
        probs = logits.softmax(dim=-1)
        gates, idx = probs.topk(self.top_k, dim=-1)
        return logits, gates, idx

    def dispatch_compute(self, x: Tensor, gates: Tensor, idx: Tensor) -> Tensor:
        """Sort token copies by expert, run the experts, scatter back weighted by their gates. Expert
        parallelism replaces this method with an all-to-all version; the math is the same."""
        if self.capacity_factor is not None:
            return self.capacity_dispatch(x, gates, idx)
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        token_of = order // self.top_k
        return combine(self.experts(x[token_of], expert_counts(flat, self.n_experts)), gates, order)

    def capacity_dispatch(self, x: Tensor, gates: Tensor, idx: Tensor,
                          run_experts: Callable[[Tensor, int], Tensor] | None = None) -> Tensor:
        """The fixed-shape dispatch: every expert gets C slots (`capacity_slots`), zero rows where unused; a copy
        beyond its expert's C is dropped (it adds nothing to its token, and gets no gradient). `run_experts(rows,
        C)` maps the [E·C, d] slot rows, expert-major, to the experts' outputs in the same order; by default this
        process holds every expert. Every shape follows from x's, so the host never reads routing data."""
        assert self.capacity_factor is not None
        n, d = x.shape
        cap = expert_capacity(n, self.top_k, self.n_experts, self.capacity_factor)
        slots = capacity_slots(idx, self.n_experts, cap)
        token = slots // self.top_k  # n for an empty slot: the zero row appended below
        rows = torch.cat([x, x.new_zeros(1, d)])[token]
        if run_experts is None:
            out = self.experts(rows, torch.full((self.n_experts,), cap, device=x.device))
        else:
            out = run_experts(rows, cap)
        gate = torch.cat([gates.reshape(-1), gates.new_zeros(1)])[slots]
        out = out * gate[:, None].to(out.dtype)
        return x.new_zeros((n + 1, d), dtype=out.dtype).index_add_(0, token, out)[:n]

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        flat = x.reshape(-1, d)
        logits, gates, idx = self.route(flat)
        y = self.dispatch_compute(flat, gates, idx).view(b, t, d)
        if self.training and torch.is_grad_enabled() and (self.lb_weight or self.z_weight):
            y = _AuxLossGrad.apply(y, self._aux_loss(logits.view(b, t, -1), idx.view(b, t, -1)))
        return y

    def _aux_loss(self, logits: Tensor, idx: Tensor) -> Tensor:
        # Load balance per sequence: E · Σ_e f_e · P_e with f_e the share of routed slots, P_e the mean prob.
        probs = logits.softmax(-1)
        share = routed_counts(idx, self.n_experts).mean(1) / self.top_k  # [B, E]
        lb = (self.n_experts * (share * probs.mean(1)).sum(-1)).mean()
        z = torch.logsumexp(logits, -1).pow(2).mean()
        self.last_stats = {"lb_loss": lb.detach(), "z_loss": z.detach()}  # tensors: read once per step
        return (self.lb_weight * lb + self.z_weight * z) * self.aux_scale


def routed_counts(idx: Tensor, n_experts: int) -> Tensor:
    """[..., E] float: how many of each position's routed choices `idx` [..., k] went to each expert. A scatter-add,
    not `F.one_hot`, which checks its input's range on the host (a sync) outside CUDA."""
    ones = torch.ones(idx.shape, dtype=torch.float32, device=idx.device)
    counts = torch.zeros((*idx.shape[:-1], n_experts), dtype=torch.float32, device=idx.device)
    return counts.scatter_add_(-1, idx, ones)


def expert_counts(flat: Tensor, n_experts: int) -> Tensor:
    """[E] int64: how many of the routed copies `flat` (expert ids) go to each expert. By scatter-add (a static
    shape; bincount's shape depends on the data): no host synchronisation."""
    return torch.zeros(n_experts, dtype=torch.int64, device=flat.device).index_add_(0, flat, torch.ones_like(flat))


def capacity_slots(idx: Tensor, n_experts: int, capacity: int) -> Tensor:
    """Which routed copy fills each of the n_experts · capacity expert slots: [E·C] indices into
    ``idx.reshape(-1)`` (token-major, so copy i is token i // top_k's choice i % top_k), expert-major, or
    ``idx.numel()`` for an empty slot. Each expert takes its copies in token order and drops those beyond
    `capacity` (the later tokens): deterministic, whatever the device. Static shapes only, no host sync."""
    flat = idx.reshape(-1)
    n = flat.numel()
    order = torch.argsort(flat, stable=True)  # copies grouped by expert, token order kept within each
    counts = expert_counts(flat, n_experts)
    expert = flat[order]
    pos = torch.arange(n, device=flat.device) - (counts.cumsum(0) - counts)[expert]  # place within its expert
    # a dropped copy writes to one extra slot, cut off below (several may: that slot's value is never used)
    dest = torch.where(pos < capacity, expert * capacity + pos, n_experts * capacity)
    slots = torch.full((n_experts * capacity + 1,), n, dtype=torch.int64, device=flat.device)
    return slots.scatter_(0, dest, order)[:-1]


class DenseFFN(nn.Module):
    def __init__(self, d_model: int, ffn: int) -> None:
        super().__init__()
        self.gate = nn.Linear(d_model, ffn, bias=False)
        self.up = nn.Linear(d_model, ffn, bias=False)
        self.down = nn.Linear(ffn, d_model, bias=False)
        self.recompute_act = False  # set by selective recompute (`parallel.fsdp.apply_recompute`)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(gated_gelu(self.gate(x), self.up(x), self.recompute_act))


class Block(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int) -> None:
        super().__init__()
        eps = spec.norm_eps
        self.pre_attn_norm, self.post_attn_norm = RMSNorm(spec.d_model, eps), RMSNorm(spec.d_model, eps)
        self.pre_moe_norm, self.post_moe_norm = RMSNorm(spec.d_model, eps), RMSNorm(spec.d_model, eps)
        self.attn = Attention(spec, layer)
        self.moe = MoE(spec)
        self.dense = DenseFFN(spec.d_model, spec.dense_ffn) if spec.dense_ffn else None

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, keys: KeyPositions, cache: KVCacheLike | None) -> Tensor:
        h = h + self.post_attn_norm(self.attn(self.pre_attn_norm(h), cos, sin, keys, cache))
        x = self.pre_moe_norm(h)
        ffn = self.moe(x)
        if self.dense is not None:
            ffn = (ffn + self.dense(x)) * (1 / math.sqrt(2))
        return h + self.post_moe_norm(ffn)


class GrokModel(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.embed = nn.Embedding(spec.vocab_size, spec.d_model)
        # A ModuleDict keyed by layer number keeps checkpoint keys stable when pipeline stages drop layers.
        self.layers = nn.ModuleDict({str(i): Block(spec, i) for i in range(spec.n_layers)})
        self.norm = RMSNorm(spec.d_model, spec.norm_eps)
        self.lm_head = None if spec.tie_embeddings else nn.Linear(spec.d_model, spec.vocab_size, bias=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Unit-variance activations: the input multiplier times the embedding std is 1, matrices get
        1/√fan_in, norms start at 1 (the post-branch norms keep every residual update at unit scale)."""
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        if self.embed.weight.device.type == "meta":
            return
        spec = self.spec

        def normal(p: Tensor, std: float) -> None:
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std)

        normal(self.embed.weight, 1.0 / spec.embedding_multiplier)
        if self.lm_head is not None:
            normal(self.lm_head.weight, 1.0 / math.sqrt(spec.d_model))
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.startswith("layers."):
                fan_in = p.shape[-2] if p.dim() == 3 else p.shape[-1]
                normal(p, 1.0 / math.sqrt(fan_in))

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def forward(
        self, tokens: Tensor, positions: Tensor | None = None, cache: KVCacheLike | None = None,
        logits_at: Tensor | None = None,
    ) -> Tensor:  # fmt: skip
        """Logits [B, T, V] for tokens [B, T]. `positions` default to 0..T-1; with a cache, pass them.
        `logits_at` [B] picks one column per row: then only those get logits, [B, 1, V] (a prefill needs
        its last token's alone, and the output head is the widest matmul of a small model)."""
        b, t = tokens.shape
        if positions is None:
            positions = torch.arange(t, device=tokens.device).expand(b, t)
        keys = key_positions(tokens, positions) if cache is None else KeyPositions(positions,
                                                                                    *cache.begin(tokens, positions))
        cos, sin = rope_tables(positions, self.spec.head_dim, self.spec.rope_theta)
        h = self.embed(tokens) * self.spec.embedding_multiplier
        for block in self.layers.values():
            h = block(h, cos, sin, keys, cache)
        if logits_at is not None:
            h = h[torch.arange(b, device=h.device), logits_at][:, None]
        return self.output(h)

    def output(self, h: Tensor) -> Tensor:
        h = self.norm(h)
        weight = self.embed.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(h, weight).float() * self.spec.output_multiplier
        return softcap(logits, self.spec.final_softcap)


class KVCache:
    """Contiguous per-sequence cache for incremental decoding (chat). Keys carry their positions and
    padding flags so the mask is exact whatever the prompt lengths."""

    def __init__(self, spec: ModelSpec, batch: int, max_len: int, device: torch.device, dtype: torch.dtype) -> None:
        shape = (spec.n_layers, batch, spec.n_kv_heads, max_len, spec.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.key_pos = torch.zeros(batch, max_len, dtype=torch.long, device=device)
        self.key_ok = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.length = 0
        self.max_len = max_len
        self._start = 0

    def begin(self, tokens: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        t = tokens.shape[1]
        if self.length + t > self.max_len:
            raise ValueError(f"KV cache full: {self.length} + {t} tokens exceed its {self.max_len} slots")
        self._start = self.length
        self.key_pos[:, self.length : self.length + t] = positions
        self.key_ok[:, self.length : self.length + t] = tokens != PAD_ID
        self.length += t
        return self.key_pos[:, : self.length], self.key_ok[:, : self.length]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        end = self._start + k.shape[2]
        self.k[layer, :, :, self._start : end] = k
        self.v[layer, :, :, self._start : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]
