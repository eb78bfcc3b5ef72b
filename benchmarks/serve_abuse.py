"""How `gigafactory serve` holds up under abuse, on loopback only and bounded in requests and time.

Starts one server (`gigafactory serve RUN --max-body-mb M`) and measures /health latency (p50, p99, max over
continuous polling) in four phases:

1. quiet: nothing else going on;
2. huge bodies: 5 MB prompts sent back to back (refused with 413 by the body limit);
3. big prompts under the limit: prompts of 0.9 × the limit, parsed off the event loop and refused as longer
   than the context (400 `context_length_exceeded`);
4. a bad-request burst: the malformed requests of tests/test_serve_api.py, over and over.

It also reports how long each refusal took, the server's resident memory afterwards, and that the server still
answers a normal request. The ratio of each phase's p99 to the quiet p99 is printed.

    python benchmarks/serve_abuse.py --run-dir /tmp/serve_run
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def poll_health(url: str, stop: threading.Event, out: list[float]) -> None:
    with httpx.Client(timeout=30) as client:
        while not stop.is_set():
            t = time.perf_counter()
            resp = client.get(f"{url}/health")
            out.append(time.perf_counter() - t)
            if resp.status_code != 200:
                out.append(float("inf"))
            time.sleep(0.01)


def phase(url: str, seconds: float, attack) -> tuple[list[float], list[tuple[int, float]]]:
    """Health latencies while `attack(client)` runs repeatedly for `seconds`; also each attack's (status, s)."""
    lat: list[float] = []
    refusals: list[tuple[int, float]] = []
    stop = threading.Event()
    poller = threading.Thread(target=poll_health, args=(url, stop, lat))
    poller.start()
    end = time.monotonic() + seconds
    with httpx.Client(timeout=60) as client:
        while time.monotonic() < end:
            if attack is None:
                time.sleep(0.05)
                continue
            t = time.perf_counter()
            status = attack(client)
            refusals.append((status, time.perf_counter() - t))
    stop.set()
    poller.join()
    return lat, refusals


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", type=Path, default=Path("/tmp/serve_run"))
    ap.add_argument("--seconds", type=float, default=6.0, help="length of each phase")
    ap.add_argument("--max-body-mb", type=float, default=4.0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_serve_api import BAD  # the same malformed requests as the test suite

    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "gigafactory", "serve", str(args.run_dir), "--port", str(port),
           "--max-body-mb", str(args.max_body_mb)]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit("the server did not start")
            time.sleep(0.2)
        json_headers = {"content-type": "application/json"}
        huge = json.dumps({"model": "ROMEO", "messages": [{"role": "user", "content": "x" * (5 * 2**20)}]}).encode()
        size = int(0.9 * args.max_body_mb * 2**20)
        big = json.dumps({"model": "ROMEO", "messages": [{"role": "user", "content": "word " * (size // 5)}]}).encode()
        bad_cycle = iter(BAD * 1000)

        def send_bad(client: httpx.Client) -> int:
            path, body, _, _ = next(bad_cycle)
            if isinstance(body, dict) and set(body) == {"content", "headers"}:
                return client.post(url + path, **body).status_code
            return client.post(url + path, content=json.dumps(body).encode(), headers=json_headers).status_code

        phases = {
            "quiet": None,
            "5 MB bodies (413)": lambda c: c.post(f"{url}/v1/chat/completions", content=huge, headers=json_headers)
            .status_code,
            f"{size / 2**20:.1f} MB prompts (400)": lambda c: c.post(
                f"{url}/v1/chat/completions", content=big, headers=json_headers
            ).status_code,
            "bad-request burst": send_bad,
        }
        report: dict[str, dict[str, float]] = {}
        quiet_p99 = None
        print(f"{'phase':<24} {'health p50':>11} {'p99':>9} {'max':>9} {'p99/quiet':>10} {'refusals':>9} "
              f"{'statuses':>16} {'refusal p50':>12}")  # fmt: skip
        for name, attack in phases.items():
            lat, refusals = phase(url, args.seconds, attack)
            p50, p99, worst = pct(lat, 0.5) * 1e3, pct(lat, 0.99) * 1e3, max(lat) * 1e3
            quiet_p99 = quiet_p99 or p99
            statuses = sorted({s for s, _ in refusals})
            ref_p50 = statistics.median([t for _, t in refusals]) * 1e3 if refusals else float("nan")
            print(f"{name:<24} {p50:>9.1f}ms {p99:>7.1f}ms {worst:>7.1f}ms {p99 / quiet_p99:>10.2f} "
                  f"{len(refusals):>9} {str(statuses):>16} {ref_p50:>10.1f}ms")  # fmt: skip
            report[name] = {"health_p50_ms": p50, "health_p99_ms": p99, "health_max_ms": worst,
                            "refusals": len(refusals), "refusal_p50_ms": ref_p50,
                            "server_errors": sum(s >= 500 for s, _ in refusals)}  # fmt: skip
        ok = httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": "ROMEO", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
            timeout=30,
        ).status_code
        mem = rss_mb(proc.pid)
        print(f"afterwards: a normal request -> {ok}; /health -> {httpx.get(f'{url}/health').status_code}; "
              f"server RSS {mem:.0f} MB; 5xx during abuse: {sum(r['server_errors'] for r in report.values())}")
        if args.json:
            args.json.write_text(json.dumps({"phases": report, "normal_request": ok, "rss_mb": mem}, indent=1))
    finally:
        proc.terminate()
        proc.wait(10)


if __name__ == "__main__":
    main()
