"""Expert capacity of the fixed-shape MoE dispatch, defined once for the trainer and the planner (no torch here).

With a capacity factor f, every expert takes at most C = ⌈f · tokens · top_k / n_experts⌉ of the token copies a
rank dispatches in one MoE layer (GShard, Switch Transformer; Megatron-LM's ``--moe-expert-capacity-factor`` with
``--moe-pad-expert-input-to-capacity``): the dispatch always moves n_experts · C rows, padded with zeros, so its
shapes and all-to-all split sizes are known on the host before the router runs. f = n_experts / top_k gives
C = tokens, which no routing can overflow (a token sends at most one copy to each expert).
"""

from __future__ import annotations

import math


def expert_capacity(tokens: float, top_k: int, n_experts: int, factor: float) -> int:
    """Token slots per expert for `tokens` tokens dispatched by one rank: ⌈factor · tokens · top_k / n_experts⌉.
    (Rounded to 1e-9 first, so that e.g. 1.1 · 100 · 2 / 4 is 55 and not 56 through a float error.)"""
    if factor <= 0:
        raise ValueError(f"capacity factor must be positive, not {factor}")
    return max(1, math.ceil(round(factor * tokens * top_k / n_experts, 9)))


def dispatched_rows(tokens: float, top_k: int, n_experts: int, factor: float | None) -> float:
    """Rows one rank's dispatch moves for `tokens` tokens: every routed copy (tokens · top_k) when dropless
    (``factor`` None), else every expert's C slots, used or padding (n_experts · C)."""
    if factor is None:
        return tokens * top_k
    return n_experts * expert_capacity(tokens, top_k, n_experts, factor)
