"""The corpus, tokenized once into memory-mapped arrays, and a deterministic, resumable batch sampler.

The sampler holds no hidden state: batch `i` is a pure function of (seed, i), so a checkpoint only needs
the number of batches drawn so far to continue exactly, under any number of data-parallel ranks."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from gigafactory import tokenizer as toklib
from gigafactory.errors import UserError
from gigafactory.personas import save_personas
from gigafactory.util import atomic_write_bytes, atomic_write_text

VAL_FRACTION = 0.1


def builtin_corpus() -> Path:
    return Path(str(resources.files("gigafactory") / "data" / "tinyshakespeare.txt"))


def read_corpus(path: Path | None) -> tuple[list[str], str]:
    """The documents of a UTF-8 file or of every file in a folder (sorted), and a content hash."""
    path = builtin_corpus() if path is None else Path(path)
    if not path.exists():
        raise UserError(f"data path {path} does not exist; pass a UTF-8 text file or a folder of them")
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    docs, digest = [], hashlib.sha256()
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UserError(f"{f} is not UTF-8 text; convert it or leave it out of --data") from None
        if text.strip():
            docs.append(text)
            digest.update(f.name.encode() + b"\0" + text.encode())
    if not docs:
        raise UserError(f"the corpus at {path} is empty; give text files with content")
    if sum(len(d) for d in docs) < 1000:
        raise UserError(f"the corpus at {path} has under 1,000 characters; give more text to train on")
    return docs, digest.hexdigest()


@dataclass
class TokenData:
    train: np.ndarray
    val: np.ndarray
    token_bytes: torch.Tensor  # UTF-8 bytes per token id, for bits per byte


def prepare(run_dir: Path, data: Path | None, vocab_size: int, tokenizer: str = "bpe") -> TokenData:
    """Train the tokenizer (or install the Grok-1 one) and tokenize the corpus once; later runs in the same
    directory reuse both."""
    run_dir = Path(run_dir)
    docs, digest = read_corpus(data)
    meta_path = run_dir / "data" / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if (meta["corpus_sha256"], meta["vocab_size"], meta.get("tokenizer", "bpe")) != (digest, vocab_size, tokenizer):
            raise UserError(
                f"{run_dir} was prepared from another corpus, tokenizer or vocabulary; use a new --run-dir for it"
            )
        tok = toklib.load_tokenizer(run_dir)
    else:
        # Train / validation split by characters at the end of each document, before tokenizing.
        train_docs = [d[: int(len(d) * (1 - VAL_FRACTION))] for d in docs]
        val_docs = [d[int(len(d) * (1 - VAL_FRACTION)) :] for d in docs]
        if tokenizer == toklib.GROK1:
            tok = toklib.install_grok1(run_dir)
        else:
            tok = toklib.train_tokenizer(train_docs, vocab_size)
        dtype = np.uint16 if tok.get_vocab_size() < 2**16 else np.uint32
        eos = toklib.eos_id(tok)
        (run_dir / "data").mkdir(parents=True, exist_ok=True)
        for split, parts in (("train", train_docs), ("val", val_docs)):
            ids: list[int] = []
            for enc in tok.encode_batch(parts):
                ids.extend(enc.ids)
                ids.append(eos)
            atomic_write_bytes(run_dir / "data" / f"{split}.bin", np.asarray(ids, dtype=dtype).tobytes())
        if tokenizer != toklib.GROK1:
            atomic_write_text(run_dir / toklib.FILENAME, tok.to_str())
        save_personas(run_dir, docs)
        meta = {"corpus_sha256": digest, "vocab_size": vocab_size, "dtype": np.dtype(dtype).name}
        meta["tokenizer"] = tokenizer
        atomic_write_text(meta_path, json.dumps(meta))
    dtype = np.dtype(meta["dtype"])
    train = np.memmap(run_dir / "data" / "train.bin", dtype=dtype, mode="r")
    val = np.memmap(run_dir / "data" / "val.bin", dtype=dtype, mode="r")
    return TokenData(train, val, torch.tensor(toklib.token_byte_lengths(tok), dtype=torch.float64))


class BatchSampler:
    """Random windows of `seq_len + 1` tokens; batch i depends only on (seed, i)."""

    def __init__(self, tokens: np.ndarray, batch: int, seq_len: int, seed: int) -> None:
        if len(tokens) <= seq_len + 1:
            raise UserError(
                f"the corpus has {len(tokens)} tokens, too few for sequences of {seq_len}; add text or lower seq_len"
            )
        self.tokens, self.batch, self.seq_len, self.seed = tokens, batch, seq_len, seed
        self.position = 0  # batches drawn so far: all the state a checkpoint needs

    def batch_at(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        starts = torch.randint(0, len(self.tokens) - self.seq_len - 1, (self.batch,), generator=gen).tolist()
        window = np.stack([self.tokens[s : s + self.seq_len + 1] for s in starts]).astype(np.int64)
        t = torch.from_numpy(window)
        return t[:, :-1], t[:, 1:]

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.batch_at(self.position)
        self.position += 1
        return out


def eval_windows(tokens: np.ndarray, seq_len: int, max_windows: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed, evenly spaced validation windows, identical at every evaluation."""
    n = max(1, min(max_windows, (len(tokens) - 1) // seq_len))
    starts = np.linspace(0, len(tokens) - seq_len - 1, n).astype(np.int64)
    out = []
    for s in starts:
        w = torch.from_numpy(np.asarray(tokens[s : s + seq_len + 1], dtype=np.int64))
        out.append((w[:-1], w[1:]))
    return out


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
