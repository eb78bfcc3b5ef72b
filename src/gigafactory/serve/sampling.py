"""Per-request sampling parameters, picking each next token, and turning token ids into text with stop sequences.

`next_token` applies, in order (as vLLM does): `logit_bias`, presence/frequency penalties over the tokens
generated so far, the JSON-mode mask, then temperature with `min_p`, `top_k`, `top_p` (`model.sampling.sample`,
the same sampler `generate` uses). Log-probabilities are those of the model's raw distribution (before any of
these), like vLLM's default and OpenAI's reported values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer
from torch import Tensor

from gigafactory.model.sampling import sample
from gigafactory.serve.json_mode import JsonConstraint


@dataclass(frozen=True)
class SamplingParams:
    """What one sequence needs to pick its tokens and to know when to stop. Temperature 0 is greedy."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: int | None = None  # None: none; k: the chosen token's and the k most likely
    json_object: bool = False

    @property
    def plain(self) -> bool:
        """Nothing beyond temperature/top-k/top-p: greedy rows of a batch can share one argmax."""
        return not (
            self.min_p or self.presence_penalty or self.frequency_penalty or self.logit_bias or self.json_object
        )


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely tokens, best first


def processed_logits(
    logits: Tensor, params: SamplingParams, output: list[int], json: JsonConstraint | None, remaining: int
) -> Tensor:
    """[V] logits after bias, penalties and the JSON mask (a new tensor; the input is left alone)."""
    logits = logits.float().clone()
    for token, bias in params.logit_bias:
        if token < logits.shape[0]:
            logits[token] += bias
    if output and (params.presence_penalty or params.frequency_penalty):
        counts = torch.bincount(torch.tensor(output), minlength=logits.shape[0])[: logits.shape[0]].float()
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).float()
    if json is not None:
        logits = logits.masked_fill(~json.mask(logits.shape[0], remaining), float("-inf"))
    return logits


def next_token(
    logits: Tensor,
    params: SamplingParams,
    output: list[int],
    generator: torch.Generator | None,
    json: JsonConstraint | None = None,
    remaining: int = 1 << 30,
) -> tuple[int, TokenLogprob | None]:
    """The next token from one row of logits [V], and its log-probability if asked for."""
    scores = processed_logits(logits, params, output, json, remaining) if not params.plain else logits.float()
    if params.min_p > 0 and params.temperature > 0:  # p_i >= min_p * p_max, in logit space at this temperature
        floor = scores.max() + params.temperature * math.log(params.min_p)
        scores = scores.masked_fill(scores < floor, float("-inf"))
    token = int(sample(scores[None], params.temperature, params.top_k, params.top_p, generator)[0])
    if params.logprobs is None:
        return token, None
    logp = torch.log_softmax(logits.float(), -1)
    top = []
    if params.logprobs > 0:
        values, ids = logp.topk(params.logprobs)
        top = list(zip(ids.tolist(), values.tolist(), strict=True))
    return token, TokenLogprob(token, float(logp[token]), top)


class TextTracker:
    """Decodes the output tokens and finds stop strings.

    Decoding the whole output each time (outputs are at most a context long) sidesteps byte-level BPE's
    split characters. Text is released only when no stop string could still begin in it, and never ends in
    a half-decoded character (U+FFFD), so streamed pieces concatenate to exactly the final text."""

    def __init__(self, tok: Tokenizer, stop: tuple[str, ...]) -> None:
        self.tok = tok
        self.stop = tuple(s for s in stop if s)
        self.sent = 0  # characters already released
        self.text = ""

    def update(self, token_ids: list[int]) -> tuple[str, bool]:
        """(new text safe to release, whether a stop string was hit)."""
        full = self.tok.decode(token_ids)
        hits = [i for i in (full.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.text = full[: min(hits)]
            return self._release(len(self.text)), True
        self.text = full
        safe = len(full)
        while safe > self.sent and full[safe - 1] == "\ufffd":
            safe -= 1
        for s in self.stop:  # hold back a tail that may be the start of a stop string
            for k in range(min(len(s) - 1, safe), 0, -1):
                if full[safe - k : safe] == s[:k]:
                    safe -= k
                    break
        return self._release(max(safe, self.sent)), False

    def finish(self) -> str:
        """Everything not yet released (at the end there is nothing left to wait for)."""
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        piece = self.text[self.sent : upto]
        self.sent = max(self.sent, upto)
        return piece
