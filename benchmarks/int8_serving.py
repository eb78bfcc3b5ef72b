"""8-bit weights vs full precision for serving, as ratios measured in one run (the machine is shared and noisy).

Prints, for a preset (default `small`, random weights) and for `--weights int8` (`gigafactory.interop.int8`):
- resident weight bytes (every parameter and buffer) of the fp32 model, the same model in bf16, and int8;
  and the bytes of the quantised matrices alone (attention, experts, dense FFN) against bf16;
- decode speed (greedy, KV cache, batch 1) and prefill speed (4 x 128 tokens) in tokens/s of fp32 and int8,
  alternating rounds so that background load hits both alike; medians are reported;
- agreement of the greedy tokens over the same generation (teacher-forced on the fp32 output).

    .venv/bin/python benchmarks/int8_serving.py [--model small] [--tokens 48] [--rounds 3]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from gigafactory.interop.int8 import Int8Experts, Int8Linear, quantize_model, weight_bytes
from gigafactory.model import GrokModel
from gigafactory.model.generate import generate
from gigafactory.specs import load_spec


def decode_rate(model: GrokModel, prompt: list[int], tokens: int) -> tuple[float, list[int]]:
    start = time.perf_counter()
    out = list(generate(model, prompt, tokens, temperature=0.0))
    return len(out) / (time.perf_counter() - start), out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="small")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)

    spec = load_spec(args.model)
    full = GrokModel(spec)
    full.init_weights(seed=0)
    full.eval()
    int8 = quantize_model(copy.deepcopy(full))
    bf16_bytes = weight_bytes(copy.deepcopy(full).to(torch.bfloat16))
    quantized = [m for m in int8.modules() if isinstance(m, Int8Linear | Int8Experts)]
    matrices = [p for n, p in full.named_parameters() if ".attn." in n or ".experts." in n or ".dense." in n]

    print(f"model {spec.name}: {spec.params_total:,} parameters")
    print(f"resident weights: fp32 {weight_bytes(full) / 2**20:.1f} MiB, bf16 {bf16_bytes / 2**20:.1f} MiB, "
          f"int8 {weight_bytes(int8) / 2**20:.1f} MiB (int8 / bf16 = {weight_bytes(int8) / bf16_bytes:.2f}; "
          "embeddings, router and norms stay fp32)")
    q_bytes, m_bf16 = sum(weight_bytes(m) for m in quantized), sum(p.numel() * 2 for p in matrices)
    print(f"quantised matrices alone: int8 {q_bytes / 2**20:.1f} MiB vs bf16 {m_bf16 / 2**20:.1f} MiB "
          f"(ratio {q_bytes / m_bf16:.3f})")

    prompt = torch.randint(1, spec.vocab_size, (16,), generator=torch.Generator().manual_seed(0)).tolist()
    rates: dict[str, list[float]] = {"fp32": [], "int8": []}
    outputs = {}
    with torch.no_grad():
        for _ in range(args.rounds):
            for name, model in (("fp32", full), ("int8", int8)):
                rate, outputs[name] = decode_rate(model, prompt, args.tokens)
                rates[name].append(rate)
        seq = torch.tensor([prompt + outputs["fp32"]])
        prefill: dict[str, list[float]] = {"fp32": [], "int8": []}
        batch = torch.randint(1, spec.vocab_size, (4, 128), generator=torch.Generator().manual_seed(1))
        for _ in range(args.rounds):
            for name, model in (("fp32", full), ("int8", int8)):
                start = time.perf_counter()
                model(batch)
                prefill[name].append(batch.numel() / (time.perf_counter() - start))
        a, b = full(seq)[0, len(prompt) - 1 : -1], int8(seq)[0, len(prompt) - 1 : -1]
    fp, q = statistics.median(rates["fp32"]), statistics.median(rates["int8"])
    print(f"decode (greedy, batch 1, {args.tokens} tokens, 1 thread): fp32 {fp:.1f} tok/s, int8 {q:.1f} tok/s "
          f"(int8 / fp32 = {q / fp:.2f})")
    pf, pq = statistics.median(prefill["fp32"]), statistics.median(prefill["int8"])
    print(f"prefill (4 x 128 tokens, one forward): fp32 {pf:.0f} tok/s, int8 {pq:.0f} tok/s "
          f"(int8 / fp32 = {pq / pf:.2f})")
    same = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    rel = ((a - b).pow(2).mean() / a.pow(2).mean()).sqrt().item()
    print(f"greedy tokens equal to fp32's (teacher-forced): {same:.1%}; logits relative RMS difference {rel:.3f}")


if __name__ == "__main__":
    main()
