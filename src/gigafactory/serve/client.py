"""`gigafactory chat --url URL`: the chat loop against a running server, streaming over the OpenAI API."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator

import httpx

from gigafactory.errors import UserError

API_KEY_ENV = "GIGAFACTORY_API_KEY"  # the key `chat --url` sends, if the server needs one


class RemoteChat:
    """Keeps the conversation client-side (the API is stateless) and streams each reply."""

    def __init__(self, url: str, persona: str, timeout: float = 300.0, api_key: str | None = None) -> None:
        self.base = url.rstrip("/")
        if not self.base.endswith("/v1"):
            self.base += "/v1"
        key = api_key or os.environ.get(API_KEY_ENV)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.client = httpx.Client(timeout=timeout, headers=headers)
        self.persona = self._resolve(persona)
        self.history: list[dict[str, str]] = []

    def _resolve(self, persona: str) -> str:
        try:
            resp = self.client.get(f"{self.base}/models")
        except httpx.HTTPError as err:
            raise UserError(f"cannot reach the server at {self.base}: {err}") from None
        if resp.status_code == 401:
            raise UserError(f"{self.base} needs an API key: set {API_KEY_ENV} to one of the server's keys")
        if resp.status_code != 200:
            raise UserError(f"{self.base}/models answered {resp.status_code}: {resp.text[:200]}")
        ids = [m["id"] for m in resp.json()["data"]]
        by_lower = {i.lower(): i for i in ids}
        if persona.lower() not in by_lower:
            raise UserError(f"unknown persona {persona!r}; the server has {len(ids)}, e.g. {', '.join(ids[:8])}")
        return by_lower[persona.lower()]

    def reply(self, message: str, **sampling: object) -> Iterator[str]:
        self.history.append({"role": "user", "content": message})
        while True:
            body = {
                "model": self.persona,
                "messages": self.history,
                "stream": True,
                **{k: v for k, v in sampling.items() if v is not None},
            }
            with self.client.stream("POST", f"{self.base}/chat/completions", json=body) as resp:
                if resp.status_code == 400 and len(self.history) > 1:
                    err = json.loads(resp.read()).get("error", {})
                    if err.get("code") == "context_length_exceeded":
                        self.history = self.history[2:]  # forget the oldest exchange, as local chat truncates
                        continue
                if resp.status_code != 200:
                    err = json.loads(resp.read()).get("error", {})
                    raise UserError(f"the server refused: {err.get('message', resp.status_code)}")
                text = ""
                for piece in _sse_content(resp.iter_lines()):
                    text += piece
                    yield piece
            self.history.append({"role": "assistant", "content": text})
            return


def _sse_content(lines: Iterator[str]) -> Iterator[str]:
    for line in lines:
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line[6:])
        if "error" in event:
            raise UserError(f"the server failed mid-reply: {event['error'].get('message')}")
        for choice in event.get("choices", []):
            if choice.get("delta", {}).get("content"):
                yield choice["delta"]["content"]


def chat_remote(
    url: str, persona: str, prompt: str | None, out: Callable[[str], None], read: Callable[[], str], **sampling: object
) -> None:
    """One turn with `prompt`, or a loop reading lines with `read` until an empty one or EOF."""
    chat = RemoteChat(url, persona)

    def turn(message: str) -> None:
        out(f"{chat.persona}:\n")
        for piece in chat.reply(message, **sampling):
            out(piece)
        out("\n")

    if prompt is not None:
        turn(prompt)
        return
    out(f"chatting with {chat.persona} at {chat.base}; empty line or Ctrl-D ends\n")
    while True:
        try:
            message = read().strip()
        except EOFError:
            break
        if not message:
            break
        turn(message)
