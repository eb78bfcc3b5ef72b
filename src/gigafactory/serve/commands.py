"""`gigafactory serve RUN_DIR`: the OpenAI-compatible persona chat server."""

from __future__ import annotations

from pathlib import Path

import typer


def serve(
    run_dir: Path = typer.Argument(..., help="a run directory written by `gigafactory train`"),
    host: str = typer.Option("127.0.0.1", help="interface to listen on"),
    port: int = typer.Option(8000, min=0, max=65535),
    personas: Path | None = typer.Option(None, help="folder of Character Card V2 files (.json or .png)"),
    max_batch: int = typer.Option(32, min=1, help="sequences decoded together (1 = no batching)"),
    kv_cache_mb: float = typer.Option(64.0, min=0.01, help="memory budget of the paged KV cache"),
    block_size: int = typer.Option(16, min=1, help="tokens per KV-cache block"),
    max_queue: int = typer.Option(256, min=1, help="waiting requests beyond this get HTTP 429"),
    step_tokens: int = typer.Option(256, min=1, help="tokens per engine step (decodes + prefill chunks)"),
    threads: int = typer.Option(1, min=1, help="torch CPU threads for the engine"),
    weights: str = typer.Option("full", help="full, or int8 (per-channel 8-bit linear and expert weights)"),
    health_timeout: float = typer.Option(10.0, min=0.1, help="/health fails after this long without an engine step"),
) -> None:
    """Serve a trained run's personas with the OpenAI API (chat/completions, completions, models)."""
    import uvicorn

    from gigafactory.serve.api import build_state, create_app
    from gigafactory.serve.engine import EngineConfig

    config = EngineConfig(
        max_batch=max_batch,
        kv_cache_mb=kv_cache_mb,
        block_size=block_size,
        max_queue=max_queue,
        step_tokens=step_tokens,
        threads=threads,
    )
    state = build_state(run_dir, personas, config, health_timeout, weights)
    print(f"serving {len(state.personas)} personas from {run_dir} on http://{host}:{port}/v1", flush=True)
    uvicorn.run(create_app(state), host=host, port=port, log_level="warning")


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
