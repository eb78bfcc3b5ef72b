"""One OpenAI-compatible front over several engine replicas: `gigafactory router URL...` or `serve --replicas R`.

Routing (ours, whatever runs the replicas): a request's key is its persona plus the first `prefix_chars`
characters of its conversation's opening, up to the first user turn (or of its prompt). Replicas are ranked
for the key by rendezvous hashing, so a persona's conversation keeps landing where its prefix is already in
the KV cache, and a replica that goes away only moves its own keys. The top-ranked replica is taken unless it
already has more than `slack` requests in flight beyond the least busy one (bounded load), then the next in
rank order: a hot key cannot pile onto one replica while others idle.

Failures: a replica that refuses the connection, answers 503, or dies before a response has started streaming
is marked down and the request goes to the next replica (nothing was sent to the client, so nothing is lost or
duplicated). A stream is held back until its first generated text; once text has gone out, a replica's death
ends the stream with an OpenAI-shaped error event (`code: replica_lost`) and `[DONE]`. A health loop polls each
replica's `/health` and brings it back when it answers again.

Shutdown drains: uvicorn stops accepting connections and lets in-flight responses finish (up to the drain
timeout) before the replicas are stopped. `/metrics` sums the replicas' metrics (counters, gauges, histogram
buckets; the prefix-cache hit rate is recomputed from the summed counts) and adds the router's own.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger(__name__)
_PREFIX = "gigafactory_router_"
_HOP_HEADERS = {
    "host",
    "content-length",
    "connection",
    "keep-alive",
    "transfer-encoding",
    "accept-encoding",
    "date",
    "server",
}


@dataclass(eq=False)
class Replica:
    url: str  # base URL, without /v1
    name: str
    inflight: int = 0
    up: bool = True


@dataclass
class RoutingPolicy:
    prefix_chars: int = 256
    slack: int = 4  # in-flight requests a preferred replica may have beyond the least busy one

    def key(self, body: Any) -> str:
        """Persona + the conversation's opening (messages up to the first user turn: what every later turn of
        the same conversation starts with), or the start of the prompt (completions)."""
        if not isinstance(body, dict):
            return ""
        model = str(body.get("model", ""))
        if isinstance(body.get("messages"), list):
            opening = []
            for m in body["messages"]:
                if not isinstance(m, dict):
                    continue
                content = m.get("content")
                opening.append(content if isinstance(content, str) else json.dumps(content))
                if m.get("role") == "user":
                    break
            text = "\n".join(opening)
        else:
            prompt = body.get("prompt", "")
            text = prompt if isinstance(prompt, str) else json.dumps(prompt)
        return f"{model.strip().lower()}\x00{text[: self.prefix_chars]}"

    @staticmethod
    def _score(key: str, replica: Replica) -> bytes:
        return hashlib.blake2b(f"{replica.name}\x00{key}".encode(), digest_size=8).digest()

    def rank(self, replicas: list[Replica], key: str) -> list[Replica]:
        return sorted(replicas, key=lambda r: self._score(key, r), reverse=True)

    def choose(
        self, replicas: list[Replica], key: str, exclude: set[Replica] | frozenset = frozenset()
    ) -> Replica | None:
        live = [r for r in replicas if r.up and r not in exclude]
        if not live:
            return None
        least = min(r.inflight for r in live)
        return next(r for r in self.rank(live, key) if r.inflight <= least + self.slack)


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.routed = Counter(_PREFIX + "requests", "Requests sent to each replica", ["replica"], registry=r)
        self.retries = Counter(_PREFIX + "retries", "Requests moved to another replica", ["reason"], registry=r)
        self.lost = Counter(_PREFIX + "streams_lost", "Streams ended by a replica dying mid-response", registry=r)
        self.up = Gauge(_PREFIX + "replica_up", "1 if the replica answers its health check", ["replica"], registry=r)
        self.inflight = Gauge(_PREFIX + "inflight", "Requests in flight per replica", ["replica"], registry=r)


class ReplicaLost(Exception):
    """The replica went away (connection refused/reset, or 503) before the response started."""


def _error_body(status: int, message: str, code: str, type_: str = "server_error") -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


def _sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {data}\n\n".encode()


def _has_output(line: str) -> bool:
    """Whether an SSE line carries generated text or a finish (i.e. the response has really started)."""
    if not line.startswith("data:"):
        return False
    data = line[5:].strip()
    if data == "[DONE]":
        return True
    try:
        event = json.loads(data)
    except json.JSONDecodeError:
        return True
    if "error" in event:
        return True
    for choice in event.get("choices") or []:
        delta = choice.get("delta") or {}
        if choice.get("finish_reason") or delta.get("content") or choice.get("text"):
            return True
    return False


@dataclass
class Router:
    replicas: list[Replica]
    policy: RoutingPolicy = field(default_factory=RoutingPolicy)
    request_timeout: float = 600.0
    health_interval: float = 1.0
    metrics: RouterMetrics = field(default_factory=RouterMetrics)

    def __post_init__(self) -> None:
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(self.request_timeout, connect=5.0))
        self.draining = False
        for r in self.replicas:
            self.metrics.up.labels(r.name).set(1)

    # -- replica state --------------------------------------------------------------------------------

    def mark(self, replica: Replica, up: bool) -> None:
        if replica.up != up:
            log.warning("replica %s (%s) is %s", replica.name, replica.url, "back up" if up else "down")
        replica.up = up
        self.metrics.up.labels(replica.name).set(int(up))

    async def check(self, replica: Replica) -> None:
        try:
            resp = await self.client.get(f"{replica.url}/health", timeout=max(1.0, self.health_interval))
            self.mark(replica, resp.status_code == 200)
        except httpx.HTTPError:
            self.mark(replica, False)

    async def health_loop(self) -> None:
        while True:
            await asyncio.gather(*(self.check(r) for r in self.replicas))
            await asyncio.sleep(self.health_interval)

    def _enter(self, replica: Replica) -> None:
        replica.inflight += 1
        self.metrics.inflight.labels(replica.name).set(replica.inflight)
        self.metrics.routed.labels(replica.name).inc()

    def _leave(self, replica: Replica) -> None:
        replica.inflight -= 1
        self.metrics.inflight.labels(replica.name).set(replica.inflight)

    def _lost(self, replica: Replica, reason: str) -> None:
        self.mark(replica, False)
        self.metrics.retries.labels(reason).inc()

    # -- requests -------------------------------------------------------------------------------------

    async def proxy(self, request: Request, path: str) -> Response:
        if self.draining:
            return JSONResponse(_error_body(503, "the router is shutting down", "draining"), status_code=503)
        body = await request.body()
        try:
            parsed = json.loads(body) if body else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            parsed = None  # a replica answers with the proper 400
        key = self.policy.key(parsed)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
        stream = isinstance(parsed, dict) and parsed.get("stream") is True
        tried: set[Replica] = set()
        while True:
            replica = self.policy.choose(self.replicas, key, tried)
            if replica is None:
                return JSONResponse(
                    _error_body(503, "no replica is available; retry later", "no_replica"),
                    status_code=503,
                    headers={"Retry-After": "1"},
                )
            tried.add(replica)
            try:
                if stream:
                    return await self._stream(replica, path, body, headers, key, tried)
                return await self._unary(replica, path, body, headers)
            except ReplicaLost as err:
                self._lost(replica, str(err))

    async def _unary(self, replica: Replica, path: str, body: bytes, headers: dict[str, str]) -> Response:
        self._enter(replica)
        try:
            resp = await self.client.post(f"{replica.url}{path}", content=body, headers=headers)
        except httpx.TransportError:
            raise ReplicaLost("connection") from None
        finally:
            self._leave(replica)
        if resp.status_code == 503:
            raise ReplicaLost("unavailable")
        out = {k: v for k, v in resp.headers.items() if k.lower() not in _HOP_HEADERS | {"content-encoding"}}
        out["x-gigafactory-replica"] = replica.name
        return Response(resp.content, resp.status_code, headers=out)

    async def _open(self, replica: Replica, path: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
        req = self.client.build_request("POST", f"{replica.url}{path}", content=body, headers=headers)
        try:
            resp = await self.client.send(req, stream=True)
        except httpx.TransportError:
            raise ReplicaLost("connection") from None
        if resp.status_code == 503:
            await resp.aclose()
            raise ReplicaLost("unavailable")
        return resp

    async def _stream(
        self, replica: Replica, path: str, body: bytes, headers: dict[str, str], key: str, tried: set[Replica]
    ) -> Response:
        resp = await self._open(replica, path, body, headers)
        if resp.status_code != 200:  # a refusal (400, 404, 429...): pass it on as it is
            content = await resp.aread()
            await resp.aclose()
            return Response(content, resp.status_code, media_type=resp.headers.get("content-type"))
        relay = _Relay(self, path, body, headers, key, tried)
        return StreamingResponse(
            relay.run(replica, resp),
            media_type="text/event-stream",
            headers={"x-gigafactory-replica": replica.name, "Cache-Control": "no-cache"},
        )

    async def metrics_text(self) -> str:
        async def fetch(r: Replica) -> str:
            try:
                resp = await self.client.get(f"{r.url}/metrics", timeout=5.0)
                return resp.text if resp.status_code == 200 else ""
            except httpx.HTTPError:
                return ""

        texts = await asyncio.gather(*(fetch(r) for r in self.replicas if r.up))
        return aggregate_metrics(list(texts)) + generate_latest(self.metrics.registry).decode()


@dataclass
class _Relay:
    """One streamed response: held back until its first text, moved to another replica if its replica dies
    before that, ended with an error event if it dies after."""

    router: Router
    path: str
    body: bytes
    headers: dict[str, str]
    key: str
    tried: set[Replica]

    async def run(self, replica: Replica, resp: httpx.Response) -> AsyncIterator[bytes]:
        router = self.router
        while True:
            router._enter(replica)
            started = False
            try:
                held: list[str] = []
                done = False
                async for line in resp.aiter_lines():
                    if not started and _has_output(line):
                        started = True
                        if held:
                            yield ("\n".join(held) + "\n").encode()
                    if started:
                        yield (line + "\n").encode()
                    elif not line.startswith(":"):  # keep-alive comments are dropped while holding
                        held.append(line)
                    done = done or line.strip() == "data: [DONE]"
                if done:
                    return
                reason = "stream ended early"
            except httpx.TransportError:
                reason = "connection"
            finally:
                router._leave(replica)
                await resp.aclose()
            if started:
                router.mark(replica, False)
                router.metrics.lost.inc()
                message = f"replica {replica.name} stopped while streaming this response; send the request again"
                yield _sse(_error_body(502, message, "replica_lost"))
                yield _sse("[DONE]")
                return
            router._lost(replica, reason)
            nxt = await self._next()
            if nxt is None:
                yield _sse(_error_body(503, "no replica is available; retry later", "no_replica"))
                yield _sse("[DONE]")
                return
            replica, resp = nxt

    async def _next(self) -> tuple[Replica, httpx.Response] | None:
        while True:
            replica = self.router.policy.choose(self.router.replicas, self.key, self.tried)
            if replica is None:
                return None
            self.tried.add(replica)
            try:
                resp = await self.router._open(replica, self.path, self.body, self.headers)
            except ReplicaLost as err:
                self.router._lost(replica, str(err))
                continue
            if resp.status_code == 200:
                return replica, resp
            await resp.aclose()  # a refusal on a retry cannot be passed on any more: try the next one


# -- metrics -----------------------------------------------------------------------------------------------


def aggregate_metrics(texts: list[str]) -> str:
    """Sum Prometheus text expositions sample by sample (same name and labels). `*_created` timestamps are
    dropped; `*_prefix_cache_hit_rate` is recomputed from the summed hit and query counts."""
    kinds: dict[str, tuple[str, str]] = {}
    sums: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        for fam in text_string_to_metric_families(text):
            kinds.setdefault(fam.name, (fam.type, fam.documentation))
            bucket = sums.setdefault(fam.name, {})
            for s in fam.samples:
                if s.name.endswith("_created"):
                    continue
                k = (s.name, tuple(sorted(s.labels.items())))
                bucket[k] = bucket.get(k, 0.0) + s.value
    _recompute_hit_rate(sums)
    lines = []
    for name, samples in sums.items():
        if not samples:
            continue
        kind, doc = kinds[name]
        lines += [f"# HELP {name} {doc} (sum over replicas)", f"# TYPE {name} {kind}"]
        for (sample, labels), value in samples.items():
            label_text = ",".join(f'{k}="{v}"' for k, v in labels)
            lines.append(f"{sample}{{{label_text}}} {value!r}" if labels else f"{sample} {value!r}")
    return "\n".join(lines) + ("\n" if lines else "")


def _recompute_hit_rate(sums: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]) -> None:
    def total(suffix: str) -> float | None:
        for name, samples in sums.items():
            if name.endswith(suffix):
                return sum(samples.values())
        return None

    queries, hits = total("prefix_cache_queried_tokens"), total("prefix_cache_hit_tokens")
    for name, samples in sums.items():
        if name.endswith("prefix_cache_hit_rate") and queries is not None and hits is not None:
            for k in samples:
                samples[k] = hits / queries if queries else 0.0


# -- the app -----------------------------------------------------------------------------------------------


def create_router_app(router: Router, on_shutdown: Callable[[], Awaitable[None]] | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        health = asyncio.create_task(router.health_loop())
        yield
        router.draining = True
        health.cancel()
        await router.client.aclose()
        if on_shutdown is not None:
            await on_shutdown()

    app = FastAPI(title="gigafactory router", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.router = router

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await router.proxy(request, "/v1/chat/completions")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await router.proxy(request, "/v1/completions")

    @app.get("/v1/{rest:path}")
    async def read(rest: str, request: Request) -> Response:
        return await _get_any(router, f"/v1/{rest}", request)

    @app.get("/health")
    async def health() -> JSONResponse:
        status = {r.name: {"up": r.up, "inflight": r.inflight, "url": r.url} for r in router.replicas}
        ok = any(r.up for r in router.replicas) and not router.draining
        return JSONResponse(
            {"status": "ok" if ok else "unavailable", "replicas": status}, status_code=200 if ok else 503
        )

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(await router.metrics_text(), media_type=CONTENT_TYPE_LATEST)

    return app


async def _get_any(router: Router, path: str, request: Request) -> Response:
    """GETs (models, personas) are the same on every replica: ask a live one."""
    headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
    for replica in [r for r in router.replicas if r.up]:
        try:
            resp = await router.client.get(f"{replica.url}{path}", headers=headers)
        except httpx.TransportError:
            router.mark(replica, False)
            continue
        return Response(resp.content, resp.status_code, media_type=resp.headers.get("content-type"))
    return JSONResponse(_error_body(503, "no replica is available; retry later", "no_replica"), status_code=503)
