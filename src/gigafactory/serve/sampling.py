"""Per-request sampling parameters, and turning a growing list of token ids into text with stop sequences."""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Tokenizer


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
