"""Where the engine replicas behind the router run: local processes, or Ray actors (one machine or a cluster).

Either way a replica is an ordinary `gigafactory serve` server on its own port, and the router (ours) talks to
it over HTTP. Ray places the actors (and restarts nothing by itself: a dead replica stays dead until the
operator acts; the router routes around it). We do not use a Ray Serve deployment with several replicas for
this: its own request router would pick the replica, and the persona/prefix affinity is the point of ours.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from gigafactory.errors import UserError


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_healthy(urls: list[str], timeout: float, alive: Any = None) -> None:
    """Block until every URL's /health answers 200; `alive()` (optional) says whether to keep waiting."""
    deadline = time.monotonic() + timeout
    pending = list(urls)
    while pending:
        if alive is not None and not alive():
            raise UserError("a replica exited while starting; run `gigafactory serve RUN` alone to see why")
        if time.monotonic() > deadline:
            raise UserError(f"replicas {', '.join(pending)} did not become healthy in {timeout:g} s")
        try:
            if httpx.get(f"{pending[0]}/health", timeout=1.0).status_code == 200:
                pending.pop(0)
                continue
        except httpx.HTTPError:
            pass
        time.sleep(0.2)


class LocalReplicas:
    """R `gigafactory serve` processes on this machine, one thread each."""

    def __init__(self, run_dir: Path, n: int, serve_args: list[str], host: str = "127.0.0.1") -> None:
        self.run_dir, self.n, self.serve_args, self.host = run_dir, n, serve_args, host
        self.procs: list[subprocess.Popen[bytes]] = []
        self.urls: list[str] = []

    def start(self, timeout: float = 120.0) -> list[str]:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        for _ in range(self.n):
            port = free_port(self.host)
            cmd = [sys.executable, "-m", "gigafactory", "serve", str(self.run_dir), "--host", self.host,
                   "--port", str(port), *self.serve_args]  # fmt: skip
            self.procs.append(subprocess.Popen(cmd, env=env))
            self.urls.append(f"http://{self.host}:{port}")
        wait_healthy(self.urls, timeout, alive=lambda: all(p.poll() is None for p in self.procs))
        return self.urls

    def stop(self, timeout: float = 30.0) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)  # uvicorn finishes in-flight responses first
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


class ReplicaServer:
    """The body of a Ray actor: a `gigafactory serve` server in a thread of the actor's process."""

    def __init__(self, run_dir: str, options: dict[str, Any]) -> None:
        import torch
        import uvicorn

        from gigafactory.serve.api import ServerOptions, build_state, create_app
        from gigafactory.serve.engine import EngineConfig
        from gigafactory.serve.limits import ApiKeys

        torch.set_num_threads(1)
        config = EngineConfig(**options.get("engine", {}))
        state = build_state(Path(run_dir), options.get("personas"), config, weights=options.get("weights", "full"))
        host = options.get("host", "127.0.0.1")
        port = free_port(host)
        self.url = f"http://{host}:{port}"
        keys = ApiKeys.gather(options.get("api_key"), options.get("api_key_file"))
        app = create_app(state, ServerOptions(api_keys=keys))
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()

    def address(self) -> str:
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the replica's server thread exited while starting")
            time.sleep(0.05)
        return self.url

    def pid(self) -> int:
        return os.getpid()

    def shutdown(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


class RayReplicas:
    """R replica actors on a Ray cluster (`address`), or on a local Ray instance started here."""

    def __init__(self, run_dir: Path, n: int, options: dict[str, Any], address: str | None = None,
                 num_cpus: float = 1.0) -> None:  # fmt: skip
        self.run_dir, self.n, self.options, self.address = run_dir, n, options, address
        self.num_cpus = num_cpus
        self.actors: list[Any] = []
        self.urls: list[str] = []
        self._started_ray = False

    def start(self, timeout: float = 120.0) -> list[str]:
        try:
            import ray
        except ImportError:
            raise UserError("--backend ray needs Ray: pip install 'gigafactory[ray]'") from None
        if not ray.is_initialized():
            ray.init(address=self.address, include_dashboard=False, logging_level="warning",
                     runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}})  # fmt: skip
            self._started_ray = True
        actor = ray.remote(num_cpus=self.num_cpus, max_restarts=0)(ReplicaServer)
        self.actors = [actor.remote(str(self.run_dir.resolve()), self.options) for _ in range(self.n)]
        self.urls = ray.get([a.address.remote() for a in self.actors], timeout=timeout)
        wait_healthy(self.urls, timeout)
        return self.urls

    def kill(self, i: int) -> None:
        """End replica `i` abruptly (its process dies; what it was serving is cut off)."""
        import ray

        ray.kill(self.actors[i], no_restart=True)

    def stop(self, timeout: float = 30.0) -> None:
        import ray

        if self.actors:
            refs = [a.shutdown.remote() for a in self.actors]
            try:
                ray.get(refs, timeout=timeout)
            except Exception:  # noqa: BLE001 - an actor already killed cannot shut down; kill the rest anyway
                pass
            for a in self.actors:
                ray.kill(a, no_restart=True)
            self.actors = []
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False
