"""One rank of the tensor/expert-parallel serving test (started by torchrun from tests/test_serve_parallel.py;
holds no tests itself). Rank 0 runs the engine twice on the same prompts, greedy: once with the whole model in
this process (the reference), once over all ranks (`--tp N`, then `--tp N --ep N`); it writes both outputs and
every rank's resident weight bytes to OUT."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from gigafactory.interop.int8 import weight_bytes
from gigafactory.runs import load_for_inference
from gigafactory.serve.engine import Engine, EngineConfig
from gigafactory.serve.kv_cache import BlockPool
from gigafactory.serve.parallel import LockstepModel, follow, local_kv_heads, prepare
from gigafactory.serve.sampling import SamplingParams

PROMPTS = ["ROMEO:\nBut soft", "JULIET:\nO Romeo", "Good morrow, cousin", "What light"]


def generate(engine: Engine, prompts: list[list[int]], n: int) -> list[str]:
    """Greedy texts of every prompt, all in flight together (continuous batching, mixed prefill and decode)."""
    texts = [""] * len(prompts)
    finished: set[int] = set()

    def sink_for(i):
        def sink(o):
            texts[i] += o.text
            if o.finish_reason is not None:
                finished.add(i)

        return sink

    for i, p in enumerate(prompts):
        engine.add(p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True), sink_for(i))
    while len(finished) < len(prompts):
        engine.step()
    return texts


def replicated_bytes(model) -> int:
    """Weights every rank keeps whole: embedding, output head, norms, routers."""
    split = ("attn.", "experts.", "dense.")
    kept = [p for name, p in model.named_parameters() if not any(s in name for s in split)]
    return sum(p.numel() * p.element_size() for p in kept)


def main() -> None:
    run_dir, out_path = Path(sys.argv[1]), Path(sys.argv[2])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    config = EngineConfig(max_batch=4, kv_cache_mb=1.0, block_size=4, step_tokens=8)
    result: dict = {}
    full_bytes = None
    for mode in ("tp", "ep"):
        model, tok, _ = load_for_inference(run_dir, quiet=True)
        full_bytes, result["replicated_bytes"] = weight_bytes(model), replicated_bytes(model)
        prompts = [tok.encode(p).ids for p in PROMPTS]
        if rank == 0 and mode == "tp":
            ref = Engine(model, tok, config)
            result["reference"] = generate(ref, prompts, 12)
        prepare(model, rank, world, ep=mode == "ep")
        bytes_here = weight_bytes(model)
        if rank == 0:
            lockstep = LockstepModel(model, world)
            engine = Engine(lockstep, tok, config)
            dist.broadcast(torch.tensor([engine.pool.num_blocks]), 0)
            result[mode] = generate(engine, prompts, 12)
            result[f"{mode}_pool_heads"] = engine.pool.k.shape[2]
            lockstep.close()
        else:
            n_blocks = torch.zeros(1, dtype=torch.int64)
            dist.broadcast(n_blocks, 0)
            pool = BlockPool(
                model.spec,
                int(n_blocks),
                config.block_size,
                torch.device("cpu"),
                torch.float32,
                local_kv_heads(model, world),
            )
            steps = follow(model, pool)
            assert steps > 0
        sizes = [None] * world
        dist.all_gather_object(sizes, bytes_here)
        result[f"{mode}_bytes"] = sizes
    result["full_bytes"] = full_bytes
    result["n_kv_heads"] = model.spec.n_kv_heads
    if rank == 0:
        out_path.write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
