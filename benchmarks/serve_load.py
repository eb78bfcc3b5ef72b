"""Load generator for `gigafactory serve`, on loopback only and bounded in requests and time.

Starts two servers on the same run directory, one batching (--max-batch 32) and one serving one request at a
time (--max-batch 1), sends both the same load (fixed concurrency, or Poisson arrivals with --rate), and
reports request throughput, output tokens/s, time to first token and inter-token latency (p50/p99), and the
throughput ratio. Requests are streamed text completions in the corpus' dialogue format with a fixed number of
output tokens (ignore_eos), so both servers produce the same amount of work.

    python benchmarks/serve_load.py --run-dir /tmp/serve_run              # 16 concurrent chats vs baseline
    python benchmarks/serve_load.py --run-dir /tmp/serve_run --soak 120   # + 2 minutes at 32 streams

With --soak S the batching server then takes S seconds of 32 concurrent streams; the report gives failed
requests and the server's resident memory over time (it should stay flat).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

QUESTIONS = [
    "What news from the town?",
    "Wilt thou be gone? It is not yet near day.",
    "Who goes there?",
    "Speak, what is thy name?",
    "How fares my lord today?",
    "Is the king coming hither?",
    "What light through yonder window breaks?",
    "Shall we to supper, friend?",
]


@dataclass
class Result:
    ok: bool
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    tokens: int = 0
    error: str = ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run_dir: Path, max_batch: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "gigafactory", "serve", str(run_dir), "--port", str(port)]
    cmd += ["--max-batch", str(max_batch)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read() if proc.stderr else ''}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not become healthy in 120 s")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def one_request(
    client: httpx.AsyncClient, url: str, persona: str, max_tokens: int, rng: random.Random, temperature: float
) -> Result:
    prompt = f"Stranger:\n{rng.choice(QUESTIONS)}\n\n{persona}:\n"
    body = {
        "model": persona,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "seed": rng.randrange(2**31),
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    t0 = time.perf_counter()
    res = Result(ok=False)
    last = None
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                res.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    res.error = str(event["error"])
                    return res
                if event.get("usage"):
                    res.tokens = event["usage"]["completion_tokens"]
                if event["choices"] and event["choices"][0]["text"]:
                    now = time.perf_counter()
                    if last is None:
                        res.ttft = now - t0
                    else:
                        res.itl.append(now - last)
                    last = now
        res.ok = res.tokens > 0
        res.latency = time.perf_counter() - t0
        if not res.ok:
            res.error = "no tokens"
    except httpx.HTTPError as err:
        res.error = f"{type(err).__name__}: {err}"
    return res


async def run_load(
    url: str,
    personas: list[str],
    n: int,
    concurrency: int,
    rate: float | None,
    max_tokens: int,
    seed: int,
    until: float | None = None,
    temperature: float = 0.0,
) -> tuple[list[Result], float]:
    """n requests (or, with `until`, as many as fit before that time) from `concurrency` clients; with `rate`,
    arrivals are Poisson at `rate` per second (still at most `concurrency` in flight)."""
    rng = random.Random(seed)
    gate = asyncio.Semaphore(concurrency)
    results: list[Result] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0), limits=limits) as client:

        async def worker(persona: str) -> None:
            async with gate:
                results.append(await one_request(client, url, persona, max_tokens, rng, temperature))

        t0 = time.perf_counter()
        tasks = []
        i = 0
        while (until is None and i < n) or (until is not None and time.monotonic() < until):
            if rate:
                await asyncio.sleep(rng.expovariate(rate))
            elif until is not None:
                while gate.locked() and time.monotonic() < until:
                    await asyncio.sleep(0.01)
            tasks.append(asyncio.create_task(worker(personas[i % len(personas)])))
            i += 1
            await asyncio.sleep(0)
        await asyncio.gather(*tasks)
        return results, time.perf_counter() - t0


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1] if len(xs) > 1 else xs[0]


def summarize(name: str, results: list[Result], seconds: float) -> dict[str, float]:
    ok = [r for r in results if r.ok]
    tokens = sum(r.tokens for r in ok)
    itl = [x for r in ok for x in r.itl]
    ttft = [r.ttft for r in ok]
    row = {
        "requests": len(results),
        "failed": len(results) - len(ok),
        "seconds": seconds,
        "req_per_s": len(ok) / seconds,
        "out_tok_per_s": tokens / seconds,
        "ttft_p50_ms": 1000 * pct(ttft, 50),
        "ttft_p99_ms": 1000 * pct(ttft, 99),
        "itl_p50_ms": 1000 * pct(itl, 50),
        "itl_p99_ms": 1000 * pct(itl, 99),
    }
    print(
        f"{name:<22} {row['requests']:>4} req {row['failed']:>3} failed {seconds:>6.1f} s "
        f"{row['req_per_s']:>6.2f} req/s {row['out_tok_per_s']:>7.1f} tok/s  "
        f"TTFT p50 {row['ttft_p50_ms']:>7.1f} p99 {row['ttft_p99_ms']:>7.1f} ms  "
        f"ITL p50 {row['itl_p50_ms']:>6.1f} p99 {row['itl_p99_ms']:>6.1f} ms",
        flush=True,
    )
    for r in [r for r in results if not r.ok][:3]:
        print(f"  failure: {r.error}")
    return row


def personas_of(url: str) -> list[str]:
    return [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]][:8]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", type=Path, default=Path("/tmp/serve_run"))
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--rate", type=float, default=None, help="Poisson arrivals per second (default: closed loop)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy, as vLLM's serving benchmark")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-baseline", action="store_true", help="skip the one-at-a-time server")
    ap.add_argument("--soak", type=float, default=0.0, help="seconds of 32 concurrent streams after the benchmark")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    if args.soak > 600 or args.requests > 2000:
        raise SystemExit("bounded on purpose: at most 600 s of soak and 2000 requests")
    if not (args.run_dir / "spec.json").is_file():
        print(f"training a tiny run in {args.run_dir} ...", flush=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "gigafactory",
                "train",
                "--model",
                "tiny",
                "--steps",
                "60",
                "--run-dir",
                str(args.run_dir),
                "--dtype",
                "fp32",
            ],
            check=True,
        )
    report: dict[str, object] = {"concurrency": args.concurrency, "max_tokens": args.max_tokens}
    print(f"{args.requests} requests, {args.concurrency} concurrent, {args.max_tokens} output tokens each", flush=True)

    def bench(max_batch: int, name: str) -> dict[str, float]:
        proc, url = start_server(args.run_dir, max_batch)
        try:
            personas = personas_of(url)
            asyncio.run(run_load(url, personas, 4, 4, None, 8, args.seed + 1))  # warm-up
            results, secs = asyncio.run(
                run_load(
                    url,
                    personas,
                    args.requests,
                    args.concurrency,
                    args.rate,
                    args.max_tokens,
                    args.seed,
                    temperature=args.temperature,
                )
            )
            return summarize(name, results, secs)
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    batched = bench(32, "batched (max-batch 32)")
    report["batched"] = batched
    if not args.no_baseline:
        base = bench(1, "one at a time")
        report["baseline"] = base
        report["throughput_ratio"] = batched["out_tok_per_s"] / base["out_tok_per_s"]
        print(f"output tokens/s ratio, batched / one at a time: {report['throughput_ratio']:.1f}x", flush=True)

    if args.soak > 0:
        proc, url = start_server(args.run_dir, 32)
        try:
            personas = personas_of(url)
            samples: list[tuple[float, float]] = []

            async def soak() -> tuple[list[Result], float]:
                end = time.monotonic() + args.soak

                async def sample_memory() -> None:
                    t0 = time.monotonic()
                    while time.monotonic() < end:
                        samples.append((time.monotonic() - t0, rss_mb(proc.pid)))
                        await asyncio.sleep(5)

                mem = asyncio.create_task(sample_memory())
                out = await run_load(
                    url, personas, 0, 32, None, args.max_tokens, args.seed + 2, until=end, temperature=args.temperature
                )
                await mem
                return out

            results, secs = asyncio.run(soak())
            row = summarize(f"soak {args.soak:.0f} s x 32 streams", results, secs)
            healthy = httpx.get(f"{url}/health").status_code == 200
            first = [m for t, m in samples if t >= 10][:1] or [samples[0][1]]
            growth = samples[-1][1] - first[0]
            print(
                f"server RSS MB: start {samples[0][1]:.0f}, after 10 s {first[0]:.0f}, max "
                f"{max(m for _, m in samples):.0f}, end {samples[-1][1]:.0f} (growth after warm-up {growth:+.1f} MB); "
                f"health after soak: {'ok' if healthy else 'FAILED'}",
                flush=True,
            )
            report["soak"] = {**row, "rss_mb": samples, "rss_growth_mb": growth, "healthy_after": healthy}
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
