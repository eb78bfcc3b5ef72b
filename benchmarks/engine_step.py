"""Where the serving engine's step time goes, at 16 and 64 concurrent sequences (`small`, random weights, fp32).

Each sequence has a 20-token prompt and decodes 64 tokens greedily (ignore_eos), as in the vLLM side by side.
All sequences are submitted at once; the engine steps until all are done. Time is split by wrapping the
engine's own phases: scheduling (inbox, admission, token budget), building the batch tensors and the paged
cache's index tensors, the model forward (split again with `torch.profiler` into the model's own math and the
KV-cache gather/scatter), and the per-sequence work after the forward (sampling, text, metrics). Reported as
milliseconds per step and shares, for steps that decode only (the steady state) and overall.

    .venv/bin/python benchmarks/engine_step.py [--model small] [--concurrency 16 64] [--max-batch 64] [--gil]

`--gil` also measures the engine at 16 concurrent while another thread of the same process runs pure Python
(as the HTTP event loop does: JSON, SSE framing), alternating rounds with and without it, and prints the ratio
of output tokens/s: the cost of sharing the interpreter lock with the server thread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from importlib.resources import files
from typing import Any

import torch

from gigafactory.model import GrokModel
from gigafactory.serve import kv_cache
from gigafactory.serve.engine import Engine, EngineConfig
from gigafactory.serve.sampling import SamplingParams
from gigafactory.specs import load_spec
from gigafactory.tokenizer import train_tokenizer


class Timers:
    def __init__(self) -> None:
        self.total: dict[str, float] = defaultdict(float)

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.total[name] += time.perf_counter() - start

        return timed


def build(model_name: str, max_batch: int) -> tuple[Engine, Any, Timers]:
    spec = load_spec(model_name)
    torch.manual_seed(0)
    model = GrokModel(spec).eval()
    text = (files("gigafactory") / "data" / "tinyshakespeare.txt").read_text()[:200_000]
    tok = train_tokenizer([text], spec.vocab_size)
    config = EngineConfig(max_batch=max_batch, kv_cache_mb=256.0, step_tokens=max(256, 20 * max_batch))
    engine = Engine(model, tok, config)
    timers = Timers()
    # Phases of `Engine.step`, timed in place.
    for name in ("_take_inbox", "_admit", "_schedule", "_append"):
        setattr(engine, name, timers.wrap(name, getattr(engine, name)))
    engine.pool.register_full_blocks = timers.wrap("register_blocks", engine.pool.register_full_blocks)
    engine.model = timers.wrap("model", model)
    # Inside the forward: attention (projections, RoPE, KV-cache scatter/gather, attend) and the experts'
    # grouped matmuls; the rest of the model is norms, the router, dispatch and the output head.
    for block in model.layers.values():
        block.attn.forward = timers.wrap("  attention", block.attn.forward)
        block.moe.experts.forward = timers.wrap("  experts", block.moe.experts.forward)
    return engine, tok, timers


def run(engine: Engine, tok: Any, timers: Timers, n: int, prompt_len: int, out_len: int) -> dict[str, float]:
    ids = tok.encode((files("gigafactory") / "data" / "tinyshakespeare.txt").read_text()[:4000]).ids
    finished = []
    for i in range(n):
        prompt = ids[i : i + prompt_len]
        params = SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True)
        engine.add(prompt, params, lambda o: finished.append(o) if o.finish_reason else None)
    timers.total.clear()
    steps = 0
    original_batch = kv_cache.PagedBatch.__init__
    kv_cache.PagedBatch.__init__ = timers.wrap("paged_batch", original_batch)  # type: ignore[method-assign]
    start = time.perf_counter()
    with torch.inference_mode():
        while len(finished) < n:
            engine.step()
            steps += 1
    wall = time.perf_counter() - start
    kv_cache.PagedBatch.__init__ = original_batch  # type: ignore[method-assign]
    out = dict(timers.total)
    out["wall"], out["steps"], out["tokens"] = wall, steps, n * out_len
    return out


def profile_model(engine: Engine, tok: Any, n: int, prompt_len: int) -> dict[str, float]:
    """One decode step at n sequences under torch.profiler: self CPU time by operator group."""
    ids = tok.encode("What light through yonder window breaks? " * 8).ids
    for i in range(n):
        engine.add(ids[i % 7 : i % 7 + prompt_len], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True),
                   lambda o: None)  # fmt: skip
    with torch.inference_mode():
        for _ in range(3):  # prefill and a first decode
            engine.step()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            engine.step()
        while engine.running or engine.waiting:
            engine.step()
    groups: dict[str, float] = defaultdict(float)
    for evt in prof.key_averages():
        name = evt.key
        if name.startswith("aten::") or name.startswith("gigafactory"):
            groups[_group(name)] += evt.self_cpu_time_total / 1e3
    return dict(groups)


def gil_ratio(model_name: str, rounds: int = 2, n: int = 16, out_len: int = 64, interval: float = 0.005) -> None:
    sys.setswitchinterval(interval)
    engine, tok, timers = build(model_name, 64)
    ids = tok.encode("What light through yonder window breaks? " * 8).ids

    def once(busy: bool) -> float:
        done: list[int] = []
        for i in range(n):
            engine.add(ids[i % 7 : i % 7 + 20], SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True),
                       lambda o: done.append(1) if o.finish_reason else None)  # fmt: skip
        stop = threading.Event()

        def burn() -> None:
            while not stop.is_set():
                json.dumps({"id": "cmpl-0123456789", "choices": [{"index": 0, "text": " word", "logprobs": None}]})

        thread = threading.Thread(target=burn) if busy else None
        if thread is not None:
            thread.start()
        start = time.perf_counter()
        with torch.inference_mode():
            while len(done) < n:
                engine.step()
        wall = time.perf_counter() - start
        stop.set()
        if thread is not None:
            thread.join()
        return n * out_len / wall

    once(False)  # warm-up
    alone, shared = [], []
    for _ in range(rounds):
        alone.append(once(False))
        shared.append(once(True))
    a, b = statistics.median(alone), statistics.median(shared)
    print(f"\n{model_name}, {n} concurrent, GIL switch interval {1e3 * interval:g} ms: {a:.0f} tokens/s alone, "
          f"{b:.0f} with a busy Python thread in the process (ratio {b / a:.2f}, medians of {rounds} alternating "
          "rounds)")  # fmt: skip


_MATMUL = {"aten::mm", "aten::bmm", "aten::addmm", "aten::matmul", "aten::linear", "aten::_weight_int8pack_mm"}
_INDEX = {
    "aten::index",
    "aten::index_put_",
    "aten::_index_put_impl_",
    "aten::gather",
    "aten::index_select",
    "aten::nonzero",
    "aten::index_add_",
    "aten::cat",
    "aten::copy_",
    "aten::clone",
    "aten::contiguous",
}
_ELEMENTWISE = {
    "aten::softmax",
    "aten::_softmax",
    "aten::exp",
    "aten::gelu",
    "aten::mul",
    "aten::add",
    "aten::div",
    "aten::rsqrt",
    "aten::pow",
    "aten::mean",
    "aten::tanh",
    "aten::where",
    "aten::sub",
}


def _group(op: str) -> str:
    if op in _MATMUL:
        return "matmul"
    if op in _INDEX:
        return "index/copy"
    return "elementwise" if op in _ELEMENTWISE else "other"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="small")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--gil", action="store_true", help="also measure the cost of a busy Python thread")
    ap.add_argument("--switch-interval", type=float, nargs="+", default=[5.0], help="ms (Python's default: 5)")
    ap.add_argument("--gil-only", action="store_true", help="skip the breakdown")
    args = ap.parse_args()
    torch.set_num_threads(1)
    phases = ["_take_inbox", "_admit", "_schedule", "paged_batch", "model", "register_blocks", "_append"]
    inside = ["  attention", "  experts"]  # parts of "model", not added to the accounted time
    for n in [] if args.gil_only else args.concurrency:
        engine, tok, timers = build(args.model, args.max_batch)
        run(engine, tok, timers, min(n, 4), args.prompt, 4)  # warm-up
        r = run(engine, tok, timers, n, args.prompt, args.tokens)
        step_ms = 1e3 * r["wall"] / r["steps"]
        print(f"\n{args.model}, {n} concurrent, max_batch {args.max_batch}: {r['tokens'] / r['wall']:.0f} output "
              f"tokens/s, {r['steps']:.0f} steps, {step_ms:.1f} ms/step")  # fmt: skip
        # `_append` runs inside the step after the model; `model` includes paged_batch's consumers, not its init.
        accounted = sum(r.get(p, 0.0) for p in phases)
        for p in phases[:5] + inside + phases[5:]:
            ms = 1e3 * r.get(p, 0.0) / r["steps"]
            print(f"  {p:16s} {ms:7.2f} ms/step  {100 * r.get(p, 0.0) / r['wall']:5.1f} %")
        rest = r["wall"] - accounted
        print(f"  {'rest of step':16s} {1e3 * rest / r['steps']:7.2f} ms/step  {100 * rest / r['wall']:5.1f} %")
        groups = profile_model(engine, tok, n, args.prompt)
        total = sum(groups.values())
        print("  one decode step under torch.profiler, self CPU time by operator group:")
        for g, ms in sorted(groups.items(), key=lambda kv: -kv[1]):
            print(f"    {g:12s} {ms:7.2f} ms  {100 * ms / total:5.1f} %")
    if args.gil:
        for interval in args.switch_interval:
            gil_ratio(args.model, interval=interval / 1e3)


if __name__ == "__main__":
    main()
