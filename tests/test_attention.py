"""The attention core (`gigafactory.model.attention.attend`) against an obvious oracle written here: full score
matrix, 1/√D, soft-cap c·tanh(x/c), the position rule, softmax. Every path (naive, block-wise with small tiles,
flex eager) gives the oracle's output, and the block-wise path its gradients too."""

from __future__ import annotations

import math

import pytest
import torch

from gigafactory.model.attention import attend, attend_blockwise, attend_flex, attend_naive

CAP = 2.0


def oracle(q, k, v, q_pos, k_pos, k_ok, cap):  # noqa: ANN001, ANN201
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)  # GQA by copying: fine for an oracle
    x = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if cap is not None:
        x = cap * torch.tanh(x / cap)
    qp, kp = q_pos[:, None, :, None], k_pos[:, None, None, :]
    ok = ((kp <= qp) & k_ok[:, None, None, :]) | (kp == qp)
    return x.masked_fill(~ok, float("-inf")).softmax(-1) @ v


def _inputs(t: int = 40, s: int | None = None, seed: int = 0):  # noqa: ANN202
    g = torch.Generator().manual_seed(seed)
    b, h, hkv, d = 2, 4, 2, 8
    s = s or t
    # Large logits (|x| >> CAP) so that the soft-cap changes the result a lot.
    q = (torch.randn(b, h, t, d, generator=g) * 4).requires_grad_()
    k = (torch.randn(b, hkv, s, d, generator=g) * 4).requires_grad_()
    v = torch.randn(b, hkv, s, d, generator=g).requires_grad_()
    pos = torch.arange(s).expand(b, s)
    k_ok = torch.rand(b, s, generator=g) > 0.25
    return q, k, v, pos[:, s - t :], pos, k_ok


PATHS = {
    "naive": attend_naive,
    "blockwise": lambda *a, **kw: attend_blockwise(*a, **kw, block_q=7, block_k=9),
    "dispatch": attend,
}


@pytest.mark.parametrize("cap", [CAP, None])
@pytest.mark.parametrize("path", list(PATHS))
def test_output_and_gradients_match_the_oracle(path: str, cap: float | None) -> None:
    q, k, v, q_pos, k_pos, k_ok = _inputs()
    w = torch.randn(q.shape[-1])  # a loss that weights output features differently
    ref = oracle(q, k, v, q_pos, k_pos, k_ok, cap)
    ref_grads = torch.autograd.grad((ref * w).sum(), [q, k, v])
    out = PATHS[path](q, k, v, q_pos=q_pos, k_pos=k_pos, k_ok=k_ok, softcap=cap)
    grads = torch.autograd.grad((out * w).sum(), [q, k, v])
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    for name, g, r in zip("qkv", grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, atol=2e-4, rtol=1e-3, msg=f"d{name}")


def test_the_softcap_matters_here() -> None:
    """Guards the test above: without the cap the oracle's output is far from the capped one."""
    q, k, v, q_pos, k_pos, k_ok = _inputs()
    capped = oracle(q, k, v, q_pos, k_pos, k_ok, CAP)
    assert (capped - oracle(q, k, v, q_pos, k_pos, k_ok, None)).abs().max() > 0.1


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_eager_forward_matches_the_oracle() -> None:
    q, k, v, q_pos, k_pos, k_ok = (t.detach() for t in _inputs())
    out = attend_flex(q, k, v, q_pos=q_pos, k_pos=k_pos, k_ok=k_ok, softcap=CAP, compiled=False)
    torch.testing.assert_close(out, oracle(q, k, v, q_pos, k_pos, k_ok, CAP), atol=2e-5, rtol=1e-4)


def test_keys_in_any_order_with_their_positions() -> None:
    """Context parallelism and paged caches hand over keys gathered out of order: positions decide the mask."""
    q, k, v, q_pos, k_pos, k_ok = (t.detach() for t in _inputs(t=12, s=30))
    perm = torch.randperm(30, generator=torch.Generator().manual_seed(1))
    ref = oracle(q, k, v, q_pos, k_pos, k_ok, CAP)
    out = attend_blockwise(q, k[:, :, perm], v[:, :, perm], q_pos=q_pos, k_pos=k_pos[:, perm], k_ok=k_ok[:, perm],
                           softcap=CAP, block_q=5, block_k=7)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_blockwise_saves_linear_memory() -> None:
    """What backward keeps is q, k, v, the output and one logsumexp per query: no T×S tensor."""
    q, k, v, q_pos, k_pos, k_ok = _inputs(t=64)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        attend_blockwise(q, k, v, q_pos=q_pos, k_pos=k_pos, k_ok=k_ok, softcap=CAP, block_q=16, block_k=16)
    biggest = max(t.numel() for t in saved)
    assert biggest == q.numel(), [tuple(t.shape) for t in saved]
