"""The OpenAI-compatible HTTP API (FastAPI): thin routes over `Serving`, plus the chat page at `/`.

Each persona is a model id. Every error leaves in OpenAI's shape {"error": {"message", "type", "param",
"code"}}: validation 400 (`unsupported_parameter` for OpenAI fields this server does not implement), missing
or wrong API key 401, unknown model 404, body over `--max-body-mb` 413, a caller over its limits or a full
queue 429 with `Retry-After`, a stuck or dead engine 503.

With API keys configured, every `/v1/*` route needs `Authorization: Bearer <key>`; `/`, `/health` and
`/metrics` stay open (the page asks for the key and sends it). CORS is off unless `--allowed-origins` lists
origins; the OpenAPI docs (`/docs`, `/openapi.json`) are off unless `--docs`.
"""

from __future__ import annotations

import base64
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from tokenizers import Tokenizer

from gigafactory.serve.engine import Engine, EngineConfig
from gigafactory.serve.engine_process import EngineProcess
from gigafactory.serve.limits import ApiKeys, BodyLimit, CallerLimits
from gigafactory.serve.metrics import ServeMetrics
from gigafactory.serve.personas import Persona, load_all
from gigafactory.serve.schemas import ChatRequest, CompletionRequest
from gigafactory.serve.serving import APIError, Serving

__all__ = ["APIError", "ServerOptions", "ServerState", "build_state", "create_app"]


@dataclass
class ServerState:
    engine: Engine | EngineProcess
    tok: Tokenizer
    personas: dict[str, Persona]
    health_timeout: float = 10.0
    created: int = 0


@dataclass
class ServerOptions:
    api_keys: ApiKeys = field(default_factory=lambda: ApiKeys([]))
    allowed_origins: list[str] = field(default_factory=list)
    docs: bool = False
    max_body_mb: float = 4.0
    concurrency_per_caller: int = 64  # requests in flight per API key (or client address without keys)
    rate_per_caller: float = 0.0  # requests per minute per caller; 0 = off
    keepalive_s: float = 5.0


def build_state(
    run_dir: Path, cards_dir: Path | None = None, config: EngineConfig | None = None, health_timeout: float = 10.0,
    weights: str = "full", process: bool = False,
) -> ServerState:
    """Everything comes from the run directory (plus optional cards). `process`: the engine runs in a process
    of its own (`engine_process`), which then loads the model; otherwise in a thread of this one."""
    from gigafactory.runs import load_for_inference, load_run_spec
    from gigafactory.tokenizer import load_tokenizer

    engine: Engine | EngineProcess
    if process:
        load_run_spec(Path(run_dir))  # "not a run directory" before starting a process to find out
        engine = EngineProcess(Path(run_dir), config or EngineConfig(), weights, ServeMetrics())
        tok = load_tokenizer(Path(run_dir))
    else:
        model, tok, _ = load_for_inference(Path(run_dir), quiet=True, weights=weights)
        engine = Engine(model, tok, config or EngineConfig(), ServeMetrics())
    return ServerState(engine, tok, load_all(Path(run_dir), cards_dir), health_timeout, int(time.time()))


def create_app(state: ServerState, options: ServerOptions | None = None) -> FastAPI:
    opts = options or ServerOptions()
    serving = Serving(
        state.engine, state.tok, state.personas, CallerLimits(opts.concurrency_per_caller, opts.rate_per_caller),
        opts.keepalive_s, created=state.created,
    )  # fmt: skip

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owner = not state.engine.alive()  # several apps may share one engine (tests): the first one runs it
        if owner:
            state.engine.start()
        yield
        if owner:
            state.engine.stop()
        serving.pool.shutdown(wait=False, cancel_futures=True)

    docs = {} if opts.docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="gigafactory persona chat", version="1", lifespan=lifespan, **docs)
    app.state.server = state
    app.state.serving = serving
    metrics = state.engine.metrics
    _errors(app, metrics)
    _routes(app, state, serving, opts.api_keys)
    if opts.allowed_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=opts.allowed_origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type"],
            max_age=600,
        )
    app.add_middleware(
        BodyLimit, max_bytes=int(opts.max_body_mb * 2**20), on_refuse=metrics.http_errors.labels("413").inc
    )
    return app


def _errors(app: FastAPI, metrics: ServeMetrics) -> None:
    def error_response(err: APIError) -> JSONResponse:
        metrics.http_errors.labels(str(err.status)).inc()
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError) -> JSONResponse:
        return error_response(err)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        return error_response(APIError(400, "invalid request", code="invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return error_response(APIError(err.status_code, str(err.detail)))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception) -> JSONResponse:
        return error_response(APIError(500, f"internal error: {type(err).__name__}", "server_error"))


def _routes(app: FastAPI, state: ServerState, serving: Serving, keys: ApiKeys) -> None:
    engine = state.engine

    def authorize(request: Request) -> str:
        """The caller's identity for the limits: its key, or its address when the server has no keys."""
        if not keys:
            return f"addr:{request.client.host if request.client else '?'}"
        key = keys.check(request.headers.get("authorization"))
        if key is None:
            given = "no API key" if not request.headers.get("authorization") else "an incorrect API key"
            raise APIError(
                401,
                f"You provided {given}. Send 'Authorization: Bearer <key>' with a key the server was started with.",
                param=None,
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return f"key:{key}"

    async def generate(request: Request, schema: Any, make_jobs: Any) -> Response:
        """Both generation routes: parse, render and tokenise off the loop, then answer or stream."""
        lease = serving.lease(authorize(request))
        try:
            req = await serving.parse(request, schema)
            persona, jobs, prompt_tokens = await serving.off_loop(make_jobs, req)
            return await serving.respond(request, req, persona, jobs, prompt_tokens, lease)
        finally:
            if not (lease.released or _streaming(request)):
                lease.release()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await generate(request, ChatRequest, serving.chat_jobs)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generate(request, CompletionRequest, serving.completion_jobs)

    def model_card(p: Persona) -> dict[str, Any]:
        return {"id": p.name, "object": "model", "created": state.created, "owned_by": "gigafactory"}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authorize(request)
        return {"object": "list", "data": [model_card(p) for p in state.personas.values()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str, request: Request) -> dict[str, Any]:
        authorize(request)
        return model_card(serving.persona_of(model))

    @app.get("/v1/personas")
    async def personas(request: Request) -> dict[str, Any]:
        """What the chat page shows: each persona's picture, description and greetings (not OpenAI's)."""
        authorize(request)
        return {"object": "list", "data": [_persona_info(p) for p in state.personas.values()]}

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(_PAGE.read_text(encoding="utf-8"))

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
        return Response(await serving.off_loop(engine.exposition), media_type=CONTENT_TYPE_LATEST)


_PAGE = files("gigafactory.serve") / "page.html"


def _streaming(request: Request) -> bool:
    """Whether the route handed its lease to a streaming response (which releases it when the stream ends)."""
    return bool(getattr(request.state, "streaming", False))


def _persona_info(p: Persona) -> dict[str, Any]:
    avatar = "data:image/png;base64," + base64.b64encode(p.avatar).decode() if p.avatar else None
    return {
        "id": p.name,
        "builtin": p.builtin,
        "description": p._substitute(p.description),
        "first_mes": p._substitute(p.greetings()[0]) if p.greetings() else "",
        "greetings": [p._substitute(g) for g in p.greetings()],
        "avatar": avatar,
    }
