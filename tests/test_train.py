import json

import numpy as np
import pytest
import torch

from gigafactory import checkpoint as ckpt
from gigafactory.errors import UserError
from gigafactory.tokenizer import token_byte_lengths, train_tokenizer
from gigafactory.train.config import make_config
from gigafactory.train.data import BatchSampler, read_corpus
from gigafactory.train.loop import Trainer, lr_at

FAST = dict(model="tiny", batch_size=4, seq_len=64, eval_every=4, eval_windows=4, warmup_steps=2, dtype="fp32")


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_resume_gives_the_same_losses_as_one_run(tmp_path, tiny_run):
    one, two = tiny_run(tmp_path / "one"), tiny_run(tmp_path / "two")
    Trainer(make_config(run_dir=one, steps=8, checkpoint_every=4, **FAST), quiet=True).fit()
    Trainer(make_config(run_dir=two, steps=8, checkpoint_every=4, stop_after=4, **FAST), quiet=True).fit()
    assert [r["step"] for r in read_metrics(two)] == [1, 2, 3, 4]
    resumed = Trainer(make_config(run_dir=two, steps=8, checkpoint_every=4, resume=True, **FAST), quiet=True)
    assert resumed.step == 4 and resumed.sampler.position == 4
    resumed.fit()
    a, b = read_metrics(one), read_metrics(two)
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert a[-1]["val_bits_per_byte"] == b[-1]["val_bits_per_byte"]
    for record in a:
        assert {"step", "loss", "tokens_per_s", "mfu"} <= record.keys()
    assert [r["step"] for r in a if "val_bits_per_byte" in r] == [4, 8]
    assert a[-1]["loss"] < a[0]["loss"]


def test_corrupt_or_partial_newest_checkpoint_falls_back(tmp_path, cli, tiny_run):
    run = tiny_run(tmp_path / "run")
    Trainer(make_config(run_dir=run, steps=6, checkpoint_every=2, **FAST), quiet=True).fit()
    names = [p.name for p in ckpt.list_checkpoints(run)]
    assert names == ["step_000006", "step_000004", "step_000002"]
    shard = next((run / "ckpt" / "step_000006").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    shard4 = next((run / "ckpt" / "step_000004").glob("*.distcp"))
    shard4.write_bytes(shard4.read_bytes()[:100])  # truncated too: fall back two steps
    proc = cli("train", "--model", "tiny", "--steps", "7", "--run-dir", str(run), "--resume", "--batch-size", "4",
               "--seq-len", "64", "--dtype", "fp32", "--warmup-steps", "2", "--eval-every", "4", check=True)
    assert "step_000006 is unusable: checksum mismatch" in proc.stderr
    assert "step_000004 is unusable" in proc.stderr
    assert "resumed from step_000002" in proc.stderr
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 8))


def test_save_never_leaves_a_partial_checkpoint_visible(tmp_path, tiny_run):
    run = tiny_run(tmp_path / "run")
    Trainer(make_config(run_dir=run, steps=2, checkpoint_every=2, **FAST), quiet=True).fit()

    def failing_writer(state, path):
        (path / "half.distcp").write_bytes(b"x" * 10)
        raise OSError("disk full")

    with pytest.raises(OSError):
        ckpt.save(run, 4, {"model": {"w": torch.zeros(2)}}, {"data_position": 4, "rng": {}}, writer=failing_writer)
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_000002"]
    ckpt.verify(run / "ckpt" / "step_000002")


def test_bits_per_byte_counts_every_utf8_byte_once():
    text = "ROMEO:\nBut soft, what light through yonder window breaks?\n\nJULIET:\nAy me! — ’tis naïve.\n" * 20
    tok = train_tokenizer([text], 300)
    lengths = token_byte_lengths(tok)
    ids = tok.encode(text).ids
    assert sum(lengths[i] for i in ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text


def test_sampler_is_a_pure_function_of_seed_and_index():
    tokens = np.arange(10_000, dtype=np.uint16)
    a, b = BatchSampler(tokens, 4, 32, seed=1), BatchSampler(tokens, 4, 32, seed=1)
    for _ in range(3):
        a.next()
    b.position = 3
    xa, ya = a.next()
    xb, yb = b.next()
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert torch.equal(xa[:, 1:], ya[:, :-1])
    assert not torch.equal(BatchSampler(tokens, 4, 32, seed=2).batch_at(3)[0], xa)


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = make_config(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.55)
    assert lr_at(100, cfg) == pytest.approx(0.1)


def test_data_folder_and_bad_data(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("HAMLET:\nTo be or not to be.\n\n" * 40)
    (folder / "b.txt").write_text("OPHELIA:\nGood my lord.\n\n" * 40)
    docs, _ = read_corpus(folder)
    assert len(docs) == 2
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(UserError, match="empty"):
        read_corpus(tmp_path / "empty.txt")
    with pytest.raises(UserError, match="does not exist"):
        read_corpus(tmp_path / "missing.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00" * 500)
    with pytest.raises(UserError, match="not UTF-8"):
        read_corpus(tmp_path / "bin.txt")


def test_cli_train_then_chat_and_user_errors(tmp_path, cli, cli_here, tiny_run):
    run = tiny_run(tmp_path / "run")
    proc = cli("train", "--model", "tiny", "--steps", "3", "--run-dir", str(run), "--batch-size", "4", "--seq-len",
               "64", "--dtype", "fp32", check=True)
    assert len(read_metrics(run)) == 3
    # Not a terminal: progress still reaches the log as plain lines with a rate and an ETA, first and last step.
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("train ") and "steps/s" in ln and "ETA" in ln]
    assert lines and lines[0].startswith("train 1/3") and lines[-1].startswith("train 3/3"), proc.stderr
    out = cli("chat", str(run), "--persona", "romeo", "--prompt", "Good morrow", "--seed", "1", "--max-tokens", "8",
              check=True)
    assert out.stdout.startswith("ROMEO:")
    bad = [  # the first two in a fresh process each (as a user sees them), the others in this one
        ("chat", str(run), "--persona", "nobody", "--prompt", "hi"),
        ("train", "--model", "grok-9", "--steps", "2", "--run-dir", str(tmp_path / "y")),
        ("train", "--model", "tiny", "--steps", "2", "--run-dir", str(tmp_path / "x"), "--data", str(tmp_path / "no")),
        ("chat", str(tmp_path / "not-a-run"), "--prompt", "hi"),
        ("train", "--model", "tiny", "--steps", "2", "--run-dir", str(tmp_path / "z"), "--resume"),
    ]
    for i, args in enumerate(bad):
        if i < 2:
            proc = cli(*args)
            code, err = proc.returncode, proc.stderr
        else:
            code, _, err = cli_here(*args)
        assert code != 0, args
        assert "Traceback" not in err, args
        assert err.strip().startswith("error:") and err.strip().count("\n") == 0, err


def test_every_checkpoint_corrupt_is_a_user_error(tmp_path, tiny_run):
    run = tiny_run(tmp_path / "run")
    Trainer(make_config(run_dir=run, steps=2, checkpoint_every=2, **FAST), quiet=True).fit()
    (run / "ckpt" / "step_000002" / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="no usable checkpoint"):
        Trainer(make_config(run_dir=run, steps=4, resume=True, **FAST), quiet=True)


def test_resume_past_a_corrupt_checkpoint_replaces_that_history(tmp_path, tiny_run):
    run = tiny_run(tmp_path / "run")
    Trainer(make_config(run_dir=run, steps=6, checkpoint_every=2, **FAST), quiet=True).fit()
    shard = next((run / "ckpt" / "step_000006").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-10])
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')  # a line cut short by a crash must not break the resume
    with pytest.raises(UserError, match="already has checkpoints"):
        Trainer(make_config(run_dir=run, steps=8, **FAST), quiet=True)
    tr = Trainer(make_config(run_dir=run, steps=8, checkpoint_every=2, resume=True, **FAST), quiet=True)
    assert tr.step == 4
    tr.fit()
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_000008", "step_000006", "step_000004"]
    for p in ckpt.list_checkpoints(run):
        ckpt.verify(p)  # the corrupt step 6 was replaced by this history's own
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 9))
