"""One persona's reply from a run directory's newest checkpoint (used by `gigafactory chat` and the demo).

There is one generation path: a `ChatSession` runs the serving engine in-process (a batch of one), with the
server's prompt template (`serve.personas.Persona.render`, including its truncation policy) and its stop
handling, so `gigafactory chat` and `gigafactory serve` give the same tokens for the same request.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator
from pathlib import Path

from gigafactory.personas import resolve
from gigafactory.runs import load_for_inference, load_run_spec

END_OF_SPEECH = "\n\n"


class ChatSession:
    def __init__(self, run_dir: Path, persona: str, weights: str = "full") -> None:
        from gigafactory.serve.engine import Engine, EngineConfig
        from gigafactory.serve.kv_cache import BlockPool
        from gigafactory.serve.personas import Persona

        load_run_spec(run_dir)  # "not a run directory" before anything about personas
        self.persona = resolve(run_dir, persona)
        self.model, self.tok, self.step = load_for_inference(run_dir, weights=weights)
        spec = self.model.spec
        block = 16
        per_block = BlockPool.bytes_per_block(spec, block, next(self.model.parameters()).dtype)
        need_mb = 2 * per_block * -(-spec.max_seq_len // block) / 2**20  # one full context, twice over
        self.engine = Engine(self.model, self.tok, EngineConfig(max_batch=1, kv_cache_mb=need_mb, block_size=block))
        self._persona = Persona(name=self.persona)
        self.history: list[tuple[str, str]] = []

    def prompt(self, max_tokens: int) -> list[int]:
        """The conversation so far as the server renders it, oldest speeches cut to leave room for the reply."""
        context = self.model.spec.max_seq_len
        budget = context - max(1, min(max_tokens, context // 4))
        text = self._persona.render(self.history, 0, lambda s: len(self.tok.encode(s).ids), budget)
        return self.tok.encode(text).ids

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
        from gigafactory.serve.sampling import SamplingParams

        self.history.append(("user", message))
        ids = self.prompt(max_tokens)
        params = SamplingParams(
            max_tokens=min(max_tokens, self.model.spec.max_seq_len - len(ids)),
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop=(END_OF_SPEECH,),
        )
        pieces: queue.Queue = queue.Queue()
        if not self.engine.alive():
            self.engine.start()
        seq_id = self.engine.add(ids, params, pieces.put)
        shown = ""
        try:
            while True:
                out = pieces.get()
                if out.finish_reason in ("error", "abort"):
                    raise RuntimeError(f"generation failed ({out.finish_reason})")
                if out.text:
                    shown += out.text
                    yield out.text
                if out.finish_reason is not None:
                    break
        finally:
            self.engine.abort(seq_id)  # a no-op when it finished; frees it if the caller stopped early
            self.history.append(("assistant", shown))

    def close(self) -> None:
        self.engine.stop()
