"""The attention core, one function for the model, the KV caches and context parallelism:

    attend(q, k, v, *, q_pos, k_pos, k_ok, softcap) -> out

q [B, H, T, D]; k, v [B, Hkv, S, D] (grouped-query attention: H is a multiple of Hkv, K/V are never copied per
query head); q_pos [B, T] and k_pos [B, S] integer positions; k_ok [B, S] bool (False = a padding key). A query
may attend a key iff ``(k_pos <= q_pos and k_ok) or k_pos == q_pos`` (causal by position, padding masked, a
token always sees itself). Logits are scaled by 1/√D, then soft-capped ``c·tanh(x/c)`` (Grok), then softmaxed
in fp32. Callers that gather K/V from elsewhere (a paged cache, the context-parallel ring) pass the keys'
positions, so the mask is exact whatever order or subset of keys arrives. A query row with no allowed key
returns zeros.

Three paths, the same math:
- ``flex``: PyTorch's `flex_attention` with the soft-cap as a score modifier and the position rule as a block
  mask, compiled, where the backend has forward and backward kernels (CUDA). Eager (uncompiled) it runs
  PyTorch's unfused reference, which is how the tests check it on a CPU.
- ``blockwise``: flash-style tiling with an online softmax and a recomputing backward (`_Blockwise`), so
  memory grows linearly with the sequence (PyTorch's flex attention has no CPU backward). Tiles whose keys are
  all masked (the causal upper triangle) are skipped.
- ``naive``: the whole score tensor at once: used when the problem is a single tile anyway (short sequences,
  decoding), where it is the fastest and its memory is one tile's.
Under fake tensors (the training dry run, `train/dryrun.py`) a stand-in allocates what a fused kernel keeps.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

BLOCK_Q = 256  # query rows per tile
BLOCK_K = 512  # keys per tile


def attend(q: Tensor, k: Tensor, v: Tensor, *, q_pos: Tensor, k_pos: Tensor, k_ok: Tensor,
           softcap: float | None) -> Tensor:
    """Scaled, soft-capped, position-masked grouped-query attention; see the module docstring."""
    from torch._subclasses.fake_tensor import is_fake

    if is_fake(q):  # the dry run: shapes and memory of a fused kernel, no values
        return _FusedStandIn.apply(q, k, v)  # type: ignore[no-any-return]
    if q.is_cuda:
        return attend_flex(q, k, v, q_pos=q_pos, k_pos=k_pos, k_ok=k_ok, softcap=softcap, compiled=True)
    if q.shape[2] <= BLOCK_Q and k.shape[2] <= BLOCK_K:
        return attend_naive(q, k, v, q_pos=q_pos, k_pos=k_pos, k_ok=k_ok, softcap=softcap)
    return attend_blockwise(q, k, v, q_pos=q_pos, k_pos=k_pos, k_ok=k_ok, softcap=softcap)


def allowed(q_pos: Tensor, k_pos: Tensor, k_ok: Tensor) -> Tensor:
    """[B, T, S] bool: which keys each query may attend (the contract's rule)."""
    qp, kp = q_pos[:, :, None], k_pos[:, None, :]
    return ((kp <= qp) & k_ok[:, None, :]) | (kp == qp)


def _scores(q: Tensor, k: Tensor, scale: float, cap: float | None) -> tuple[Tensor, Tensor | None]:
    """fp32 logits scaled then soft-capped, and tanh(x/c) (the soft-cap's derivative needs it)."""
    x = (q @ k.transpose(-1, -2)).float() * scale
    if cap is None:
        return x, None
    t = torch.tanh(x / cap)
    return cap * t, t


def _grouped(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Queries [B, Hkv, G, T, D] against keys/values [B, Hkv, 1, S, D]: GQA by broadcasting, no copies."""
    b, h, t, d = q.shape
    hkv = k.shape[1]
    return q.view(b, hkv, h // hkv, t, d), k.unsqueeze(2), v.unsqueeze(2)


def attend_naive(q: Tensor, k: Tensor, v: Tensor, *, q_pos: Tensor, k_pos: Tensor, k_ok: Tensor,
                 softcap: float | None) -> Tensor:
    b, h, t, d = q.shape
    qg, kg, vg = _grouped(q, k, v)
    s, _ = _scores(qg, kg, 1.0 / math.sqrt(d), softcap)
    ok = allowed(q_pos, k_pos, k_ok)[:, None, None]
    probs = s.masked_fill(~ok, float("-inf")).softmax(dim=-1).nan_to_num(0.0)  # a row with no key: zeros
    return (probs.to(v.dtype) @ vg).reshape(b, h, t, d)


def attend_blockwise(q: Tensor, k: Tensor, v: Tensor, *, q_pos: Tensor, k_pos: Tensor, k_ok: Tensor,
                     softcap: float | None, block_q: int = BLOCK_Q, block_k: int = BLOCK_K) -> Tensor:
    out = _Blockwise.apply(q, k, v, q_pos, k_pos, k_ok, softcap, block_q, block_k)
    return out  # type: ignore[no-any-return]


def _tiles(n: int, size: int) -> list[tuple[int, int]]:
    return [(i, min(n, i + size)) for i in range(0, n, size)]


def _live(ok: Tensor) -> bool:
    """Whether a tile has any allowed key. Under fake tensors (the dry run) every tile counts as live."""
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(ok) or bool(ok.any())


def _forward(qg: Tensor, kg: Tensor, vg: Tensor, q_pos: Tensor, k_pos: Tensor, k_ok: Tensor, cap: float | None,
             block_q: int, block_k: int) -> tuple[Tensor, Tensor]:
    """Online softmax over key tiles for each query tile: out [B, Hkv, G, T, D] and logsumexp [B, Hkv, G, T]."""
    scale = 1.0 / math.sqrt(qg.shape[-1])
    out = torch.empty(qg.shape, dtype=qg.dtype, device=qg.device)
    lse = torch.empty(qg.shape[:-1], dtype=torch.float32, device=qg.device)
    for i0, i1 in _tiles(qg.shape[3], block_q):
        qi = qg[..., i0:i1, :]
        m = torch.full(qi.shape[:-1], float("-inf"), device=qg.device)
        l_sum = torch.zeros(qi.shape[:-1], device=qg.device)
        acc = torch.zeros(qi.shape, dtype=torch.float32, device=qg.device)
        for j0, j1 in _tiles(kg.shape[3], block_k):
            ok = allowed(q_pos[:, i0:i1], k_pos[:, j0:j1], k_ok[:, j0:j1])[:, None, None]
            if not _live(ok):
                continue
            s, _ = _scores(qi, kg[..., j0:j1, :], scale, cap)
            s = s.masked_fill(~ok, float("-inf"))
            m_new = torch.maximum(m, s.amax(-1))
            m_safe = m_new.masked_fill(m_new == float("-inf"), 0.0)  # rows with no key so far
            p = torch.exp(s - m_safe[..., None])
            corr = torch.exp(m - m_safe)
            l_sum = l_sum * corr + p.sum(-1)
            acc = acc * corr[..., None] + (p.to(vg.dtype) @ vg[..., j0:j1, :]).float()
            m = m_new
        out[..., i0:i1, :] = (acc / l_sum.clamp_min(1e-30)[..., None]).to(qg.dtype)
        lse[..., i0:i1] = torch.where(l_sum > 0, m + l_sum.log(), float("inf"))
    return out, lse


class _Blockwise(torch.autograd.Function):
    """Flash-style attention on any device: saves only q, k, v, the output and the logsumexp (linear in T) and
    recomputes each tile's probabilities in backward."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, k_ok: Tensor,  # type: ignore[override]
                cap: float | None, block_q: int, block_k: int) -> Tensor:
        qg, kg, vg = _grouped(q, k, v)
        out, lse = _forward(qg, kg, vg, q_pos, k_pos, k_ok, cap, block_q, block_k)
        ctx.save_for_backward(q, k, v, q_pos, k_pos, k_ok, out, lse)
        ctx.cfg = (cap, block_q, block_k)
        return out.view(q.shape)

    @staticmethod
    def backward(ctx: Any, dout: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        q, k, v, q_pos, k_pos, k_ok, out, lse = ctx.saved_tensors
        cap, block_q, block_k = ctx.cfg
        qg, kg, vg = _grouped(q, k, v)
        do = dout.reshape(out.shape).float()
        delta = (do * out.float()).sum(-1)  # [B, Hkv, G, T]
        scale = 1.0 / math.sqrt(q.shape[-1])
        dq = torch.zeros(qg.shape, dtype=torch.float32, device=q.device)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
        dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
        for i0, i1 in _tiles(qg.shape[3], block_q):
            qi, doi = qg[..., i0:i1, :], do[..., i0:i1, :]
            for j0, j1 in _tiles(kg.shape[3], block_k):
                ok = allowed(q_pos[:, i0:i1], k_pos[:, j0:j1], k_ok[:, j0:j1])[:, None, None]
                if not _live(ok):
                    continue
                kj, vj = kg[..., j0:j1, :], vg[..., j0:j1, :]
                s, t = _scores(qi, kj, scale, cap)
                p = torch.exp(s.masked_fill(~ok, float("-inf")) - lse[..., i0:i1, None])
                dv[:, :, j0:j1] += (p.transpose(-1, -2) @ doi).sum(2)
                ds = p * (doi @ vj.float().transpose(-1, -2) - delta[..., i0:i1, None])
                if t is not None:
                    ds = ds * (1 - t * t)  # d/dx c·tanh(x/c)
                ds = ds * scale
                dq[..., i0:i1, :] += ds @ kj.float()
                dk[:, :, j0:j1] += (ds.transpose(-1, -2) @ qi.float()).sum(2)
        return dq.view(q.shape).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None


class _FusedStandIn(torch.autograd.Function):
    """Under fake tensors only: what a fused (flash) kernel allocates and keeps for backward, q, k, v, the output
    and one fp32 logsumexp per query, without computing anything (fake tensors have no values to compute)."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor) -> Tensor:  # type: ignore[override]
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx: Any, dout: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def attend_flex(q: Tensor, k: Tensor, v: Tensor, *, q_pos: Tensor, k_pos: Tensor, k_ok: Tensor,
                softcap: float | None, compiled: bool = True) -> Tensor:
    """PyTorch flex attention: soft-cap as `score_mod`, the position rule as a block mask. Compiled on CUDA;
    eager elsewhere (PyTorch's unfused reference: for checking the math, not for speed)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def mask_mod(b: Tensor, h: Tensor, qi: Tensor, ki: Tensor) -> Tensor:
        qp, kp = q_pos[b, qi], k_pos[b, ki]
        return ((kp <= qp) & k_ok[b, ki]) | (kp == qp)

    def score_mod(score: Tensor, b: Tensor, h: Tensor, qi: Tensor, ki: Tensor) -> Tensor:
        return softcap * torch.tanh(score / softcap)  # type: ignore[operator]

    bsz, _, t, _ = q.shape
    mask = create_block_mask(mask_mod, bsz, None, t, k.shape[2], device=q.device, _compile=compiled)
    fn = _compiled_flex() if compiled else flex_attention
    return fn(q, k, v, score_mod=score_mod if softcap is not None else None, block_mask=mask,  # type: ignore[no-any-return]
              enable_gqa=q.shape[1] != k.shape[1])


_FLEX: Any = None


def _compiled_flex() -> Any:
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX
