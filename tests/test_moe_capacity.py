"""The MoE's fixed-shape dispatch with an expert capacity (`TrainConfig.moe_capacity_factor`, `MoE.capacity_dispatch`,
`parallel.expert`): which copies it drops, that it never reads device data on the host (the dropless
expert-parallel dispatch does, and the same check says so), and the planner's bytes for it. Its equivalence on two
gloo ranks with the dropless path and one process is in tests/test_parallel.py (``ep2_capacity``)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from gigafactory.model.grok import Experts, MoE
from gigafactory.parallel.expert import ep_dispatch_compute
from gigafactory.specs import PRESETS

TINY = PRESETS["tiny"]  # 4 experts, top 2


class HostSync(AssertionError):
    pass


class _NoHostSync(TorchDispatchMode):
    """Fails on any op whose result needs tensor *values* on the host: PyTorch tags them `data_dependent_output`
    (item, bool(), int(), equal, ...) or `dynamic_output_shape` (nonzero, bincount, repeat_interleave, unique,
    masked_select, boolean-mask indexing; indexing with integer tensors carries the tag too but has a static
    shape, so it is let through). On a GPU each of these waits for the device."""

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        tags = func.tags
        dynamic = torch.Tag.dynamic_output_shape in tags and not _integer_indexing(func, args)
        if torch.Tag.data_dependent_output in tags or dynamic:
            raise HostSync(f"{func} reads device data on the host")
        return func(*args, **(kwargs or {}))


def _integer_indexing(func: Any, args: tuple) -> bool:
    if func.__name__.split(".")[0] not in ("index", "index_put", "index_put_"):
        return False
    return all(i is None or i.dtype not in (torch.bool, torch.uint8) for i in args[1])


@contextlib.contextmanager
def no_host_sync(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """`_NoHostSync`, plus the reads that bypass the dispatcher on a CPU tensor (``tolist``, ``numpy``)."""

    def refuse(name: str) -> Any:
        def f(*_a: Any, **_k: Any) -> Any:
            raise HostSync(f"Tensor.{name} reads device data on the host")
        return f

    with monkeypatch.context() as m:
        for name in ("tolist", "numpy"):
            m.setattr(torch.Tensor, name, refuse(name))
        with _NoHostSync():
            yield


def _moe(seed: int = 0) -> MoE:
    torch.manual_seed(seed)
    moe = MoE(TINY)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return moe


def _expert(moe: MoE, e: int, x: torch.Tensor) -> torch.Tensor:
    w = moe.experts
    return (F.gelu(x @ w.w_gate[e], approximate="tanh") * (x @ w.w_up[e])) @ w.w_down[e]


def test_small_capacity_drops_the_later_tokens_of_each_expert() -> None:
    """Outputs and expert gradients against a loop over tokens that gives each expert its first C copies."""
    moe = _moe()
    factor = 0.5
    x = torch.randn(3, 8, TINY.d_model)
    flat = x.reshape(-1, TINY.d_model)
    n = flat.shape[0]
    cap = math.ceil(factor * n * TINY.top_k / TINY.n_experts)  # 6 of the 12 a perfectly balanced router sends
    moe.capacity_factor = factor
    y = moe(x).reshape(-1, TINY.d_model)
    y.square().sum().backward()
    got = [p.grad.clone() for p in moe.experts.parameters()]
    moe.zero_grad()

    probs = F.linear(flat, moe.router.weight).softmax(-1)
    ref = torch.zeros_like(flat)
    taken = [0] * TINY.n_experts
    dropped = 0
    for t in range(n):  # tokens in order: an expert keeps the first `cap` copies it is sent
        gates, idx = probs[t].topk(TINY.top_k)
        for g, e in zip(gates, idx.tolist(), strict=True):
            if taken[e] < cap:
                taken[e] += 1
                ref[t] = ref[t] + g * _expert(moe, e, flat[t])
            else:
                dropped += 1
    assert 0 < dropped < n * TINY.top_k and max(taken) == cap  # the case exercises dropping, not everything
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-4)
    ref.square().sum().backward()
    for g, p in zip(got, moe.experts.parameters(), strict=True):  # dropped copies get no gradient either
        assert (g - p.grad).norm() <= 1e-5 * p.grad.norm()


def test_a_capacity_of_every_token_drops_nothing() -> None:
    """factor = n_experts / top_k gives C = tokens: an expert gets at most one copy of each token."""
    moe = _moe(1)
    x = torch.randn(2, 8, TINY.d_model)
    dropless = moe(x)
    moe.capacity_factor = TINY.n_experts / TINY.top_k
    torch.testing.assert_close(moe(x), dropless, atol=1e-6, rtol=1e-5)
    moe.capacity_factor = 0.5 * TINY.n_experts / TINY.top_k
    assert (moe(x) - dropless).abs().max() > 1e-3


@pytest.fixture
def two_fake_ranks() -> Iterator[dist.ProcessGroup]:
    """Rank 0 of 2 on PyTorch's fake process group: collectives are accepted and move nothing (values are
    garbage, shapes are right), which is all a check of host reads needs, in one process."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    assert not dist.is_initialized()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def _ep_layer(group: dist.ProcessGroup, factor: float | None) -> MoE:
    moe = _moe().train()
    moe.lb_weight, moe.z_weight, moe.capacity_factor = 0.01, 1e-3, factor
    ep = group.size()
    moe.experts = Experts(TINY.n_experts // ep, TINY.d_model, TINY.expert_ffn)  # this rank's experts
    for p in moe.experts.parameters():
        torch.nn.init.normal_(p, std=0.1)
    moe.dispatch_compute = lambda x, g, i: ep_dispatch_compute(moe, x, g, i, group)  # type: ignore[method-assign]
    return moe


def test_capacity_dispatch_never_reads_the_device_on_the_host(two_fake_ranks, monkeypatch) -> None:  # noqa: ANN001
    """The whole expert-parallel MoE layer, forward and backward (router, aux losses, all-to-alls, experts)."""
    moe = _ep_layer(two_fake_ranks, 1.25)
    x = torch.randn(2, 8, TINY.d_model, requires_grad=True)
    with no_host_sync(monkeypatch):
        moe(x).sum().backward()
    assert x.grad is not None and moe.experts.w_gate.grad is not None


def test_the_sync_check_catches_the_dropless_dispatch(two_fake_ranks, monkeypatch) -> None:  # noqa: ANN001
    moe = _ep_layer(two_fake_ranks, None)
    x = torch.randn(2, 8, TINY.d_model)
    with pytest.raises(HostSync), no_host_sync(monkeypatch):
        moe(x)
