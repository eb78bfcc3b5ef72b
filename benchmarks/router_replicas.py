"""Replicas behind the router under the same load: 1 against 2, then 2 with one killed mid-load.

Load: multi-turn persona conversations (each turn resends the history, as chat clients do), `--concurrency`
at a time, streamed, greedy, `--max-tokens` each. For each fleet: output tokens/s and the prefix-cache hit rate
from the router's summed /metrics. Then, with 2 replicas, one replica process is killed (SIGKILL) once it is
streaming: counted are requests completed, streams ended with `replica_lost`, and anything else (lost).
Local replica processes, one thread each; run it through /work/heavy.sh on a shared machine.

    .venv/bin/python benchmarks/router_replicas.py --run-dir RUN [--conversations 24] [--turns 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import uvicorn

from gigafactory.serve.replicas import LocalReplicas, free_port
from gigafactory.serve.router import Replica, Router, RoutingPolicy, create_router_app

LINES = ["Good morrow, friend.", "What news from the town?", "Who goes there?", "How fares my lord today?",
         "Is the king coming hither?", "Shall we to supper?"]  # fmt: skip


def start_router(urls: list[str]) -> tuple[uvicorn.Server, threading.Thread, str, Router]:
    router = Router([Replica(u, f"r{i}") for i, u in enumerate(urls)], RoutingPolicy(), health_interval=0.5)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_router_app(router), port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{port}", router


async def conversation(client: httpx.AsyncClient, url: str, persona: str, i: int, turns: int, max_tokens: int,
                       outcomes: list[str], on_text=None) -> int:  # fmt: skip
    history: list[dict[str, str]] = []
    tokens = 0
    for t in range(turns):
        history.append({"role": "user", "content": f"{LINES[(i + t) % len(LINES)]} ({i})"})
        body = {"model": persona, "messages": history, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "ignore_eos": True, "stream_options": {"include_usage": True}}  # fmt: skip
        reply, outcome = "", "incomplete"
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
            replica = resp.headers.get("x-gigafactory-replica")
            async for line in resp.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    outcome = "error:" + str(event["error"].get("code"))
                elif event.get("usage"):
                    tokens += event["usage"]["completion_tokens"]
                elif event["choices"]:
                    reply += event["choices"][0]["delta"].get("content") or ""
                    if on_text is not None and reply:
                        on_text(replica)
                    if event["choices"][0].get("finish_reason"):
                        outcome = "completed"
        outcomes.append(outcome)
        if outcome != "completed":
            return tokens
        history.append({"role": "assistant", "content": reply})
    return tokens


async def load(url: str, personas: list[str], args: argparse.Namespace, on_text=None, during=None) -> tuple:
    outcomes: list[str] = []
    sem = asyncio.Semaphore(args.concurrency)
    async with httpx.AsyncClient(timeout=600) as client:

        async def one(i: int) -> int:
            async with sem:
                return await conversation(client, url, personas[i % len(personas)], i, args.turns, args.max_tokens,
                                          outcomes, on_text)  # fmt: skip

        start = time.perf_counter()
        tasks = [asyncio.create_task(one(i)) for i in range(args.conversations)]
        if during is not None:
            await during()
        tokens = sum(await asyncio.gather(*tasks))
        wall = time.perf_counter() - start
        metrics = (await client.get(f"{url}/metrics")).text
    rate = next((float(ln.split()[-1]) for ln in metrics.splitlines()
                 if ln.startswith("gigafactory_serve_prefix_cache_hit_rate")), float("nan"))  # fmt: skip
    return tokens / wall, rate, outcomes


def fleet_run(args: argparse.Namespace, n: int) -> tuple[float, float]:
    fleet = LocalReplicas(args.run_dir, n, ["--max-batch", "32"])
    try:
        urls = fleet.start()
        server, thread, url, _ = start_router(urls)
        personas = [p["id"] for p in httpx.get(f"{url}/v1/models").json()["data"]][: args.personas]
        tps, hit, outcomes = asyncio.run(load(url, personas, args))
        print(f"{n} replica(s): {tps:7.1f} output tokens/s  prefix-cache hit rate {hit:.3f}  "
              f"turns completed {outcomes.count('completed')}/{len(outcomes)}", flush=True)  # fmt: skip
        server.should_exit = True
        thread.join(10)
        return tps, hit
    finally:
        fleet.stop()


def kill_run(args: argparse.Namespace) -> None:
    fleet = LocalReplicas(args.run_dir, 2, ["--max-batch", "32"])
    try:
        urls = fleet.start()
        server, thread, url, router = start_router(urls)
        personas = [p["id"] for p in httpx.get(f"{url}/v1/models").json()["data"]][: args.personas]
        streaming = asyncio.Event()

        def on_text(replica: str | None) -> None:
            if replica == "r1":
                streaming.set()

        async def kill_when_streaming() -> None:
            await asyncio.wait_for(streaming.wait(), 120)
            os.kill(fleet.procs[1].pid, signal.SIGKILL)

        tps, _, outcomes = asyncio.run(load(url, personas, args, on_text, kill_when_streaming))
        moved = sum(s.value for fam in router.metrics.registry.collect() for s in fam.samples
                    if s.name == "gigafactory_router_retries_total")  # fmt: skip
        lost = len(outcomes) - outcomes.count("completed") - outcomes.count("error:replica_lost")
        print(f"2 replicas, r1 killed mid-load: {outcomes.count('completed')} turns completed, "
              f"{outcomes.count('error:replica_lost')} streams ended with replica_lost, {lost} other failures, "
              f"{moved:.0f} requests moved to the survivor", flush=True)  # fmt: skip
        server.should_exit = True
        thread.join(10)
    finally:
        fleet.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", type=Path, required=True)
    ap.add_argument("--conversations", type=int, default=24)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--personas", type=int, default=6)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=24)
    args = ap.parse_args()
    one = fleet_run(args, 1)
    two = fleet_run(args, 2)
    print(f"2 replicas / 1: tokens/s {two[0] / one[0]:.2f}x, hit rate {two[1]:.3f} vs {one[1]:.3f}", flush=True)
    kill_run(args)


if __name__ == "__main__":
    main()
