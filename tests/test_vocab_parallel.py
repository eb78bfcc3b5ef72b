"""The vocabulary split over tp (`parallel.tensor`) on Grok-2's output path: an untied head, an output multiplier
and a final logit soft-cap (the tied, uncapped path runs in tests/test_parallel.py). Two gloo ranks at tp=2 give
the loss and the embedding/head gradients of one process."""

from __future__ import annotations

import contextlib
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gigafactory.specs.model_spec import PRESETS

SPEC = PRESETS["tiny"].model_copy(update={"tie_embeddings": False, "final_softcap": 3.0, "output_multiplier": 2.0,
                                          "n_layers": 1, "name": "tiny-untied-capped"})
VOCAB_PARAMS = ("embed.weight", "lm_head.weight")


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, SPEC.vocab_size, (2, 17), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def _loss_and_grads(model: torch.nn.Module, group: dist.ProcessGroup | None, targets: torch.Tensor
                    ) -> tuple[float, dict[str, torch.Tensor]]:
    from gigafactory.train.loop import lm_loss

    x, _ = _batch()
    loss = lm_loss(model, x, targets, contextlib.nullcontext(), group)
    loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        if name in VOCAB_PARAMS:
            g = p.grad
            grads[name] = g.full_tensor() if hasattr(g, "full_tensor") else g
    return float(loss), grads


def _one_process() -> tuple[float, dict[str, torch.Tensor]]:
    from gigafactory.model.grok import GrokModel
    from gigafactory.model.init import materialize

    with torch.device("meta"):
        model = GrokModel(SPEC)
    materialize(model, SPEC, torch.device("cpu"), seed=0)
    return _loss_and_grads(model, None, _batch()[1])


def _rank(rank: int, port: int, out: dict) -> None:
    from gigafactory.model.grok import GrokModel
    from gigafactory.parallel import build_meshes, parallelize
    from gigafactory.specs.layout import Layout

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        with torch.device("meta"):
            model = GrokModel(SPEC)
        par = parallelize(model, build_meshes(Layout(tp=2), "cpu"), torch.device("cpu"), 1, 2, 16, seed=0)
        out[rank] = _loss_and_grads(par.model, par.vocab_group, par.targets(_batch()[1]))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_untied_capped_head_under_tp_matches_one_process() -> None:
    ref_loss, ref_grads = _one_process()
    out = mp.Manager().dict()
    mp.spawn(_rank, args=(_free_port(), out), nprocs=2)
    for rank in (0, 1):
        loss, grads = out[rank]
        assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss), (rank, loss, ref_loss)
        for name in VOCAB_PARAMS:
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6)
