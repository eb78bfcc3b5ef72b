"""The serving class behind the routes: requests in, engine sequences, OpenAI-shaped responses out.

Everything slow happens off the event loop: parsing and validating a body, rendering a persona's prompt and
tokenising it run in a small thread pool, so `/health` and every stream keep answering while a multi-megabyte
prompt is refused. A request's sequences (n > 1) are submitted to the engine together and count as one request
against `--max-queue`. A stream sends its headers and first chunk at once and a keep-alive comment whenever it
has been quiet for `keepalive_s` (clients with short read timeouts give up on a silent queued stream).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.background import BackgroundTask
from tokenizers import Tokenizer

from gigafactory.chat import END_OF_SPEECH
from gigafactory.serve.engine import Engine, Output, QueueFull
from gigafactory.serve.engine_process import EngineProcess
from gigafactory.serve.limits import CallerLimits
from gigafactory.serve.personas import Persona, PromptTooLong
from gigafactory.serve.sampling import SamplingParams, TokenLogprob
from gigafactory.serve.schemas import MAX_N, ChatRequest, CompletionRequest, Sampling

M = TypeVar("M", bound=BaseModel)
Job = tuple[list[int], SamplingParams]
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for text completions


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def validation_error(err: ValidationError) -> APIError:
    """The first problem of a pydantic error as a 400 naming the field."""
    first = err.errors()[0]
    loc = [str(p) for p in first.get("loc", ())]
    param = ".".join(loc) or None
    kind = first.get("type", "")
    if kind == "json_invalid":
        return APIError(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}")
    if kind == "unsupported_parameter":
        field_name = first.get("ctx", {}).get("field")
        full = ".".join([*loc, field_name]) if field_name else param
        return APIError(400, str(first["msg"]), param=full, code="unsupported_parameter")
    if kind == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {param}", param=param, code="unknown_parameter")
    msg = f"{param}: {first['msg']}" if param else str(first["msg"])
    return APIError(400, msg, param=param, code="invalid_value")


@dataclass
class Lease:
    """A caller's slot, released once (when the response is done, streamed or not)."""

    limits: CallerLimits
    caller: str
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.limits.release(self.caller)


@dataclass
class Serving:
    engine: Engine | EngineProcess
    tok: Tokenizer
    personas: dict[str, Persona]
    limits: CallerLimits = field(default_factory=CallerLimits)
    keepalive_s: float = 5.0
    workers: int = 2
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="gigafactory-prepare")
        self.context = self.engine.spec.max_seq_len
        # A token stands for at most this many characters: longer texts cannot fit, whatever they say.
        self.max_token_chars = max(len(self.tok.decode([i])) for i in range(self.tok.get_vocab_size())) or 1
        self._token_bytes: dict[int, bytes] = {}

    async def off_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def parse(self, request: Request, model: type[M]) -> M:
        body = await request.body()
        try:
            return await self.off_loop(model.model_validate_json, body)
        except ValidationError as err:
            raise validation_error(err) from None

    def lease(self, caller: str) -> Lease:
        wait = self.limits.acquire(caller)
        if wait is not None:
            raise APIError(
                429,
                f"too many requests from this caller; retry in {wait:g} s",
                "rate_limit_error",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(int(wait))},
            )
        return Lease(self.limits, caller)

    # -- personas and prompts ---------------------------------------------------------------------------

    def persona_of(self, model: str) -> Persona:
        persona = self.personas.get(model.strip().lower())
        if persona is None:
            raise APIError(
                404,
                f"The model '{model[:100]}' does not exist; GET /v1/models lists the personas",
                param="model",
                code="model_not_found",
            )
        return persona

    def count_tokens(self, text: str) -> int:
        if len(text) > self.context * self.max_token_chars:  # certainly too long: do not tokenise megabytes
            return self.context + 1 + len(text) // self.max_token_chars
        return len(self.tok.encode(text).ids)

    def reply_room(self, max_tokens: int | None) -> int:
        """Tokens kept free for the reply when history must be truncated."""
        return max(1, min(max_tokens or self.context, self.context // 4))

    def chat_prompt(self, req: ChatRequest, persona: Persona) -> list[int]:
        messages = [("system" if m.role == "developer" else m.role, m.text()) for m in req.messages]
        budget = self.context - self.reply_room(req.max_completion_tokens or req.max_tokens)
        try:
            prompt = persona.render(messages, req.greeting or 0, self.count_tokens, budget)
        except PromptTooLong as err:
            raise APIError(
                400,
                f"This model's maximum context length is {self.context} tokens; {err}",
                param="messages",
                code="context_length_exceeded",
            ) from None
        return self.tok.encode(prompt).ids

    def completion_prompts(self, req: CompletionRequest) -> list[list[int]]:
        out = []
        for text in req.prompts():
            if self.count_tokens(text) >= self.context:
                raise APIError(
                    400,
                    f"This model's maximum context length is {self.context} tokens; the prompt is longer",
                    param="prompt",
                    code="context_length_exceeded",
                )
            ids = self.tok.encode(text).ids
            if not ids:
                raise APIError(400, "the prompt is empty", param="prompt", code="invalid_value")
            out.append(ids)
        return out

    def sampling(self, req: Sampling, prompt_len: int, max_tokens: int | None, default_max: int, index: int,
                 base_stop: tuple[str, ...] = (), logprobs: int | None = None, json_object: bool = False,
                 ) -> SamplingParams:  # fmt: skip
        if prompt_len >= self.context:  # at least one token must fit after the prompt
            raise APIError(
                400,
                f"This model's maximum context length is {self.context} tokens; the prompt has {prompt_len}",
                param="messages" if base_stop else "prompt",
                code="context_length_exceeded",
            )
        if max_tokens is not None and max_tokens > self.context:
            raise APIError(
                400,
                f"max_tokens is {max_tokens}, more than the model's context of {self.context} tokens",
                param="max_tokens",
                code="invalid_value",
            )
        vocab = self.tok.get_vocab_size()
        bias = tuple((int(k), v) for k, v in (req.logit_bias or {}).items())
        if any(k >= vocab for k, _ in bias):
            raise APIError(400, f"logit_bias names a token id >= the vocabulary size {vocab}", param="logit_bias",
                           code="invalid_value")  # fmt: skip
        seed = req.seed
        if seed is not None and index:  # n > 1 with a seed: distinct yet reproducible choices
            seed = (seed + index) % 2**64
        return SamplingParams(
            max_tokens=min(max_tokens or default_max, self.context - prompt_len),
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=req.top_k or 0,
            seed=seed,
            stop=base_stop + tuple(req.stops()),
            ignore_eos=bool(req.ignore_eos),
            min_p=req.min_p or 0.0,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            logit_bias=bias,
            logprobs=logprobs,
            json_object=json_object,
        )

    def chat_jobs(self, req: ChatRequest) -> tuple[Persona, list[Job], int]:
        persona = self.persona_of(req.model)
        ids = self.chat_prompt(req, persona)
        max_tokens = req.max_completion_tokens or req.max_tokens
        # A persona's turn ends at a blank line, as in the corpus (and as `gigafactory chat` stops).
        jobs = [
            (
                ids,
                self.sampling(
                    req, len(ids), max_tokens, self.context, i, (END_OF_SPEECH,), req.wanted_logprobs(), req.json_mode()
                ),
            )  # fmt: skip
            for i in range(req.n or 1)
        ]
        return persona, jobs, len(ids)

    def completion_jobs(self, req: CompletionRequest) -> tuple[Persona, list[Job], int]:
        persona = self.persona_of(req.model)
        prompts = self.completion_prompts(req)
        if len(prompts) * (req.n or 1) > MAX_N:
            raise APIError(400, f"at most {MAX_N} prompts × n", param="n", code="invalid_value")
        jobs = [
            (
                ids,
                self.sampling(
                    req, len(ids), req.max_tokens, DEFAULT_COMPLETION_TOKENS, i, logprobs=req.wanted_logprobs()
                ),
            )  # fmt: skip
            for ids in prompts
            for i in range(req.n or 1)
        ]
        return persona, jobs, sum(len(p) for p in prompts)

    # -- running ---------------------------------------------------------------------------------------

    def submit(self, jobs: list[Job]) -> tuple[asyncio.Queue[tuple[int, Output]], list[int]]:
        if not self.engine.alive():
            raise APIError(503, "the inference engine is not running", "server_error", code="engine_down")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[int, Output]] = asyncio.Queue()

        def sink_for(i: int) -> Callable[[Output], None]:
            return lambda out: loop.call_soon_threadsafe(queue.put_nowait, (i, out))

        try:
            ids = self.engine.submit([(prompt, params, sink_for(i)) for i, (prompt, params) in enumerate(jobs)])
        except QueueFull:
            raise APIError(
                429,
                "the server is busy: too many requests are waiting; retry later",
                "rate_limit_error",
                code="queue_full",
                headers={"Retry-After": "1"},
            ) from None
        return queue, ids

    async def outputs(
        self, request: Request, queue: asyncio.Queue[tuple[int, Output]], ids: list[int]
    ) -> AsyncIterator[tuple[int, Output] | None]:
        """(choice index, piece) until every sequence finished; None after `keepalive_s` of quiet. Aborts the
        unfinished sequences when the client disconnects or the consumer stops early."""
        live = set(range(len(ids)))

        async def watch() -> None:
            while True:
                await asyncio.sleep(0.2)
                if await request.is_disconnected():
                    for seq_id in ids:
                        self.engine.abort(seq_id)
                    return

        watcher = asyncio.create_task(watch())
        try:
            while live:
                try:
                    i, out = await asyncio.wait_for(queue.get(), self.keepalive_s)
                except TimeoutError:
                    yield None
                    continue
                if out.finish_reason is not None:
                    live.discard(i)
                yield i, out
        finally:
            watcher.cancel()
            for i in live:
                self.engine.abort(ids[i])

    # -- responses -------------------------------------------------------------------------------------

    def token_bytes(self, token: int) -> bytes:
        if token not in self._token_bytes:
            self._token_bytes[token] = _byte_level(self.tok.id_to_token(token)) or self.tok.decode([token]).encode()
        return self._token_bytes[token]

    def _chat_logprob(self, lp: TokenLogprob) -> dict[str, Any]:
        def entry(token: int, logprob: float) -> dict[str, Any]:
            raw = self.token_bytes(token)
            return {"token": raw.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(raw)}

        return {**entry(lp.token, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}

    def _completion_logprobs(self, lps: list[TokenLogprob], offset: int) -> dict[str, Any]:
        tokens, offsets = [], []
        for lp in lps:
            text = self.token_bytes(lp.token).decode("utf-8", "replace")
            tokens.append(text)
            offsets.append(offset)
            offset += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [{self.token_bytes(t).decode("utf-8", "replace"): v for t, v in lp.top} for lp in lps],
            "text_offset": offsets,
        }

    async def respond(
        self, request: Request, req: ChatRequest | CompletionRequest, persona: Persona, jobs: list[Job],
        prompt_tokens: int, lease: Lease,
    ) -> Response:  # fmt: skip
        chat = isinstance(req, ChatRequest)
        echo = [req.prompts()[i // (req.n or 1)] for i in range(len(jobs))] if (not chat and req.echo) else None
        queue, ids = self.submit(jobs)
        reply = Reply(self, chat, persona.name, prompt_tokens, len(jobs), echo, req.wanted_logprobs() is not None)
        stream = self.outputs(request, queue, ids)
        if not req.stream:
            try:
                async for item in stream:
                    if item is not None:
                        reply.add(*item)
            finally:
                lease.release()
            return JSONResponse(reply.whole())
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        request.state.streaming = True  # the stream releases the lease when it ends
        return StreamingResponse(
            reply.events(stream, include_usage, lease),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            background=BackgroundTask(lease.release),
        )


class Reply:
    """One response being assembled: per choice text, finish reason, tokens and logprobs."""

    def __init__(
        self, serving: Serving, chat: bool, model: str, prompt_tokens: int, n: int, echo: list[str] | None,
        logprobs: bool,
    ) -> None:  # fmt: skip
        self.serving, self.chat, self.n, self.echo, self.want_logprobs = serving, chat, n, echo, logprobs
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.head = {"id": self.id, "created": int(time.time()), "model": model, "system_fingerprint": None}
        self.prompt_tokens = prompt_tokens
        self.texts = [echo[i] if echo else "" for i in range(n)]
        self.reasons: list[str | None] = [None] * n
        self.logprobs: list[list[TokenLogprob]] = [[] for _ in range(n)]
        self.completion_tokens = 0

    def add(self, i: int, out: Output) -> None:
        self.texts[i] += out.text
        self.logprobs[i] += out.logprobs
        if out.finish_reason is not None:
            self.reasons[i] = out.finish_reason
            self.completion_tokens += out.completion_tokens

    def usage(self) -> dict[str, int]:
        p, c = self.prompt_tokens, self.completion_tokens
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def _logprobs(self, i: int, lps: list[TokenLogprob], offset: int) -> dict[str, Any] | None:
        if not self.want_logprobs:
            return None
        if self.chat:
            return {"content": [self.serving._chat_logprob(lp) for lp in lps]}
        return self.serving._completion_logprobs(lps, offset)

    def whole(self) -> dict[str, Any]:
        if any(r in ("error", "abort") for r in self.reasons):
            raise APIError(500, "generation failed", "server_error")
        choices = []
        for i in range(self.n):
            lp = self._logprobs(i, self.logprobs[i], len(self.echo[i]) if self.echo else 0)
            text = self.texts[i]
            body = {"message": {"role": "assistant", "content": text}} if self.chat else {"text": text}
            choices.append({"index": i, **body, "logprobs": lp, "finish_reason": self.reasons[i]})
        kind = "chat.completion" if self.chat else "text_completion"
        return {**self.head, "object": kind, "choices": choices, "usage": self.usage()}

    def _chunk(self, choice: dict[str, Any], include_usage: bool) -> str:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        extra = {"usage": None} if include_usage else {}
        return _sse({**self.head, "object": kind, "choices": [choice], **extra})

    def _piece(self, i: int, text: str, lps: list[TokenLogprob], reason: str | None) -> dict[str, Any]:
        lp = self._logprobs(i, lps, len(self.texts[i]) - len(text))
        if self.chat:
            delta = {"content": text} if text or reason is None else {}
            return {"index": i, "delta": delta, "logprobs": lp, "finish_reason": reason}
        return {"index": i, "text": text, "logprobs": lp, "finish_reason": reason}

    async def events(
        self, stream: AsyncIterator[tuple[int, Output] | None], include_usage: bool, lease: Lease
    ) -> AsyncIterator[str]:
        try:
            for i in range(self.n):  # sent at once: the client sees headers and a first event while queued
                if self.chat:
                    first = {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}  # fmt: skip
                    yield self._chunk(first, include_usage)
                elif self.echo:
                    yield self._chunk(
                        {"index": i, "text": self.echo[i], "logprobs": None, "finish_reason": None}, include_usage
                    )
            async for item in stream:
                if item is None:
                    yield ": keep-alive\n\n"
                    continue
                i, out = item
                if out.finish_reason in ("error", "abort"):
                    yield _sse(APIError(500, "generation failed", "server_error").body())
                    return
                self.add(i, out)
                if out.text or out.logprobs:
                    yield self._chunk(self._piece(i, out.text, out.logprobs, None), include_usage)
                if out.finish_reason is not None:
                    yield self._chunk(self._piece(i, "", [], out.finish_reason), include_usage)
            if include_usage:
                kind = "chat.completion.chunk" if self.chat else "text_completion"
                yield _sse({**self.head, "object": kind, "choices": [], "usage": self.usage()})
            yield "data: [DONE]\n\n"
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
            lease.release()


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet reversed: each of 256 printable characters stands for one byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(keep, chars, strict=True)}


_BYTE_OF = _byte_decoder()


def _byte_level(token: str | None) -> bytes | None:
    """A byte-level BPE token's bytes; None for tokens of other tokenizers (then the decoded text is used)."""
    if not token or any(ch not in _BYTE_OF for ch in token):
        return None
    return bytes(_BYTE_OF[ch] for ch in token)
