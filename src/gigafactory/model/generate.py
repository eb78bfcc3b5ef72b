"""Incremental decoding with a KV cache: the prompt is encoded once, then one token per forward."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from gigafactory.model.grok import GrokModel, KVCache
from gigafactory.model.sampling import sample


@torch.no_grad()
def generate(
    model: GrokModel,
    prompt: list[int],
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: Callable[[list[int]], bool] | None = None,
) -> Iterator[int]:
    """Yield new token ids until `max_new_tokens` or `stop(generated_so_far)` is true."""
    spec = model.spec
    device = next(model.parameters()).device
    prompt = prompt[-(spec.max_seq_len - 1) :]  # keep the most recent context that fits
    budget = min(max_new_tokens, spec.max_seq_len - len(prompt))
    if budget <= 0 or not prompt:
        return
    gen = torch.Generator(device=device)
    gen.manual_seed(seed if seed is not None else torch.seed())
    cache = KVCache(spec, 1, len(prompt) + budget, device, next(model.parameters()).dtype)
    tokens = torch.tensor([prompt], device=device)
    logits = model(tokens, torch.arange(len(prompt), device=device)[None], cache)[:, -1]
    out: list[int] = []
    for i in range(budget):
        nxt = sample(logits, temperature, top_k, top_p, gen)
        out.append(int(nxt))
        yield out[-1]
        if (stop and stop(out)) or i == budget - 1:
            return
        pos = torch.tensor([[len(prompt) + i]], device=device)
        logits = model(nxt[:, None], pos, cache)[:, -1]
