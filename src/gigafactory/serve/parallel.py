"""Tensor- and expert-parallel inference: `gigafactory serve RUN --tp N [--ep N]` on N ranks under torchrun.

Every rank holds only its shard of the weights and of the paged KV cache:
- attention: rank r keeps query heads and key/value heads r·H/N .. (r+1)·H/N (q/k/v by output rows, o by input
  columns), so its KV-cache pool holds n_kv_heads/N heads; the attention output is summed over ranks;
- experts: with `--tp` each expert's FFN is split by columns (gate/up) and rows (down); with `--ep` each rank
  holds E/N whole experts and computes only the token copies routed to them; either way the MoE output is a sum
  over ranks. The router runs replicated (it is tiny), as do the embedding, the output head and the norms;
- the dense FFN (Grok-2 style) is split like an expert under `--tp`.
That is two all-reduces of a [tokens, d_model] activation per layer (three with a dense FFN), Megatron-style
(no sequence parallelism: a decode step has one token per sequence).

Rank 0 runs the scheduler and the HTTP server exactly as a single-process server does; its model is a
`LockstepModel`, which before each forward broadcasts the batch (a 4-int header, then one int64 tensor with the
tokens, positions, block tables, starts and lengths). The other ranks loop in `follow`: receive, run the same
forward on their shards against their own pool (the block ids are rank 0's, so the pools stay in step), discard
the output. Greedy outputs equal one process's up to float summation order.

The checkpoint is read whole by every rank and sliced (the slices are copied, so the full tensors are freed);
per-rank peak memory at start-up is therefore the full model, resident memory afterwards ≈ 1/N of the sharded
weights plus the replicated ones. `--weights int8` quantises each rank's shard.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
import types
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gigafactory.errors import UserError
from gigafactory.model.grok import GrokModel, MoE
from gigafactory.serve.kv_cache import BlockPool, PagedBatch

log = logging.getLogger(__name__)
_FORWARD, _NOOP, _STOP = 1, 2, 3
_KEEPALIVE_S = 60.0  # an idle rank 0 pings the others so no collective waits long enough to time out


def check_split(model: GrokModel, world: int, ep: bool) -> None:
    spec = model.spec
    problems = []
    if spec.n_kv_heads % world:
        problems.append(f"{spec.n_kv_heads} key/value heads")
    if ep and spec.n_experts % world:
        problems.append(f"{spec.n_experts} experts")
    if not ep and spec.expert_ffn % world:
        problems.append(f"an expert FFN of {spec.expert_ffn}")
    if spec.dense_ffn and spec.dense_ffn % world:
        problems.append(f"a dense FFN of {spec.dense_ffn}")
    if problems:
        raise UserError(f"{spec.name} cannot be split over {world} ranks: {', '.join(problems)} do not divide")


def _take(t: Tensor, dim: int, rank: int, world: int) -> Tensor:
    n = t.shape[dim] // world
    return t.narrow(dim, rank * n, n).clone()


def _set(module: nn.Module, name: str, value: Tensor) -> None:
    module.register_parameter(name, nn.Parameter(value, requires_grad=False))


def shard_model(model: GrokModel, rank: int, world: int, ep: bool) -> None:
    """Keep rank `rank`'s share of every split weight (in place; see the module docstring)."""
    check_split(model, world, ep)
    for block in model.layers.values():
        attn = block.attn
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
            _set(lin, "weight", _take(lin.weight.data, 0, rank, world))
        _set(attn.o_proj, "weight", _take(attn.o_proj.weight.data, 1, rank, world))
        experts = block.moe.experts
        if ep:
            for name in ("w_gate", "w_up", "w_down"):
                _set(experts, name, _take(getattr(experts, name).data, 0, rank, world))
            n_local = model.spec.n_experts // world
            block.moe.dispatch_compute = types.MethodType(_local_experts(rank * n_local, n_local), block.moe)
        else:
            _set(experts, "w_gate", _take(experts.w_gate.data, 2, rank, world))
            _set(experts, "w_up", _take(experts.w_up.data, 2, rank, world))
            _set(experts, "w_down", _take(experts.w_down.data, 1, rank, world))
        if block.dense is not None:
            _set(block.dense.gate, "weight", _take(block.dense.gate.weight.data, 0, rank, world))
            _set(block.dense.up, "weight", _take(block.dense.up.weight.data, 0, rank, world))
            _set(block.dense.down, "weight", _take(block.dense.down.weight.data, 1, rank, world))


def _local_experts(first: int, n_local: int) -> Any:
    """`MoE.dispatch_compute` for a rank holding experts first .. first+n_local-1: the token copies routed to
    them, in the same sorted order as the single-process version, the others left out (summed over ranks)."""

    def dispatch_compute(self: MoE, x: Tensor, gates: Tensor, idx: Tensor) -> Tensor:
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        mine = (flat[order] >= first) & (flat[order] < first + n_local)
        order = order[mine]
        token_of = order // self.top_k
        counts = torch.bincount(flat[order] - first, minlength=n_local).tolist()
        out = self.experts(x[token_of], counts)
        out = out * gates.reshape(-1)[order, None].to(out.dtype)
        return x.new_zeros(x.shape, dtype=out.dtype).index_add_(0, token_of, out)

    return dispatch_compute


def sum_outputs(model: GrokModel, group: dist.ProcessGroup | None = None) -> None:
    """All-reduce the partial outputs of attention, MoE and dense FFN (forward hooks; install after any module
    swaps such as int8 quantisation, which replace submodules but not these)."""

    def hook(module: nn.Module, args: Any, out: Tensor) -> Tensor:
        dist.all_reduce(out, group=group)
        return out

    for block in model.layers.values():
        block.attn.register_forward_hook(hook)
        block.moe.register_forward_hook(hook)
        if block.dense is not None:
            block.dense.register_forward_hook(hook)


def prepare(model: GrokModel, rank: int, world: int, ep: bool, weights: str = "full") -> GrokModel:
    """Shard a loaded model for its rank, quantise the shard if asked, and make it sum over ranks."""
    shard_model(model, rank, world, ep)
    if weights == "int8":
        from gigafactory.interop.int8 import quantize_model

        quantize_model(model)
    sum_outputs(model)
    return model


def local_kv_heads(model: GrokModel, world: int) -> int:
    return model.spec.n_kv_heads // world


class LockstepModel(nn.Module):
    """Rank 0's model: broadcasts each batch to the other ranks, then runs its own shard."""

    def __init__(self, inner: GrokModel, world: int) -> None:
        super().__init__()
        self.inner = inner
        self.spec = inner.spec
        self.kv_heads = local_kv_heads(inner, world)
        self._lock = threading.Lock()
        self._last = time.monotonic()
        self._closed = False
        self._pinger = threading.Thread(target=self._keepalive, name="gigafactory-tp-keepalive", daemon=True)
        self._pinger.start()

    def forward(self, tokens: Tensor, positions: Tensor, cache: PagedBatch, logits_at: Tensor | None = None) -> Tensor:
        b, t = tokens.shape
        nb = cache.tables.shape[1]
        payload = torch.cat([tokens.reshape(-1), positions.reshape(-1), cache.tables.reshape(-1), cache.starts,
                             cache.lengths]).to(torch.int64)  # fmt: skip
        with self._lock:
            dist.broadcast(torch.tensor([_FORWARD, b, t, nb], dtype=torch.int64), 0)
            dist.broadcast(payload, 0)
            self._last = time.monotonic()
            return self.inner(tokens, positions, cache, logits_at)

    def _send(self, op: int) -> None:
        with self._lock:
            if not self._closed:
                dist.broadcast(torch.tensor([op, 0, 0, 0], dtype=torch.int64), 0)
                self._last = time.monotonic()
                self._closed = op == _STOP

    def _keepalive(self) -> None:
        while not self._closed:
            time.sleep(1.0)
            if time.monotonic() - self._last > _KEEPALIVE_S:
                self._send(_NOOP)

    def close(self) -> None:
        """Tell the other ranks to leave `follow`."""
        self._send(_STOP)


class _FollowerBatch(PagedBatch):
    """A `PagedBatch` rebuilt from rank 0's broadcast (same block ids, this rank's pool)."""

    def __init__(self, pool: BlockPool, tables: Tensor, starts: Tensor, lengths: Tensor) -> None:
        self.pool, self.tables, self.starts, self.lengths = pool, tables, starts, lengths
        self._slots = None


def follow(model: GrokModel, pool: BlockPool) -> int:
    """The loop of ranks 1..N-1: run every forward rank 0 announces, until it says stop. Returns the number of
    forwards run."""
    model.output = lambda h: h[..., :0]  # type: ignore[method-assign]  # rank 0 alone needs the logits
    header = torch.zeros(4, dtype=torch.int64)
    steps = 0
    with torch.inference_mode():
        while True:
            dist.broadcast(header, 0)
            op, b, t, nb = header.tolist()
            if op == _STOP:
                return steps
            if op == _NOOP:
                continue
            payload = torch.empty(2 * b * t + b * nb + 2 * b, dtype=torch.int64)
            dist.broadcast(payload, 0)
            tokens, positions, tables, starts, lengths = payload.split([b * t, b * t, b * nb, b, b])
            batch = _FollowerBatch(pool, tables.view(b, nb), starts, lengths)
            model(tokens.view(b, t), positions.view(b, t), batch)
            steps += 1


# -- the command ---------------------------------------------------------------------------------------------


def _relaunch(world: int) -> None:
    """Not under torchrun yet: start `world` local ranks running this same command."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
           "-m", "gigafactory", *sys.argv[1:]]  # fmt: skip
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **os.environ}
    raise SystemExit(subprocess.call(cmd, env=env))


def ranks_for(tp: int, ep: int) -> tuple[int, bool]:
    """(ranks, experts whole?) from --tp/--ep: one group of N ranks; --ep N means whole experts per rank."""
    if tp > 1 and ep > 1 and tp != ep:
        raise UserError(f"--tp {tp} --ep {ep}: the ranks are one group, so give the same N to both (or one)")
    return max(tp, ep), ep > 1


def serve_parallel(run_dir: Any, tp: int, ep: int, host: str, port: int, cards_dir: Any, config: Any,
                   health_timeout: float, weights: str, options: Any = None) -> None:  # fmt: skip
    world, whole_experts = ranks_for(tp, ep)
    if "WORLD_SIZE" not in os.environ:
        _relaunch(world)
    if int(os.environ["WORLD_SIZE"]) != world:
        raise UserError(f"started with {os.environ['WORLD_SIZE']} ranks but --tp/--ep ask for {world}")
    import uvicorn

    from gigafactory.runs import load_for_inference
    from gigafactory.serve.api import ServerState, create_app
    from gigafactory.serve.engine import Engine
    from gigafactory.serve.metrics import ServeMetrics
    from gigafactory.serve.personas import load_all

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=4 * _KEEPALIVE_S))
    rank = dist.get_rank()
    torch.set_num_threads(config.threads)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    model, tok, _ = load_for_inference(run_dir, device=device, quiet=rank != 0)
    prepare(model, rank, world, whole_experts, weights)
    try:
        if rank == 0:
            lockstep = LockstepModel(model, world)
            engine = Engine(lockstep, tok, config, ServeMetrics())
            n_blocks = torch.tensor([engine.pool.num_blocks], dtype=torch.int64)
            dist.broadcast(n_blocks, 0)
            state = ServerState(engine, tok, load_all(run_dir, cards_dir), health_timeout, int(time.time()))
            print(f"serving {len(state.personas)} personas from {run_dir} on {world} ranks "
                  f"({'ep' if whole_experts else 'tp'}={world}) at http://{host}:{port}/v1", flush=True)  # fmt: skip
            try:
                uvicorn.run(create_app(state, options), host=host, port=port, log_level="warning")
            finally:
                lockstep.close()
        else:
            n_blocks = torch.zeros(1, dtype=torch.int64)
            dist.broadcast(n_blocks, 0)
            dtype = next(model.parameters()).dtype
            pool = BlockPool(model.spec, int(n_blocks), config.block_size, device, dtype,
                             local_kv_heads(model, world))  # fmt: skip
            follow(model, pool)
    finally:
        dist.destroy_process_group()
