"""Run a module's unchanged forward on the local shards of its DTensor parameters.

Sharded weights are stored as DTensors (so FSDP2 composes with them and DCP saves their global shapes, which is
what lets a checkpoint reshard), but activations stay plain tensors and the collectives are explicit
(`parallel.comm`). The module's forward is wrapped: it swaps each listed parameter for ``param.to_local()``
(optionally so that its gradient is summed over a group, or scaled), runs, and puts the parameter back. Autograd
carries the local gradient back into the DTensor parameter, with the parameter's own placement.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from gigafactory.parallel.comm import all_reduce_grad, scale_grad


def _local(p: Tensor, reduce_group: dist.ProcessGroup | None, grad_scale: float) -> Tensor:
    t = p.to_local() if isinstance(p, DTensor) else p
    if reduce_group is not None:
        t = all_reduce_grad(t, reduce_group)
    return scale_grad(t, grad_scale)


def _wrap_forward(module: nn.Module, wrapper: Callable[..., Any]) -> None:
    """Wrap the instance's forward (not hooks: a checkpointed forward must redo the swap when it recomputes)."""
    inner = module.forward
    module.forward = types.MethodType(lambda _self, *a, **k: wrapper(inner, *a, **k), module)  # type: ignore


def use_local_params(
    owner: nn.Module,
    params: list[tuple[nn.Module, str]],
    reduce_group: dist.ProcessGroup | None = None,
    grad_scale: float = 1.0,
) -> None:
    """While `owner` runs forward, each (module, name) in `params` reads as its local shard."""

    def run(inner: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        saved = [mod._parameters[name] for mod, name in params]
        try:
            for (mod, name), p in zip(params, saved, strict=True):
                # A plain tensor in _parameters for the span of the forward: the model's attribute reads get the
                # shard; the Parameter is back before anything iterates parameters again.
                mod._parameters[name] = _local(p, reduce_group, grad_scale)  # type: ignore[arg-type,assignment]
            return inner(*args, **kwargs)
        finally:
            for (mod, name), p in zip(params, saved, strict=True):
                mod._parameters[name] = p

    _wrap_forward(owner, run)


def wrap_io(
    module: nn.Module,
    before: Callable[[Tensor], Tensor] | None = None,
    after: Callable[[Tensor], Tensor] | None = None,
) -> None:
    """Transform a module's first positional input and its output (e.g. gather / reduce-scatter a sequence)."""

    def run(inner: Callable[..., Any], x: Tensor, *args: Any, **kwargs: Any) -> Any:
        out = inner(before(x) if before else x, *args, **kwargs)
        return after(out) if after else out

    _wrap_forward(module, run)
