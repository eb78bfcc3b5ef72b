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
from typing import Any

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
    train: Any  # np.ndarray of the in-memory corpus, or a ShardStream / MixStream of prepared datasets
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


# ---- prepared datasets (`gigafactory data prepare`): streaming shards, mixtures ---------------------------------
DATASET_MANIFEST = "dataset.json"
MIX_BLOCK = 1000  # a mixture allocates samples to datasets in blocks of this many (weights exact to 1/1000)


def is_dataset(path: Path | None) -> bool:
    return path is not None and (Path(path) / DATASET_MANIFEST).is_file()


def read_manifest(root: Path) -> dict[str, Any]:
    path = Path(root) / DATASET_MANIFEST
    try:
        m = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{root} is not a prepared dataset (no {DATASET_MANIFEST}); make one with "
                        "`gigafactory data prepare`") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is damaged ({err.msg}); prepare the dataset again") from None
    if not isinstance(m, dict) or m.get("format") != "gigafactory-dataset/1":
        raise UserError(f"{path} is not a gigafactory-dataset/1 manifest; prepare the dataset again")
    return m


class ShardStream:
    """The samples (windows of `seq_len + 1` tokens, not overlapping) of one split of a dataset, in a seeded order
    that is a pure function of the sample index: epoch e visits the shards in a permuted order and the windows
    of each shard in a permuted order, every window once. Shards are memory-mapped when first touched, so only
    the windows read are loaded."""

    def __init__(self, root: Path, manifest: dict[str, Any], split: str, seq_len: int, seed: int) -> None:
        self.root, self.window, self.seed = Path(root), seq_len + 1, seed
        self.dtype = np.dtype(manifest["dtype"])
        self.files = [s["file"] for s in manifest["splits"][split]["shards"]]
        self.counts = np.array([s["tokens"] // self.window for s in manifest["splits"][split]["shards"]], np.int64)
        self.total = int(self.counts.sum())
        if self.total == 0:
            raise UserError(f"the {split} split of {root} has no window of {self.window} tokens; prepare more data "
                            "or lower seq_len")
        self._maps: dict[int, np.ndarray] = {}
        self._epoch: tuple[int, np.ndarray, np.ndarray] | None = None
        self._windows: dict[tuple[int, int], np.ndarray] = {}

    def _shard(self, i: int) -> np.ndarray:
        if i not in self._maps:
            self._maps[i] = np.memmap(self.root / self.files[i], dtype=self.dtype, mode="r")
        return self._maps[i]

    def locate(self, k: int) -> tuple[int, int]:
        """(shard, first token) of sample k."""
        epoch, j = divmod(k, self.total)
        if self._epoch is None or self._epoch[0] != epoch:
            order = np.random.Generator(np.random.PCG64([self.seed, epoch])).permutation(len(self.counts))
            self._epoch = (epoch, order, np.cumsum(self.counts[order]))
        _, order, ends = self._epoch
        pos = int(np.searchsorted(ends, j, side="right"))
        shard = int(order[pos])
        within = j - (int(ends[pos - 1]) if pos else 0)
        key = (epoch, shard)
        if key not in self._windows:
            if len(self._windows) > 8:
                self._windows.clear()
            rng = np.random.Generator(np.random.PCG64([self.seed, epoch, shard + 1]))
            self._windows[key] = rng.permutation(int(self.counts[shard]))
        return shard, int(self._windows[key][within]) * self.window

    def sample(self, k: int) -> np.ndarray:
        shard, start = self.locate(k)
        return np.asarray(self._shard(shard)[start : start + self.window], dtype=np.int64)


class MixStream:
    """Several streams weighted: in each block of MIX_BLOCK samples, stream d gets round(w_d · MIX_BLOCK) of them
    (largest remainders) at seeded positions, and its own samples in order, so sample k is a pure function of k
    and no stream repeats a sample before it finishes an epoch."""

    def __init__(self, streams: list[ShardStream], weights: list[float], seed: int) -> None:
        self.streams, self.seed = streams, seed
        w = np.asarray(weights, dtype=np.float64) / sum(weights)
        quota = np.floor(w * MIX_BLOCK).astype(np.int64)
        for d in np.argsort(-(w * MIX_BLOCK - quota), kind="stable")[: MIX_BLOCK - int(quota.sum())]:
            quota[d] += 1
        self.quota = quota
        self._block: tuple[int, np.ndarray, np.ndarray] | None = None

    def locate(self, k: int) -> tuple[int, int]:
        """(stream, index within that stream) of sample k."""
        block, p = divmod(k, MIX_BLOCK)
        if self._block is None or self._block[0] != block:
            owner = np.repeat(np.arange(len(self.quota)), self.quota)
            np.random.Generator(np.random.PCG64([self.seed, block, 7])).shuffle(owner)
            rank = np.zeros(MIX_BLOCK, dtype=np.int64)
            for d in range(len(self.quota)):
                rank[owner == d] = np.arange(self.quota[d])
            self._block = (block, owner, rank)
        _, owner, rank = self._block
        d = int(owner[p])
        return d, block * int(self.quota[d]) + int(rank[p])

    def sample(self, k: int) -> np.ndarray:
        d, i = self.locate(k)
        return self.streams[d].sample(i)


class ShardSampler:
    """The `BatchSampler` of prepared datasets: micro-batch i holds samples [i·batch, (i+1)·batch) of the stream.

    Its position counts global micro-batches, so it does not depend on the number of ranks: a run checkpointed on
    2 ranks resumes on 4 at the same sample, and every sample of an epoch is used once (the ranks split each
    global micro-batch)."""

    def __init__(self, stream: ShardStream | MixStream, batch: int, seq_len: int, seed: int) -> None:
        self.stream, self.batch, self.seq_len, self.seed = stream, batch, seq_len, seed
        self.position = 0

    def batch_at(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.stream.sample(index * self.batch + r) for r in range(self.batch)]
        t = torch.from_numpy(np.stack(rows))
        return t[:, :-1], t[:, 1:]

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.batch_at(self.position)
        self.position += 1
        return out


def make_sampler(train: np.ndarray | ShardStream | MixStream, batch: int, seq_len: int,
                 seed: int) -> BatchSampler | ShardSampler:
    if isinstance(train, ShardStream | MixStream):
        return ShardSampler(train, batch, seq_len, seed)
    return BatchSampler(train, batch, seq_len, seed)


def parse_mix(data: Path | None, mix: str | None) -> list[tuple[Path, float]]:
    """`--data DATASET` (weight 1) or `--data-mix a=0.7,b=0.3` (dataset folders with positive weights)."""
    if mix is None:
        return [(Path(data), 1.0)] if data is not None else []
    if data is not None:
        raise UserError("give --data or --data-mix, not both")
    out = []
    for item in mix.split(","):
        name, sep, weight = item.strip().rpartition("=")
        try:
            w = float(weight)
        except ValueError:
            w = -1.0
        if not sep or not name or not w > 0:
            raise UserError(f"--data-mix item {item!r}: write DATASET=WEIGHT with a positive weight, e.g. a=0.7,b=0.3")
        out.append((Path(name), w))
    return out


def prepare_datasets(run_dir: Path, mix: list[tuple[Path, float]], vocab_size: int, seq_len: int,
                     seed: int) -> TokenData:
    """Training on prepared datasets: the tokenizer comes with them (copied into the run), nothing is tokenized
    here, the training split streams from the shards and validation is the held-out split of the manifests."""
    run_dir = Path(run_dir)
    manifests = [read_manifest(root) for root, _ in mix]
    tok_shas = {m["tokenizer_sha256"] for m in manifests}
    if len(tok_shas) > 1:
        raise UserError("the datasets of --data-mix use different tokenizers; prepare them with the same "
                        "--tokenizer (a tokenizer.json or .model file)")
    m0, root0 = manifests[0], mix[0][0]
    if m0["vocab_size"] > vocab_size:
        raise UserError(f"{root0} has a tokenizer of {m0['vocab_size']:,} ids but the model's vocabulary is "
                        f"{vocab_size:,}; prepare it with --vocab-size {vocab_size} or pick a larger model")
    meta_path = run_dir / "data" / "meta.json"
    meta = {"datasets": [[str(Path(r).resolve()), w] for r, w in mix], "tokenizer_sha256": m0["tokenizer_sha256"]}
    if meta_path.is_file() and json.loads(meta_path.read_text()) != meta:
        raise UserError(f"{run_dir} was trained on other data; use a new --run-dir for this --data / --data-mix")
    atomic_write_bytes(run_dir / m0["tokenizer"], (Path(root0) / m0["tokenizer"]).read_bytes())
    tok = toklib.load_tokenizer(run_dir)
    save_personas(run_dir, [])
    atomic_write_text(meta_path, json.dumps(meta))
    streams = [ShardStream(root, m, "train", seq_len, seed) for (root, _), m in zip(mix, manifests, strict=True)]
    train: ShardStream | MixStream = streams[0] if len(streams) == 1 else MixStream(
        streams, [w for _, w in mix], seed)
    val_parts = [np.fromfile(Path(root) / s["file"], dtype=np.dtype(m["dtype"]))
                 for (root, _), m in zip(mix, manifests, strict=True) for s in m["splits"]["val"]["shards"]]
    val = np.concatenate(val_parts) if val_parts else np.zeros(0, dtype=np.int64)
    if len(val) <= seq_len + 1:
        raise UserError(f"{root0} has no validation split of more than {seq_len + 1} tokens; prepare it with a "
                        "larger --val-fraction")
    return TokenData(train, val, torch.tensor(toklib.token_byte_lengths(tok), dtype=torch.float64))
