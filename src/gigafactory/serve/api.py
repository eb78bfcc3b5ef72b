"""The OpenAI-compatible HTTP API (FastAPI): chat and text completions (plain and SSE), models, health, metrics.

Each persona is a model id. Handlers validate and render the prompt, hand sequences to the engine thread and
await their pieces on an asyncio queue. Every error leaves in OpenAI's shape
{"error": {"message", "type", "param", "code"}}: validation 400, unknown model 404, a full queue 429, a stuck or
dead engine 503. A watcher aborts a request's sequences as soon as its client disconnects, freeing the slots.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from tokenizers import Tokenizer

from gigafactory.chat import END_OF_SPEECH
from gigafactory.serve.engine import Engine, EngineConfig, Output, QueueFull
from gigafactory.serve.metrics import ServeMetrics
from gigafactory.serve.personas import Persona, load_all
from gigafactory.serve.sampling import SamplingParams

MAX_N = 8
MAX_STOPS = 4
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# -- request schemas (unknown OpenAI fields are accepted and ignored, as clients send many) -----------------------


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)  # not OpenAI's, but common (vLLM): 0 = off
    n: int | None = Field(None, ge=1, le=MAX_N)
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stop: str | list[str] | None = Field(None)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool | None = False  # keep going past the end-of-text token (benchmarks)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    greeting: int | None = Field(None, ge=0)  # which of a card's greetings opens the chat


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    echo: bool | None = False


# -- the server ---------------------------------------------------------------------------------------------------


@dataclass
class ServerState:
    engine: Engine
    tok: Tokenizer
    personas: dict[str, Persona]
    health_timeout: float = 10.0
    created: int = 0


def build_state(
    run_dir: Path, cards_dir: Path | None = None, config: EngineConfig | None = None, health_timeout: float = 10.0
) -> ServerState:
    """Everything comes from the run directory (plus optional cards)."""
    from gigafactory.runs import load_for_inference

    model, tok, _ = load_for_inference(Path(run_dir), quiet=True)
    engine = Engine(model, tok, config or EngineConfig(), ServeMetrics())
    return ServerState(engine, tok, load_all(Path(run_dir), cards_dir), health_timeout, int(time.time()))


def create_app(state: ServerState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.engine.start()
        yield
        state.engine.stop()

    app = FastAPI(title="gigafactory persona chat", version="1", lifespan=lifespan)
    app.state.server = state
    engine, tok, metrics = state.engine, state.tok, state.engine.metrics
    context = engine.spec.max_seq_len

    def error_response(err: APIError) -> JSONResponse:
        metrics.http_errors.labels(str(err.status)).inc()
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError) -> JSONResponse:
        return error_response(err)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        if first.get("type") == "json_invalid":
            msg, param = f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}", None
        else:
            msg = f"{param}: {first['msg']}" if param else str(first["msg"])
        return error_response(APIError(400, msg, param=param, code="invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return error_response(APIError(err.status_code, str(err.detail), code=None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception) -> JSONResponse:
        return error_response(APIError(500, f"internal error: {type(err).__name__}", "server_error"))

    def persona_of(model: str) -> Persona:
        persona = state.personas.get(model.strip().lower())
        if persona is None:
            raise APIError(
                404,
                f"The model '{model}' does not exist; GET /v1/models lists the personas",
                param="model",
                code="model_not_found",
            )
        return persona

    def sampling(
        req: _Sampling,
        prompt_len: int,
        max_tokens: int | None,
        default_max: int,
        base_stop: tuple[str, ...],
        index: int,
    ) -> SamplingParams:
        if prompt_len >= context:  # at least one token must fit after the prompt
            raise APIError(
                400,
                f"This model's maximum context length is {context} tokens; the prompt has {prompt_len}",
                param="messages" if base_stop else "prompt",
                code="context_length_exceeded",
            )
        if max_tokens is not None and max_tokens > context:
            raise APIError(
                400,
                f"max_tokens is {max_tokens}, more than the model's context of {context} tokens",
                param="max_tokens",
                code="invalid_value",
            )
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > MAX_STOPS:
            raise APIError(400, f"at most {MAX_STOPS} stop sequences", param="stop", code="invalid_value")
        seed = req.seed
        if seed is not None and index:  # n > 1 with a seed: distinct yet reproducible choices
            seed = (seed + index) % 2**64
        return SamplingParams(
            max_tokens=min(max_tokens or default_max, context - prompt_len),
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=req.top_k or 0,
            seed=seed,
            stop=base_stop + tuple(stop),
            ignore_eos=bool(req.ignore_eos),
        )

    def check_alive() -> None:
        if not engine.alive():
            raise APIError(503, "the inference engine is not running", "server_error", code="engine_down")

    async def run(request: Request, jobs: list[tuple[list[int], SamplingParams]]) -> AsyncIterator[tuple[int, Output]]:
        """Submit sequences; yield (choice index, piece) until all finish. Aborts whatever is left on exit."""
        check_alive()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[int, Output]] = asyncio.Queue()
        ids: list[int] = []
        live: set[int] = set()
        try:
            for i, (prompt, params) in enumerate(jobs):

                def sink(out: Output, i: int = i) -> None:
                    loop.call_soon_threadsafe(queue.put_nowait, (i, out))

                ids.append(engine.add(prompt, params, sink))
                live.add(i)
        except QueueFull:
            for seq_id in ids:
                engine.abort(seq_id)
            raise APIError(
                429,
                "the server is busy: too many requests are waiting; retry later",
                "rate_limit_error",
                code="queue_full",
            ) from None

        async def watch() -> None:
            while True:
                await asyncio.sleep(0.2)
                if await request.is_disconnected():
                    for seq_id in ids:
                        engine.abort(seq_id)
                    return

        watcher = asyncio.create_task(watch())
        try:
            while live:
                i, out = await queue.get()
                if out.finish_reason is not None:
                    live.discard(i)
                yield i, out
        finally:
            watcher.cancel()
            for i in live:
                engine.abort(ids[i])

    def sse(obj: Any) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    def usage(prompt: int, completion: int) -> dict[str, int]:
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def respond(
        request: Request,
        req: _Sampling,
        persona: Persona,
        jobs: list[tuple[list[int], SamplingParams]],
        chat: bool,
        echo: list[str] | None = None,
    ) -> Response:
        kind = "chat.completion" if chat else "text_completion"
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        head = {"id": rid, "created": created, "model": persona.name, "system_fingerprint": None}
        prompt_tokens = sum(len(p) for p, _ in jobs) // max(1, req.n or 1) if chat else sum(len(p) for p, _ in jobs)
        stream = run(request, jobs)

        if not req.stream:
            texts = [echo[i] if echo else "" for i in range(len(jobs))]
            reasons: list[str | None] = [None] * len(jobs)
            completion = 0
            async for i, out in stream:
                texts[i] += out.text
                if out.finish_reason is not None:
                    reasons[i], completion = out.finish_reason, completion + out.completion_tokens
            if any(r in ("error", "abort") for r in reasons):
                raise APIError(500 if "error" in reasons else 499, "generation failed", "server_error")
            if chat:
                choices = [
                    {"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None, "finish_reason": r}
                    for i, (t, r) in enumerate(zip(texts, reasons, strict=True))
                ]
            else:
                choices = [
                    {"index": i, "text": t, "logprobs": None, "finish_reason": r}
                    for i, (t, r) in enumerate(zip(texts, reasons, strict=True))
                ]
            return JSONResponse({**head, "object": kind, "choices": choices, "usage": usage(prompt_tokens, completion)})

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        chunk_kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choice: dict[str, Any]) -> str:
            extra = {"usage": None} if include_usage else {}
            return sse({**head, "object": chunk_kind, "choices": [choice], **extra})

        # Fail before the 200 goes out if the queue is full: pull the first event eagerly.
        first = await anext(stream)

        async def events() -> AsyncIterator[str]:
            completion = 0
            try:
                for i in range(len(jobs)):
                    if chat:
                        yield chunk(
                            {
                                "index": i,
                                "delta": {"role": "assistant", "content": ""},
                                "logprobs": None,
                                "finish_reason": None,
                            }
                        )
                    elif echo:
                        yield chunk({"index": i, "text": echo[i], "logprobs": None, "finish_reason": None})
                pending: list[tuple[int, Output]] = [first]
                while True:
                    for i, out in pending:
                        if out.finish_reason in ("error", "abort"):
                            yield sse(APIError(500, "generation failed", "server_error").body())
                            return
                        if out.text:
                            yield chunk(
                                {"index": i, "delta": {"content": out.text}, "logprobs": None, "finish_reason": None}
                                if chat
                                else {"index": i, "text": out.text, "logprobs": None, "finish_reason": None}
                            )
                        if out.finish_reason is not None:
                            completion += out.completion_tokens
                            yield chunk(
                                {"index": i, "delta": {}, "logprobs": None, "finish_reason": out.finish_reason}
                                if chat
                                else {"index": i, "text": "", "logprobs": None, "finish_reason": out.finish_reason}
                            )
                    try:
                        pending = [await anext(stream)]
                    except StopAsyncIteration:
                        break
                if include_usage:
                    yield sse({**head, "object": chunk_kind, "choices": [], "usage": usage(prompt_tokens, completion)})
                yield "data: [DONE]\n\n"
            finally:
                await stream.aclose()

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request) -> Response:
        persona = persona_of(req.model)
        messages = [("system" if m.role == "developer" else m.role, m.text()) for m in req.messages]
        prompt = persona.render(messages, req.greeting or 0, lambda s: len(tok.encode(s).ids))
        ids = tok.encode(prompt).ids
        max_tokens = req.max_completion_tokens or req.max_tokens
        # A persona's turn ends at a blank line, as in the corpus (and as `gigafactory chat` stops).
        jobs = [(ids, sampling(req, len(ids), max_tokens, context, (END_OF_SPEECH,), i)) for i in range(req.n or 1)]
        return await respond(request, req, persona, jobs, chat=True)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Response:
        persona = persona_of(req.model)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts or len(prompts) * (req.n or 1) > MAX_N:
            raise APIError(400, f"between 1 and {MAX_N} prompts × n", param="prompt", code="invalid_value")
        jobs, echo = [], []
        for text in prompts:
            ids = tok.encode(text).ids
            if not ids:
                raise APIError(400, "the prompt is empty", param="prompt", code="invalid_value")
            for i in range(req.n or 1):
                jobs.append((ids, sampling(req, len(ids), req.max_tokens, 16, (), i)))
                echo.append(text if req.echo else "")
        return await respond(request, req, persona, jobs, chat=False, echo=echo if req.echo else None)

    def model_card(p: Persona) -> dict[str, Any]:
        return {"id": p.name, "object": "model", "created": state.created, "owned_by": "gigafactory"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(p) for p in state.personas.values()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> dict[str, Any]:
        return model_card(persona_of(model))

    @app.get("/health")
    async def health() -> JSONResponse:
        age = time.monotonic() - engine.heartbeat
        body = {"status": "ok", "heartbeat_age_s": round(age, 3), **engine.stats()}
        if not engine.alive():
            raise APIError(503, "the inference engine thread is dead", "server_error", code="engine_down")
        if age > state.health_timeout:
            raise APIError(
                503, f"the inference engine has not stepped for {age:.1f} s", "server_error", code="engine_stuck"
            )
        return JSONResponse(body)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
