"""What keeps the server safe under abuse: API keys, a body-size limit, and per-caller concurrency and rate limits.

- `ApiKeys`: Bearer keys from `--api-key` (repeatable), the `GIGAFACTORY_API_KEYS` environment variable
  (comma-separated) and `--api-key-file` (one per line, `#` comments). Checked with `hmac.compare_digest`
  against every key (no early exit), so timing tells nothing about which bytes matched.
- `BodyLimit`: an ASGI middleware that refuses a body over the limit with 413, from `Content-Length` before
  reading anything, or as soon as a chunked upload passes the limit; the body is never held whole beyond it.
- `CallerLimits`: per caller (the API key, or the client address without auth) at most `concurrency` requests
  in flight and a token bucket of `rate` requests per minute; refusals carry the seconds to wait (Retry-After).
"""

from __future__ import annotations

import hmac
import json
import math
import os
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gigafactory.errors import UserError

ENV_KEYS = "GIGAFACTORY_API_KEYS"
MIN_KEY_LENGTH = 8

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class ApiKeys:
    def __init__(self, keys: list[str]) -> None:
        self._keys = [k.encode() for k in dict.fromkeys(keys)]

    @classmethod
    def gather(cls, keys: list[str] | None = None, key_file: Path | None = None, env: bool = True) -> ApiKeys:
        """Keys from the command line, a file and the environment; each at least 8 printable characters."""
        found = list(keys or [])
        if env and os.environ.get(ENV_KEYS):
            found += [k.strip() for k in os.environ[ENV_KEYS].split(",") if k.strip()]
        if key_file is not None:
            try:
                lines = Path(key_file).read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as err:
                raise UserError(f"cannot read --api-key-file {key_file}: {err}") from None
            found += [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        for key in found:
            if len(key) < MIN_KEY_LENGTH or not key.isprintable() or " " in key:
                raise UserError(
                    f"an API key must be at least {MIN_KEY_LENGTH} printable characters without spaces "
                    f"(one starting {key[:2]!r} is not)"
                )
        return cls(found)

    def __bool__(self) -> bool:
        return bool(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def check(self, authorization: str | None) -> str | None:
        """The key if `authorization` is "Bearer <a configured key>", else None."""
        if not authorization or not authorization.startswith("Bearer "):
            return None
        given = authorization[7:].strip().encode("utf-8", "replace")
        match = None
        for key in self._keys:  # no early exit
            if hmac.compare_digest(given, key):
                match = key
        return match.decode() if match is not None else None


class BodyLimit:
    """ASGI middleware: 413 in OpenAI's error shape for request bodies over `max_bytes`."""

    def __init__(self, app: ASGIApp, max_bytes: int, on_refuse: Callable[[], None] | None = None) -> None:
        self.app, self.max_bytes, self.on_refuse = app, max_bytes, on_refuse

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await self._refuse(send)
            return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        if self.on_refuse is not None:
            self.on_refuse()
        mb = self.max_bytes / 2**20
        body = json.dumps(
            {
                "error": {
                    "message": f"the request body is larger than the server's limit of {mb:g} MB (--max-body-mb)",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "request_too_large",
                }
            }
        ).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": [*headers, (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


@dataclass
class _Caller:
    tokens: float
    updated: float
    in_flight: int = 0


@dataclass
class CallerLimits:
    """Per-caller limits; `concurrency` or `rate` 0 turns that limit off."""

    concurrency: int = 0
    rate: float = 0.0  # requests per minute, with a burst of the same size
    _callers: dict[str, _Caller] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def acquire(self, caller: str) -> float | None:
        """Start a request for `caller`: None if allowed (call `release` when it ends), else seconds to wait."""
        now = time.monotonic()
        with self._lock:
            state = self._callers.get(caller)
            if state is None:
                state = self._callers[caller] = _Caller(tokens=self.rate, updated=now)
                self._forget_idle(now)
            if self.concurrency and state.in_flight >= self.concurrency:
                return 1.0
            if self.rate:
                state.tokens = min(self.rate, state.tokens + (now - state.updated) * self.rate / 60)
                state.updated = now
                if state.tokens < 1:
                    return math.ceil((1 - state.tokens) * 60 / self.rate)
                state.tokens -= 1
            state.in_flight += 1
            return None

    def release(self, caller: str) -> None:
        with self._lock:
            state = self._callers.get(caller)
            if state is not None:
                state.in_flight = max(0, state.in_flight - 1)

    def _forget_idle(self, now: float) -> None:
        """Bound the table: drop callers with nothing in flight and a full bucket (they are as if new)."""
        if len(self._callers) < 10_000:
            return
        for name, st in list(self._callers.items()):
            full = not self.rate or st.tokens + (now - st.updated) * self.rate / 60 >= self.rate
            if st.in_flight == 0 and full:
                del self._callers[name]
