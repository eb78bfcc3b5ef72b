"""One persona's reply from a run directory's newest checkpoint (used by `gigafactory chat` and the demo)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from gigafactory.model.generate import generate
from gigafactory.personas import resolve, speech_prompt
from gigafactory.runs import load_for_inference, load_run_spec

END_OF_SPEECH = "\n\n"


class ChatSession:
    def __init__(self, run_dir: Path, persona: str, weights: str = "full") -> None:
        load_run_spec(run_dir)  # "not a run directory" before anything about personas
        self.persona = resolve(run_dir, persona)
        self.model, self.tok, self.step = load_for_inference(run_dir, weights=weights)
        self.history: list[tuple[str, str]] = []

    def reply(
        self,
        message: str,
        max_tokens: int = 120,
        temperature: float = 0.8,
        top_k: int = 0,
        top_p: float = 0.95,
        seed: int | None = None,
    ) -> Iterator[str]:
        """Stream the persona's answer as text pieces; the turn ends at a blank line (end of a speech)."""
        self.history.append(("user", message))
        ids = self.tok.encode(speech_prompt(self.persona, self.history)).ids
        out: list[int] = []
        shown = ""

        def stop(generated: list[int]) -> bool:
            return END_OF_SPEECH in self.tok.decode(generated)

        for t in generate(self.model, ids, max_tokens, temperature, top_k, top_p, seed, stop):
            out.append(t)
            text = self.tok.decode(out).split(END_OF_SPEECH)[0]
            # Hold back what may still change: half a UTF-8 character, or a newline that may open a blank line.
            settled = text.rstrip("\ufffd").rstrip("\n")
            if len(settled) > len(shown):
                yield settled[len(shown) :]
                shown = settled
        self.history.append(("persona", shown))
