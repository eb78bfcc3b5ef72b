"""The commands that put the router in front of replicas: `gigafactory router URL...` (servers that already run,
here or elsewhere) and `gigafactory serve RUN --replicas R [--backend local|ray]` (starts them first)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from gigafactory.errors import UserError

if TYPE_CHECKING:  # the router pulls in fastapi and httpx: imported by the commands that run it, not at start-up
    from gigafactory.serve.router import RoutingPolicy

BACKENDS = ("local", "ray")


def run_router(urls: list[str], host: str, port: int, policy: RoutingPolicy, drain_timeout: float,
               on_shutdown: Any = None) -> None:  # fmt: skip
    import uvicorn

    from gigafactory.serve.router import Replica, Router, create_router_app

    replicas = [Replica(url.rstrip("/").removesuffix("/v1"), f"r{i}") for i, url in enumerate(urls)]
    app = create_router_app(Router(replicas, policy), on_shutdown)
    print(f"routing over {len(replicas)} replicas on http://{host}:{port}/v1", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=int(drain_timeout))


def router(
    urls: list[str] = typer.Argument(..., help="base URLs of running `gigafactory serve` servers"),
    host: str = typer.Option("127.0.0.1", help="interface to listen on"),
    port: int = typer.Option(8000, min=0, max=65535),
    prefix_chars: int = typer.Option(256, min=0, help="characters of the conversation that pick the replica"),
    slack: int = typer.Option(4, min=0, help="extra in-flight requests a preferred replica may take"),
    drain_timeout: float = typer.Option(30.0, min=0, help="seconds in-flight responses get to finish on shutdown"),
) -> None:
    """One OpenAI-compatible front over several servers: persona/prefix affinity, load bounds, fail-over."""
    from gigafactory.serve.router import RoutingPolicy

    for url in urls:
        if not url.startswith(("http://", "https://")):
            raise UserError(f"replica URL {url!r} must start with http:// or https://")
    run_router(urls, host, port, RoutingPolicy(prefix_chars, slack), drain_timeout)


def serve_replicas(run_dir: Path, replicas: int, backend: str, host: str, port: int, serve_args: list[str],
                   options: dict[str, Any], ray_address: str | None, drain_timeout: float) -> None:  # fmt: skip
    """Start `replicas` engines on `backend`, then the router in front of them; stop them after it drains."""
    from gigafactory.serve.replicas import LocalReplicas, RayReplicas
    from gigafactory.serve.router import RoutingPolicy

    if backend not in BACKENDS:
        raise UserError(f"unknown --backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if not (Path(run_dir) / "checkpoints").exists() and not Path(run_dir).is_dir():
        raise UserError(f"{run_dir} is not a run directory")
    fleet = (
        LocalReplicas(Path(run_dir), replicas, serve_args)
        if backend == "local"
        else RayReplicas(Path(run_dir), replicas, options, ray_address)
    )
    try:
        urls = fleet.start()
        run_router(urls, host, port, RoutingPolicy(), drain_timeout)  # returns once drained
    finally:
        fleet.stop()


def register(app: typer.Typer) -> None:
    app.command("router")(router)
