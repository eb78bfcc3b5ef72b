"""Communication: the differentiable collectives the parallel styles are built from, and a byte counter.

The counter is a `TorchDispatchMode`, so it sees every c10d collective that reaches the dispatcher — ours, FSDP2's
and the pipeline schedule's point-to-point sends — without patching torch. It counts payload bytes per rank with
the planner's convention (`plan.costmodel.collective_bytes`): all_gather = gathered output, reduce_scatter = input,
all_reduce = tensor, all_to_all = input, send_recv = bytes sent. Groups of one rank move nothing and are skipped.
Scalar bookkeeping (loss averaging for the log, the global gradient norm) runs under `counter.bookkeeping()` and is
reported as ``other`` so it does not blur the comparison with the planner, which does not model it.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

_c10d = torch.ops.c10d


def _nbytes(t: Any) -> int:
    if isinstance(t, Tensor):
        return t.numel() * t.element_size()
    if isinstance(t, (list, tuple)):
        return sum(_nbytes(x) for x in t)
    return 0


# op -> (kind, index of the argument whose bytes count)
_OPS: dict[Any, tuple[str, int]] = {
    _c10d._allgather_base_.default: ("all_gather", 0),
    _c10d.allgather_.default: ("all_gather", 0),
    _c10d.allgather_into_tensor_coalesced_.default: ("all_gather", 0),
    _c10d._reduce_scatter_base_.default: ("reduce_scatter", 1),
    _c10d.reduce_scatter_.default: ("reduce_scatter", 1),
    _c10d.reduce_scatter_tensor_coalesced_.default: ("reduce_scatter", 1),
    _c10d.allreduce_.default: ("all_reduce", 0),
    _c10d.allreduce_coalesced_.default: ("all_reduce", 0),
    _c10d.alltoall_base_.default: ("all_to_all", 1),
    _c10d.alltoall_.default: ("all_to_all", 1),
    _c10d.send.default: ("send_recv", 0),
    _c10d.broadcast_.default: ("broadcast", 0),
}


def _group_size(args: Sequence[Any]) -> int:
    for a in args:
        if isinstance(a, dist.ProcessGroup):
            return a.size()
    return 2  # unknown: count it


class CommCounter(TorchDispatchMode):
    """Bytes per collective kind moved by this rank while the mode is active."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._bookkeeping = 0

    @contextlib.contextmanager
    def bookkeeping(self) -> Iterator[None]:
        self._bookkeeping += 1
        try:
            yield
        finally:
            self._bookkeeping -= 1

    def reset(self) -> None:
        self.bytes.clear()
        self.calls.clear()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        hit = _OPS.get(func)
        if hit is not None and _group_size(args) > 1:
            kind = "other" if self._bookkeeping else hit[0]
            self.bytes[kind] += _nbytes(args[hit[1]])
            self.calls[kind] += 1
        return func(*args, **(kwargs or {}))


# ---- differentiable collectives on plain tensors ------------------------------------------------------------
# torch 2.13 renamed the tensor forms (`*_single`); keep working on releases that only have the old names.
_all_gather = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
_reduce_scatter = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)

def _gather_dim(x: Tensor, dim: int, group: dist.ProcessGroup) -> Tensor:
    n = group.size()
    x = x.movedim(dim, 0).contiguous()
    out = x.new_empty((n * x.shape[0], *x.shape[1:]))
    _all_gather(out, x, group=group)
    return out.movedim(0, dim)


def _reduce_scatter_dim(x: Tensor, dim: int, group: dist.ProcessGroup) -> Tensor:
    n = group.size()
    x = x.movedim(dim, 0).contiguous()
    out = x.new_empty((x.shape[0] // n, *x.shape[1:]))
    _reduce_scatter(out, x, op=dist.ReduceOp.SUM, group=group)
    return out.movedim(0, dim)


class _GatherSeq(torch.autograd.Function):
    """Sequence-parallel region entry: all-gather along `dim` forward, reduce-scatter (sum) backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, dim: int, group: dist.ProcessGroup) -> Tensor:  # type: ignore[override]
        ctx.dim, ctx.group = dim, group
        return _gather_dim(x, dim, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        return _reduce_scatter_dim(grad, ctx.dim, ctx.group), None, None


class _ScatterSeq(torch.autograd.Function):
    """Sequence-parallel region exit: reduce-scatter partial sums forward, all-gather backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, dim: int, group: dist.ProcessGroup) -> Tensor:  # type: ignore[override]
        ctx.dim, ctx.group = dim, group
        return _reduce_scatter_dim(x, dim, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        return _gather_dim(grad, ctx.dim, ctx.group), None, None


class _AllReduceGrad(torch.autograd.Function):
    """Identity forward; backward sums the gradient over `group` (a value replicated over ranks that each saw
    only part of the data, e.g. a norm weight under sequence parallelism)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: dist.ProcessGroup) -> Tensor:  # type: ignore[override]
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, factor: float) -> Tensor:  # type: ignore[override]
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad * ctx.factor, None


class _AllToAll(torch.autograd.Function):
    """`all_to_all_single` with uneven splits; backward sends the gradients back along the reverse splits."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup
    ) -> Tensor:
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:  # type: ignore[override]
        out = grad.new_empty((sum(ctx.in_splits), *grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), ctx.in_splits, ctx.out_splits, group=ctx.group)
        return out, None, None, None


def gather_seq(x: Tensor, group: dist.ProcessGroup, dim: int = 1) -> Tensor:
    return _GatherSeq.apply(x, dim, group)


def scatter_seq(x: Tensor, group: dist.ProcessGroup, dim: int = 1) -> Tensor:
    return _ScatterSeq.apply(x, dim, group)


def all_reduce_grad(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    return _AllReduceGrad.apply(x, group)


def scale_grad(x: Tensor, factor: float) -> Tensor:
    return x if factor == 1 else _ScaleGrad.apply(x, factor)


def all_to_all(x: Tensor, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup) -> Tensor:
    return _AllToAll.apply(x, out_splits, in_splits, group)
