import math

import torch
import torch.nn.functional as F

from gigafactory.model import GrokModel, KVCache
from gigafactory.model.grok import MoE, apply_rope, causal_mask, key_positions, rope_tables
from gigafactory.model.sampling import sample
from gigafactory.specs import PRESETS, ModelSpec

TINY = PRESETS["tiny"]


def test_cached_decoding_gives_the_same_logits_as_recomputing():
    torch.manual_seed(0)
    model = GrokModel(TINY).eval()
    x = torch.randint(1, TINY.vocab_size, (2, 24))
    with torch.no_grad():
        full = model(x)
        cache = KVCache(TINY, 2, 32, torch.device("cpu"), torch.float32)
        pieces = [model(x[:, :10], torch.arange(10).expand(2, 10), cache)]
        for i in range(10, 24):
            pieces.append(model(x[:, i : i + 1], torch.full((2, 1), i), cache))
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-4, rtol=1e-4)


def test_padding_is_never_attended_to():
    torch.manual_seed(0)
    model = GrokModel(TINY).eval()
    x = torch.randint(1, TINY.vocab_size, (1, 12))
    padded = x.clone()
    padded[0, 3] = 0
    other = padded.clone()
    with torch.no_grad():
        a, b = model(padded), model(other.index_fill_(1, torch.tensor([3]), 0))
    torch.testing.assert_close(a, b)
    mask = causal_mask(padded)
    assert not mask[0, 0, 5, 3] and mask[0, 0, 3, 3] and mask[0, 0, 5, 2] and not mask[0, 0, 2, 5]


def test_rope_is_half_split_rotation_preserving_norms_and_relative():
    pos = torch.arange(6)[None]
    cos, sin = rope_tables(pos, 8, 10_000.0)
    q = torch.randn(1, 1, 6, 8)
    rq = apply_rope(q, cos, sin)
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1))
    # Half-split: dimension i pairs with i + D/2, first frequency is 1 rad per position.
    v = torch.zeros(1, 1, 6, 8)
    v[..., 0] = 1.0
    out = apply_rope(v, cos, sin)
    torch.testing.assert_close(out[0, 0, :, 0], torch.cos(pos[0].float()))
    torch.testing.assert_close(out[0, 0, :, 4], torch.sin(pos[0].float()))


def test_attention_logits_are_soft_capped():
    """The model's attention equals capped attention computed by hand, and is far from the uncapped one."""
    spec = ModelSpec(**{**TINY.model_dump(), "attn_softcap": 0.5})
    torch.manual_seed(0)
    model = GrokModel(spec).eval()
    attn = model.layers["0"].attn
    with torch.no_grad():
        attn.q_proj.weight.mul_(100)  # large logits: the cap decides the attention pattern
    x = torch.randn(1, 6, spec.d_model)
    tokens = torch.ones(1, 6, dtype=torch.long)
    keys = key_positions(tokens)
    cos, sin = rope_tables(keys.q_pos, spec.head_dim, spec.rope_theta)
    with torch.no_grad():
        got = attn(x, cos, sin, keys, None)
        q = apply_rope(attn.q_proj(x).view(1, 6, -1, spec.head_dim).transpose(1, 2), cos, sin)
        k = apply_rope(attn.k_proj(x).view(1, 6, -1, spec.head_dim).transpose(1, 2), cos, sin)
        v = attn.v_proj(x).view(1, 6, -1, spec.head_dim).transpose(1, 2)
        group = spec.n_heads // spec.n_kv_heads
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        logits = q @ k.transpose(-1, -2) / math.sqrt(spec.head_dim)
        causal = causal_mask(tokens)

        def by_hand(scores):
            out = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v
            return attn.o_proj(out.transpose(1, 2).reshape(1, 6, -1))

        capped, uncapped = by_hand(0.5 * torch.tanh(logits / 0.5)), by_hand(logits)
    assert logits.abs().max() > 10
    torch.testing.assert_close(got, capped, atol=1e-5, rtol=1e-4)
    assert (got - uncapped).abs().max() > 0.1


def test_moe_matches_a_per_token_reference():
    torch.manual_seed(0)
    moe = MoE(TINY)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(2, 5, TINY.d_model)
    y = moe(x)
    flat = x.reshape(-1, TINY.d_model)
    probs = F.linear(flat, moe.router.weight).softmax(-1)
    ref = torch.zeros_like(flat)
    w = moe.experts
    for n in range(flat.shape[0]):  # the obvious loop over tokens, for reference only
        gates, idx = probs[n].topk(TINY.top_k)
        for g, e in zip(gates, idx, strict=True):
            h = F.gelu(flat[n] @ w.w_gate[e], approximate="tanh") * (flat[n] @ w.w_up[e])
            ref[n] += g * (h @ w.w_down[e])  # gates are not renormalised
    torch.testing.assert_close(y.reshape(-1, TINY.d_model), ref, atol=1e-5, rtol=1e-4)


def test_aux_losses_reach_the_router_gradient():
    torch.manual_seed(0)
    x = torch.randn(2, 8, TINY.d_model)
    grads = []
    for lb in (0.0, 1.0):
        torch.manual_seed(1)
        moe = MoE(TINY).train()
        for p in moe.parameters():
            torch.nn.init.normal_(p, std=0.1)
        moe.lb_weight = lb
        moe.z_weight = lb
        moe(x).sum().backward()
        grads.append(moe.router.weight.grad.clone())
    assert not torch.allclose(grads[0], grads[1])
    assert moe.last_stats["lb_loss"] >= 1.0 - 1e-6  # E·Σ f·P is at least 1 for a top-k router... on average


def test_grok2_style_dense_ffn_and_final_softcap_run():
    spec = ModelSpec(**{**TINY.model_dump(), "dense_ffn": 64, "final_softcap": 5.0, "router_softcap": 3.0,
                        "tie_embeddings": False})
    model = GrokModel(spec)
    logits = model(torch.randint(1, spec.vocab_size, (1, 7)))
    assert logits.abs().max() <= 5.0
    assert sum(p.numel() for p in model.parameters()) == spec.params_total


def test_bf16_autocast_runs_and_stays_close():
    torch.manual_seed(0)
    model = GrokModel(TINY)
    x = torch.randint(1, TINY.vocab_size, (2, 16))
    ref = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(x)
    assert low.dtype == torch.float32
    assert (low - ref).abs().max() < 0.1 * ref.abs().max() + 0.05


def test_sampling_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    assert sample(logits, temperature=0).item() == 3
    gen = torch.Generator().manual_seed(0)
    draws = {sample(logits, 1.0, top_k=2, generator=gen).item() for _ in range(200)}
    assert draws == {2, 3}
    # top_p: the top token has ~64% of the mass, so p=0.5 keeps only it.
    assert {sample(logits, 1.0, top_p=0.5, generator=gen).item() for _ in range(50)} == {3}
    probs = logits.softmax(-1)[0]
    assert math.isclose(probs[3].item(), 0.6439, abs_tol=1e-3)


def test_moe_dispatch_never_waits_for_the_host():
    """Under fake tensors there are no values, so anything that reads one on the host (`.tolist()`, `.item()`,
    `float()`, a data-dependent shape such as `bincount`'s) raises: forward and backward must not."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # bf16: the dtype PyTorch's grouped matmul has meta kernels for
    try:
        with mode:
            moe = MoE(TINY).train()
            moe.lb_weight, moe.z_weight = 0.01, 1e-3
            x = torch.randn(2, 16, TINY.d_model, requires_grad=True)
            y = moe(x)
            y.sum().backward()
    finally:
        torch.set_default_dtype(default)
    assert y.shape == x.shape and x.grad is not None


def test_recompute_gives_the_same_loss_and_gradients():
    """`selective` (norms and gated activations redone in backward) and `full` recompute are exact: the same loss
    and gradients as keeping every activation, on a block with a dense FFN beside the MoE (grok-2's)."""
    from gigafactory.parallel import apply_recompute

    spec = PRESETS["tiny"].model_copy(update={"dense_ffn": 256})
    tokens = torch.randint(1, spec.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    results = []
    for mode in ("none", "selective", "full"):
        torch.manual_seed(0)
        model = GrokModel(spec)
        apply_recompute(model, mode)
        loss = F.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    for loss, grads in results[1:]:
        assert torch.equal(loss, results[0][0])
        for name, g in grads.items():
            assert torch.allclose(g, results[0][1][name], rtol=0, atol=1e-6), name
