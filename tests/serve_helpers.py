"""Shared by the serve tests: one tiny trained run per test session, and a real uvicorn server on loopback."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.resources import files
from pathlib import Path

import uvicorn

_RUN: Path | None = None


def trained_run(tmp_path_factory) -> Path:
    """A tiny model trained for 4 steps on a slice of the built-in corpus (made once per session)."""
    global _RUN
    if _RUN is None:
        from gigafactory.train.config import make_config
        from gigafactory.train.loop import train

        path = tmp_path_factory.mktemp("serve_run")
        # A slice of the built-in corpus keeps tokenizer training quick; it still has speakers enough for personas.
        corpus = path.parent / "corpus.txt"
        text = (files("gigafactory") / "data" / "tinyshakespeare.txt").read_text()
        start = text.index("ROMEO:\n")  # Romeo and Juliet
        corpus.write_text(text[start : start + 150_000])
        cfg = make_config(
            model="tiny", steps=4, batch_size=4, seq_len=64, run_dir=path, data=corpus, dtype="fp32", eval_every=100
        )
        train(cfg)
        _RUN = path
    return _RUN


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(app) -> Iterator[str]:
    """Serve `app` on a free loopback port in a thread; yields its base URL."""
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        uv.should_exit = True
        thread.join(timeout=10)


def wait_until(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)
