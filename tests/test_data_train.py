"""Training on prepared shards: the streaming sampler, mixtures, and exact resume from 2 ranks to 4."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gigafactory.data import synthetic
from gigafactory.data.executors import LocalEngine
from gigafactory.data.pipeline import PrepareConfig, prepare
from gigafactory.errors import UserError
from gigafactory.train import data as datalib

SEQ = 32


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    out = {}
    for name, seed, tok in (("a", 1, "bpe"), ("b", 2, None)):
        corp = synthetic.make_corpus(seed=seed, n_distinct=150, near_fraction=0.1, exact_fraction=0.05)
        synthetic.write_jsonl(corp, root / f"in_{name}", files=2)
        # b reuses a's tokenizer, so the two can be mixed
        cfg = PrepareConfig(vocab_size=300, shard_tokens=3000, val_fraction=0.1,
                            tokenizer=tok or str(out["a"] / "tokenizer.json"))
        prepare([root / f"in_{name}"], root / name, cfg, LocalEngine(1), quiet=True)
        out[name] = root / name
    return out


def test_stream_visits_every_window_once_per_epoch(datasets):
    m = datalib.read_manifest(datasets["a"])
    stream = datalib.ShardStream(datasets["a"], m, "train", SEQ, seed=3)
    assert len(m["splits"]["train"]["shards"]) >= 4
    for epoch in (0, 1):
        seen = [stream.locate(k) for k in range(epoch * stream.total, (epoch + 1) * stream.total)]
        assert len(set(seen)) == stream.total  # each window exactly once
        assert all(start % (SEQ + 1) == 0 for _, start in seen)
    assert [stream.locate(k) for k in range(50)] != [stream.locate(k) for k in range(stream.total, stream.total + 50)]
    # Position is counted in global micro-batches: whatever the split over ranks, micro-batch i is the same rows.
    sampler = datalib.ShardSampler(stream, batch=8, seq_len=SEQ, seed=3)
    x, y = sampler.batch_at(5)
    rows = [datalib.ShardStream(datasets["a"], m, "train", SEQ, 3).sample(k) for k in range(40, 48)]
    assert np.array_equal(x.numpy(), np.stack(rows)[:, :-1]) and np.array_equal(y.numpy(), np.stack(rows)[:, 1:])


def test_mixture_weights_are_exact_and_no_sample_repeats(datasets):
    streams = [datalib.ShardStream(datasets[n], datalib.read_manifest(datasets[n]), "train", SEQ, 0) for n in "ab"]
    mix = datalib.MixStream(streams, [0.7, 0.3], seed=0)
    picks = [mix.locate(k) for k in range(3000)]
    for d, share in ((0, 0.7), (1, 0.3)):
        idx = [i for dd, i in picks if dd == d]
        assert len(idx) == round(3000 * share)
        assert idx == list(range(len(idx)))  # each dataset's stream in order, none skipped or repeated
    assert [d for d, _ in picks[:1000]] != [d for d, _ in picks[1000:2000]]  # positions shuffled per block
    assert datalib.parse_mix(None, f"{datasets['a']}=0.7,{datasets['b']}=0.3")[1][1] == 0.3
    for bad in ("a=0", "a", "a=x,b=1"):
        with pytest.raises(UserError, match="DATASET=WEIGHT"):
            datalib.parse_mix(None, bad)


def _train(run_dir: Path, nproc: int, *extra: str, cli_here=None) -> None:  # noqa: ANN001
    """`gigafactory train` on `nproc` ranks under torchrun; one process runs in this one (`cli_here`)."""
    args = ["train", "--model", "tiny", "--run-dir", str(run_dir), "--steps", "6", "--batch-size", "8",
            "--grad-accum", "2", "--seq-len", str(SEQ), "--lr", "3e-3", "--warmup-steps", "1", "--eval-every", "3",
            "--checkpoint-every", "3", "--dtype", "fp32", "--sync-checkpoint", *extra]
    if nproc == 1:
        code, _, err = cli_here(*args)
        assert code == 0, err[-4000:]
        return
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m",
           "gigafactory", *args, "--layout", f"dp_shard={nproc}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr[-4000:]


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_train_on_shards_resumes_exactly_from_2_to_4_ranks(datasets, tmp_path, cli_here):
    """One process for 6 steps is the reference; 2 ranks stop at step 3; 4 ranks resume to step 6. The global
    micro-batches are the same samples (the position is rank-independent), so every step's loss matches."""
    mix = ["--data-mix", f"{datasets['a']}=0.6,{datasets['b']}=0.4"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    _train(ref, 1, *mix, cli_here=cli_here)
    _train(run, 2, *mix, "--stop-after", "3")
    manifest = json.loads(next((run / "ckpt").glob("step_000003/manifest.json")).read_text())
    assert manifest["data_position"] == 3 * 2  # global micro-batches: 3 steps x 2
    _train(run, 4, *mix, "--resume")
    a, b = _metrics(ref), _metrics(run)
    assert [r["step"] for r in b] == list(range(1, 7))
    np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in a], rtol=1e-4)
    np.testing.assert_allclose(b[-1]["val_bits_per_byte"], a[-1]["val_bits_per_byte"], rtol=1e-4)
    assert (run / "tokenizer.json").read_bytes() == (datasets["a"] / "tokenizer.json").read_bytes()
