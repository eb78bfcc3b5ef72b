"""The engine in a process of its own, so that the HTTP event loop and the engine's steps stop sharing one
interpreter lock.

Measured with `benchmarks/engine_step.py --gil`: a busy Python thread beside the engine thread (as the event
loop is, framing JSON and SSE for every token) cut the engine's throughput to 0.20-0.59×. So `gigafactory serve`
runs the same `Engine` in a child process (the split vLLM makes between its API server and its engine core) and
talks to it over a pipe:

- HTTP process → engine: ("submit", [(seq id, prompt, params)]), ("abort", seq id), ("metrics", token), ("stop",);
- engine → HTTP process, after each step that produced output and at least every 0.25 s: ("out", [(seq id,
  Output)], counts), and ("metrics", token, exposition text) answers.

Ids are chosen by the HTTP side, so `submit` returns at once. The queue bound is kept there too, from the
counts the engine reports (requests still in the pipe count as waiting). The engine process has one thread: it
reads the pipe between steps, and leaves when the pipe closes (its parent stopped or died).
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from prometheus_client import generate_latest

from gigafactory.errors import UserError
from gigafactory.serve.engine import Engine, EngineConfig, Output, QueueFull
from gigafactory.serve.metrics import ServeMetrics
from gigafactory.serve.sampling import SamplingParams

_REPORT_S = 0.25  # the longest silence of a live engine process (the HTTP side's heartbeat)
Sink = Callable[[Output], None]


class EngineProcess:
    """`Engine`'s interface (submit, abort, start, stop, alive, stats, heartbeat) over an engine process that
    loads `run_dir` itself. `metrics` here holds the HTTP side's own (error counts); `exposition()` adds the
    engine's."""

    def __init__(
        self, run_dir: Path, config: EngineConfig | None = None, weights: str = "full",
        metrics: ServeMetrics | None = None, start_timeout: float = 300.0,
    ) -> None:  # fmt: skip
        self.run_dir, self.weights, self.start_timeout = Path(run_dir), weights, start_timeout
        self.config = config or EngineConfig()
        self.metrics = metrics or ServeMetrics()
        self._send_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._started = False
        self._spawn()

    # -- lifecycle --------------------------------------------------------------------------------------

    def _spawn(self) -> None:
        ctx = mp.get_context("spawn")  # a fork would copy the parent's threads' locks and torch's thread pools
        self._conn, theirs = ctx.Pipe()
        self._proc = ctx.Process(target=_main, args=(theirs, str(self.run_dir), self.weights, self.config),
                                 name="gigafactory-engine", daemon=True)  # fmt: skip
        self._proc.start()
        theirs.close()
        self.spec = self._handshake()
        self.pid = self._proc.pid
        self.heartbeat = time.monotonic()
        self._sinks: dict[int, Sink] = {}
        self._replies: dict[int, Future[bytes]] = {}
        self._sent = 0  # requests sent
        self._counts = {"running": 0, "waiting": 0, "received": 0, "queued": 0}
        self._dead = False
        self._reader = threading.Thread(target=self._read, name="gigafactory-engine-reader", daemon=True)
        self._reader.start()

    def _handshake(self) -> Any:
        deadline = time.monotonic() + self.start_timeout
        while not self._conn.poll(0.2):
            if not self._proc.is_alive() or time.monotonic() > deadline:
                self._proc.terminate()
                raise UserError(f"the engine process did not start (exit code {self._proc.exitcode})")
        try:
            kind, payload = self._conn.recv()
        except EOFError:
            self._proc.join(5)
            raise UserError(f"the engine process exited while starting (exit code {self._proc.exitcode})") from None
        if kind == "error":
            self._proc.join(5)
            raise UserError(payload)
        return payload

    def start(self) -> None:
        if not self._proc.is_alive():
            self._spawn()
        self._started = True

    def stop(self) -> None:
        self._started = False
        self._send(("stop",))
        self._proc.join(10)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(5)
        self._conn.close()

    def alive(self) -> bool:
        return self._started and not self._dead and self._proc.is_alive()

    # -- requests ---------------------------------------------------------------------------------------

    def submit(self, jobs: list[tuple[list[int], SamplingParams, Sink]]) -> list[int]:
        """As `Engine.submit`: one request's sequences, all or none; QueueFull past `max_queue` waiting."""
        with self._send_lock:
            if self.queued_requests() >= self.config.max_queue:
                raise QueueFull
            ids = [next(self._ids) for _ in jobs]
            for seq_id, (_, _, sink) in zip(ids, jobs, strict=True):
                self._sinks[seq_id] = sink
            self._sent += 1
            self._conn.send(("submit", [(i, list(p), params) for i, (p, params, _) in zip(ids, jobs, strict=True)]))
        return ids

    def add(self, prompt: list[int], params: SamplingParams, sink: Sink) -> int:
        return self.submit([(prompt, params, sink)])[0]

    def abort(self, seq_id: int) -> None:
        self._send(("abort", seq_id))

    def queued_requests(self) -> int:
        c = self._counts
        return self._sent - c["received"] + c["queued"]

    def stats(self) -> dict[str, int]:
        c = self._counts
        return {"running": c["running"], "waiting": c["waiting"] + self._sent - c["received"]}

    def exposition(self) -> bytes:
        """The engine's metrics (asked from its process; blocks up to one step) and the HTTP side's."""
        own = generate_latest(self.metrics.http_registry)
        if not self.alive():
            return own
        token = next(self._ids)
        reply: Future[bytes] = Future()
        self._replies[token] = reply
        self._send(("metrics", token))
        try:
            return reply.result(timeout=10) + own
        except TimeoutError:
            return own
        finally:
            self._replies.pop(token, None)

    # -- the pipe ---------------------------------------------------------------------------------------

    def _send(self, msg: tuple) -> None:
        with self._send_lock:
            try:
                self._conn.send(msg)
            except (OSError, ValueError):  # the engine process is gone; `alive()` says so
                pass

    def _read(self) -> None:
        try:
            while True:
                msg = self._conn.recv()
                self.heartbeat = time.monotonic()
                if msg[0] == "out":
                    self._counts = msg[2]
                    for seq_id, out in msg[1]:
                        sink = self._sinks.get(seq_id) if out.finish_reason is None else self._sinks.pop(seq_id, None)
                        if sink is not None:
                            sink(out)
                elif msg[0] == "metrics" and msg[1] in self._replies:
                    self._replies[msg[1]].set_result(msg[2])
        except (EOFError, OSError):
            pass
        finally:  # the engine process died or was stopped: whatever was in flight has failed
            self._dead = True
            for seq_id in list(self._sinks):
                self._sinks.pop(seq_id)(Output("", "error"))
            for reply in list(self._replies.values()):
                reply.set_result(b"")


# -- the engine process ----------------------------------------------------------------------------------


def _main(conn: Connection, run_dir: str, weights: str, config: EngineConfig) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the HTTP side stops us
    import torch

    from gigafactory.runs import load_for_inference

    try:
        model, tok, _ = load_for_inference(Path(run_dir), quiet=True, weights=weights)
        # The HTTP side keeps the queue bound; its count includes ours, so we never refuse what it accepted.
        engine = Engine(model, tok, replace(config, max_queue=sys.maxsize), ServeMetrics())
    except UserError as err:
        conn.send(("error", str(err)))
        return
    torch.set_num_threads(config.threads)
    torch.set_grad_enabled(False)
    conn.send(("ready", engine.spec))
    try:
        _Host(engine, conn).run()
    except (EOFError, OSError):  # the HTTP side is gone
        pass


class _Host:
    """The engine process's loop: read the pipe between steps, step, send what came out."""

    def __init__(self, engine: Engine, conn: Connection) -> None:
        self.engine, self.conn = engine, conn
        self.outbox: list[tuple[int, Output]] = []
        self.ids: dict[int, int] = {}  # the HTTP side's sequence id -> the engine's
        self.received = 0

    def sink(self, seq_id: int) -> Sink:
        def put(out: Output) -> None:
            self.outbox.append((seq_id, out))
            if out.finish_reason is not None:
                self.ids.pop(seq_id, None)

        return put

    def handle(self, msg: tuple) -> bool:
        """Act on one message; False on "stop"."""
        engine = self.engine
        if msg[0] == "submit":
            self.received += 1
            jobs = [(prompt, params, self.sink(seq_id)) for seq_id, prompt, params in msg[1]]
            for (seq_id, _, _), ours in zip(msg[1], engine.submit(jobs), strict=True):
                self.ids[seq_id] = ours
        elif msg[0] == "abort" and msg[1] in self.ids:
            engine.abort(self.ids[msg[1]])
        elif msg[0] == "metrics":
            self.conn.send(("metrics", msg[1], generate_latest(engine.metrics.registry)))
        return msg[0] != "stop"

    def run(self) -> None:
        engine, conn = self.engine, self.conn
        sent = 0.0
        while True:
            wait = 0.0 if engine.busy() else _REPORT_S
            while conn.poll(wait):
                if not self.handle(conn.recv()):
                    return
                wait = 0.0
            engine.heartbeat = time.monotonic()
            engine.step_safely()
            if self.outbox or time.monotonic() - sent > _REPORT_S:
                counts = {**engine.stats(), "received": self.received, "queued": engine.queued_requests()}
                out, self.outbox = self.outbox, []
                conn.send(("out", out, counts))
                sent = time.monotonic()
