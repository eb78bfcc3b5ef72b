"""Benchmark `gigafactory data prepare` (local engine): throughput and near-duplicate quality, in one run.

1. Throughput: MB/s per core of `prepare` against a plain single-process pass over the same files (read, parse
   JSON, tokenize with the same tokenizer, nothing else). Printed as a ratio measured in the same run.
2. Dedup quality on a synthetic corpus with planted near duplicates at known word-set Jaccard similarities
   (`gigafactory.data.synthetic`): recall per similarity bucket, exact-duplicate recall, share of distinct
   documents removed, precision of the duplicate removals.

Run: .venv/bin/python benchmarks/data_prepare.py [--docs 6000] [--workers 2] [--seed 123]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from gigafactory.data import synthetic
from gigafactory.data.executors import LocalEngine
from gigafactory.data.pipeline import PrepareConfig, prepare


def plain_pass(files: list[Path], tokenizer_json: Path) -> float:
    """Seconds for one process to read, parse and tokenize every document (the floor any pipeline pays)."""
    import gzip

    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    t0 = time.perf_counter()
    for f in files:
        raw = gzip.decompress(f.read_bytes()) if f.suffix == ".gz" else f.read_bytes()
        texts = [json.loads(line)["text"] for line in raw.splitlines() if line.strip()]
        tok.encode_batch(texts)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--docs", type=int, default=6000, help="distinct documents (copies are planted on top)")
    p.add_argument("--workers", type=int, default=2, help="local worker processes for prepare")
    p.add_argument("--seed", type=int, default=123)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        corp = synthetic.make_corpus(seed=a.seed, n_distinct=a.docs, near_fraction=0.3, exact_fraction=0.05,
                                     jaccard_range=(0.5, 0.98))
        files = synthetic.write_jsonl(corp, root / "in", files=8)
        mb = sum(len(d["text"].encode()) for d in corp.docs) / 1e6
        cfg = PrepareConfig(vocab_size=4096, shard_tokens=1 << 20, part_bytes=1 << 20)
        res = prepare([root / "in"], root / "ds", cfg, LocalEngine(a.workers), quiet=True)
        t_plain = plain_pass(files, root / "ds" / "tokenizer.json")
        dropped = [json.loads(x) for x in (root / "ds" / "dropped.jsonl").read_text().splitlines()]

    per_core = mb / res.seconds / a.workers
    plain = mb / t_plain
    print(f"corpus: {len(corp.docs):,} documents, {mb:.1f} MB of text in {len(files)} JSONL files (one gzip)")
    print(f"prepare, local engine, {a.workers} workers: {res.seconds:.1f} s = {mb / res.seconds:.2f} MB/s "
          f"= {per_core:.2f} MB/s per core")
    print(f"plain single-process pass (read + JSON + tokenize): {t_plain:.1f} s = {plain:.2f} MB/s")
    print(f"ratio prepare per core / plain pass: {per_core / plain:.2f}")
    s = synthetic.score(corp, dropped)
    dup = {d["id"] for d in dropped if d["reason"] in ("near_duplicate", "exact_duplicate")}
    print(f"near duplicates with Jaccard >= 0.8: recall {s['near_recall']:.1%} of {s['near_planted']}")
    edges = [0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 1.0]
    js = np.array(list(corp.jaccard_of.values()))
    hit = np.array([c in dup for c in corp.jaccard_of])
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        sel = (js >= lo) & (js < hi)
        if sel.any():
            print(f"  Jaccard [{lo:.2f}, {hi:.2f}): removed {hit[sel].mean():6.1%} of {sel.sum()}")
    print(f"exact duplicates removed: {s['exact_recall']:.1%}")
    print(f"distinct documents removed: {s['distinct_removed']:.2%}")
    print(f"precision of duplicate removals (planted copies / all removals): {s['precision']:.2%}")


if __name__ == "__main__":
    main()
