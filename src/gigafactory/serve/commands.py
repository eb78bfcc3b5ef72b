"""`gigafactory serve RUN_DIR`: the OpenAI-compatible persona chat server."""

from __future__ import annotations

from pathlib import Path

import typer


def serve(
    run_dir: Path = typer.Argument(..., help="a run directory written by `gigafactory train`"),
    host: str = typer.Option("127.0.0.1", help="interface to listen on"),
    port: int = typer.Option(8000, min=0, max=65535),
    personas: Path | None = typer.Option(None, help="folder of character cards V1/V2/V3 (.json or .png)"),
    max_batch: int = typer.Option(32, min=1, help="sequences decoded together (1 = no batching)"),
    kv_cache_mb: float = typer.Option(64.0, min=0.01, help="memory budget of the paged KV cache"),
    block_size: int = typer.Option(16, min=1, help="tokens per KV-cache block"),
    max_queue: int = typer.Option(256, min=1, help="waiting requests beyond this get HTTP 429"),
    step_tokens: int = typer.Option(256, min=1, help="tokens per engine step (decodes + prefill chunks)"),
    threads: int = typer.Option(1, min=1, help="torch CPU threads for the engine"),
    weights: str = typer.Option("full", help="full, or int8 (per-channel 8-bit linear and expert weights)"),
    health_timeout: float = typer.Option(10.0, min=0.1, help="/health fails after this long without an engine step"),
    api_key: list[str] | None = typer.Option(
        None, help="require 'Authorization: Bearer KEY' on /v1/* (repeat for several; also $GIGAFACTORY_API_KEYS)"
    ),
    api_key_file: Path | None = typer.Option(None, help="a file of API keys, one per line"),
    allowed_origins: list[str] | None = typer.Option(None, help="browser origins allowed by CORS (repeatable)"),
    docs: bool = typer.Option(False, help="serve the OpenAPI docs at /docs"),
    max_body_mb: float = typer.Option(4.0, min=0.001, help="larger request bodies get HTTP 413"),
    max_concurrent_per_key: int = typer.Option(64, min=0, help="requests in flight per API key or address (0 = off)"),
    rate_limit: float = typer.Option(0.0, min=0.0, help="requests per minute per API key or address (0 = off)"),
    keepalive: float = typer.Option(5.0, min=0.05, help="seconds of silence before a stream sends a keep-alive"),
    replicas: int = typer.Option(1, min=1, help="engines behind one persona-aware router (see --backend)"),
    backend: str = typer.Option("local", help="where --replicas run: local (processes) or ray (actors)"),
    ray_address: str | None = typer.Option(None, help="Ray cluster to place replicas on (default: start one here)"),
    tp: int = typer.Option(1, min=1, help="tensor-parallel ranks under torchrun (attention heads, expert columns)"),
    ep: int = typer.Option(1, min=1, help="expert-parallel ranks (whole experts per rank; heads split as by --tp)"),
    engine_process: bool = typer.Option(
        True, help="run the engine in a process of its own (else a thread sharing the HTTP side's interpreter lock)"
    ),
) -> None:
    """Serve a trained run's personas with the OpenAI API (chat/completions, completions, models) and a chat page."""
    import ipaddress
    import sys

    import uvicorn

    from gigafactory.serve.api import ServerOptions, build_state, create_app
    from gigafactory.serve.engine import EngineConfig
    from gigafactory.serve.limits import ApiKeys

    keys = ApiKeys.gather(api_key, api_key_file)
    options = ServerOptions(
        api_keys=keys,
        allowed_origins=list(allowed_origins or []),
        docs=docs,
        max_body_mb=max_body_mb,
        concurrency_per_caller=max_concurrent_per_key,
        rate_per_caller=rate_limit,
        keepalive_s=keepalive,
    )
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not keys:
        print(
            f"warning: serving on {host}, reachable from other machines, without an API key; "
            "anyone who can reach it can use it (--api-key or $GIGAFACTORY_API_KEYS)",
            file=sys.stderr,
            flush=True,
        )

    config = EngineConfig(
        max_batch=max_batch,
        kv_cache_mb=kv_cache_mb,
        block_size=block_size,
        max_queue=max_queue,
        step_tokens=step_tokens,
        threads=threads,
    )
    if replicas > 1 or backend != "local":
        from gigafactory.serve.scale import serve_replicas

        args = [f"--{k.replace('_', '-')}={v}" for k, v in vars(config).items()] + [f"--weights={weights}"]
        args += [f"--personas={personas}"] if personas else []
        args += [f"--api-key={k}" for k in api_key or []] + ([f"--api-key-file={api_key_file}"] if api_key_file else [])
        actor = {"engine": vars(config), "personas": personas, "weights": weights, "api_key": api_key,
                 "api_key_file": api_key_file}  # fmt: skip
        return serve_replicas(run_dir, replicas, backend, host, port, args, actor, ray_address, 30.0)
    if tp > 1 or ep > 1:
        from gigafactory.serve.parallel import serve_parallel

        return serve_parallel(run_dir, tp, ep, host, port, personas, config, health_timeout, weights, options)
    state = build_state(run_dir, personas, config, health_timeout, weights, process=engine_process)
    auth = f", {len(keys)} API key(s)" if keys else ""
    print(f"serving {len(state.personas)} personas from {run_dir} on http://{host}:{port}/v1{auth}", flush=True)
    print(f"chat page: http://{host}:{port}/", flush=True)
    uvicorn.run(create_app(state, options), host=host, port=port, log_level="warning")


def register(app: typer.Typer) -> None:
    from gigafactory.serve import scale

    app.command("serve")(serve)
    scale.register(app)
