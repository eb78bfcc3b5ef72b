"""Layout-independent initialisation (`gigafactory.model.init`): a value depends only on (seed, name, global
index), so any block of a tensor filled on its own equals the same block of the whole tensor."""

from __future__ import annotations

import itertools

import torch

from gigafactory.model import GrokModel
from gigafactory.model.init import fill_block, materialize
from gigafactory.specs import PRESETS


def test_any_block_equals_the_slice_of_the_whole() -> None:
    shape = (4, 6, 10)
    whole = torch.empty(shape)
    fill_block(whole, (0, 0, 0), shape, 7, "layers.0.moe.experts.w_up", 0.5)
    # Blocks as tensor, expert and FSDP sharding cut them: along each dimension, and nested.
    for o0, o1, o2 in itertools.product((0, 2), (0, 3), (0, 5)):
        block = torch.empty(2, 3, 5)
        fill_block(block, (o0, o1, o2), shape, 7, "layers.0.moe.experts.w_up", 0.5)
        torch.testing.assert_close(block, whole[o0 : o0 + 2, o1 : o1 + 3, o2 : o2 + 5], rtol=0, atol=0)


def test_values_are_normal_and_depend_on_seed_and_name() -> None:
    shape = (256, 512)
    a, b, c = torch.empty(shape), torch.empty(shape), torch.empty(shape)
    fill_block(a, (0, 0), shape, 0, "w", 1.0)
    fill_block(b, (0, 0), shape, 1, "w", 1.0)
    fill_block(c, (0, 0), shape, 0, "v", 1.0)
    assert abs(float(a.mean())) < 0.01 and abs(float(a.std()) - 1) < 0.01
    assert abs(float((a * b).mean())) < 0.01 and abs(float((a * c).mean())) < 0.01  # independent streams
    assert abs(float((a.flatten()[1:] * a.flatten()[:-1]).mean())) < 0.01  # neighbours uncorrelated


def test_meta_model_materializes_with_the_spec_scales() -> None:
    spec = PRESETS["tiny"]
    with torch.device("meta"):
        model = GrokModel(spec)
    assert all(p.is_meta for p in model.parameters())
    materialize(model, spec, torch.device("cpu"), seed=3)
    params = {k: p.detach() for k, p in model.named_parameters()}
    assert not any(p.is_meta for p in params.values())
    assert torch.equal(params["norm.weight"], torch.ones(spec.d_model))
    emb = params["embed.weight"]
    assert abs(float(emb.std()) * spec.embedding_multiplier - 1) < 0.05
    w = params["layers.0.moe.experts.w_down"]  # [E, ffn, d]: fan-in is the FFN width
    assert abs(float(w.std()) * spec.expert_ffn**0.5 - 1) < 0.05


def test_experts_stored_flat_start_equal_and_compute_the_same() -> None:
    """FSDP over more ranks than d_model splits into stores experts 2-D (`parallel.fsdp.flatten_experts`): the
    same initial values, the same loss and the same gradients as the 3-D weights."""
    import torch.nn.functional as F

    from gigafactory.parallel.fsdp import flatten_experts

    spec = PRESETS["tiny"]
    models = []
    for flat in (False, True):
        with torch.device("meta"):
            model = GrokModel(spec)
        if flat:
            for block in model.layers.values():
                flatten_experts(block.moe.experts, shards=3)  # d_model=128 does not split over 3
        models.append(materialize(model, spec, torch.device("cpu"), seed=5))
    whole, flat = models
    assert flat.layers["0"].moe.experts.w_down.dim() == 2
    x = torch.randint(1, spec.vocab_size, (2, 16))
    grads = []
    for model in models:
        with torch.autocast("cpu", dtype=torch.bfloat16):  # `_grouped_mm` runs in bf16 here
            loss = F.cross_entropy(model(x).flatten(0, 1), x.flatten())
        loss.backward()
        grads.append(loss.detach())
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
    flat_params = dict(flat.named_parameters())

    def as_stored(t: torch.Tensor, k: str) -> torch.Tensor:  # a 3-D weight (or gradient) in the 2-D storage
        return (t.transpose(1, 2) if k.endswith("w_down") else t).flatten(0, 1) if t.dim() == 3 else t

    for k, p in whole.named_parameters():
        torch.testing.assert_close(as_stored(p.detach(), k), flat_params[k].detach(), rtol=0, atol=0)
        torch.testing.assert_close(as_stored(p.grad, k), flat_params[k].grad, rtol=0, atol=0)
