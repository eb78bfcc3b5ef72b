"""`gigafactory data prepare`: raw documents to deduplicated, tokenized, fixed-size token shards.

Stages (each resumable; finished work is found on disk and not redone):

1. **scan** (parallel, one task per input part): read, normalise, quality rules, PII scrub, exact hash, MinHash
   signature. Writes `work/scan/part-NNNNN.{jsonl,npz,json}`; the `.json` is written last and marks the part done.
2. **dedup** (once, in the driver): exact duplicates by hash, near duplicates by LSH banding over every part's
   signatures, the train/validation split by document hash. Writes `work/keep/part-NNNNN.npy` and `dropped.jsonl`.
3. **tokenizer** (driver): BPE trained on the first `tokenizer_sample_bytes` of kept training text (canonical
   order), or a given tokenizer.json. Writes `tokenizer.json`.
4. **tokenize** (parallel, one task per part): kept documents to token ids, EOS after each.
   Writes `work/tok/part-NNNNN.{train,val}.npy` and a `.json` marker.
5. **pack** (driver): the token stream of each split cut into shards of exactly `shard_tokens` tokens (the
   last may be shorter); each shard is written atomically and recorded with its SHA-256 in `work/shards.jsonl`,
   so a resumed run skips it. Then `dataset.json` (the manifest, written last) and `report.html`.

Every stage is a deterministic function of the parts, so the local and the Ray engines give identical bytes."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from gigafactory.data import clean, sources
from gigafactory.data import dedup as dd
from gigafactory.data.executors import Engine
from gigafactory.errors import UserError
from gigafactory.util import atomic_write_bytes, atomic_write_text, sha256_file

FORMAT = "gigafactory-dataset/1"
MANIFEST = "dataset.json"


class PrepareConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text_field: str = "text"
    id_field: str = "id"
    rules: clean.QualityRules = Field(default_factory=clean.QualityRules)
    scrub_pii: bool = True
    exact_dedup: bool = True
    near_dedup: bool = True
    dedup: dd.DedupConfig = Field(default_factory=dd.DedupConfig)
    tokenizer: str = Field("bpe", description="'bpe' (trained on a sample), 'grok-1', or a tokenizer.json/.model")
    vocab_size: int = Field(8192, ge=256)
    tokenizer_sample_bytes: int = Field(20_000_000, gt=0)
    shard_tokens: int = Field(1 << 24, gt=0, description="tokens per shard (the last one may be shorter)")
    val_fraction: float = Field(0.01, ge=0, lt=1, description="documents held out for validation, by hash")
    part_bytes: int = Field(32 << 20, gt=0, description="input bytes per parallel task (uncompressed JSONL)")


@dataclass
class Paths:
    out: Path

    @property
    def work(self) -> Path:
        return self.out / "work"

    def scan(self, i: int, ext: str) -> Path:
        return self.work / "scan" / f"part-{i:05d}.{ext}"

    def keep(self, i: int) -> Path:
        return self.work / "keep" / f"part-{i:05d}.npy"

    def tok(self, i: int, ext: str) -> Path:
        return self.work / "tok" / f"part-{i:05d}.{ext}"

    def shard(self, split: str, j: int) -> Path:
        return self.out / split / f"shard-{j:05d}.bin"


# ---- stage 1: scan ---------------------------------------------------------------------------------------------
def scan_part(task: dict[str, Any]) -> dict[str, Any]:
    """Read, clean, filter and sign one part. Returns a small summary; skips a part already done."""
    part = sources.Part(**task["part"])
    cfg = PrepareConfig.model_validate(task["cfg"])
    paths = Paths(Path(task["out"]))
    marker = paths.scan(part.index, "json")
    if marker.is_file():
        return {"part": part.index, "skipped": True, **_summary(json.loads(marker.read_text()))}
    hasher = dd.MinHasher(cfg.dedup)
    ids, texts, sigs, hashes, chars = [], [], [], [], []
    dropped: list[dict[str, Any]] = []
    pii: Counter[str] = Counter()
    n_read = n_malformed = 0
    for item in sources.read_part(part, cfg.text_field, cfg.id_field):
        n_read += 1
        if isinstance(item, sources.Malformed):
            n_malformed += 1
            dropped.append({"id": item.id, "reason": "malformed", "detail": item.reason, "chars": 0})
            continue
        text = clean.normalise(item.text)
        reason = clean.quality_failure(text, cfg.rules)
        if reason is None and cfg.scrub_pii:
            text, counts = clean.scrub_pii(text)
            pii.update(counts)
        if reason is not None:
            dropped.append({"id": item.id, "reason": reason, "chars": len(text)})
            continue
        ids.append(item.id)
        texts.append(text)
        chars.append(len(text))
        hashes.append(dd.exact_hash(text))
        sigs.append(hasher.signature(text))
    _write_jsonl(paths.scan(part.index, "jsonl"), ({"id": i, "text": t} for i, t in zip(ids, texts, strict=True)))
    sig = np.stack(sigs) if sigs else np.zeros((0, cfg.dedup.num_perm), dtype=np.uint32)
    hsh = np.frombuffer(b"".join(hashes), dtype="S16") if hashes else np.zeros(0, dtype="S16")
    _save_npz(paths.scan(part.index, "npz"), sig=sig, hash=hsh, chars=np.asarray(chars, dtype=np.int64))
    input_bytes = sources.part_size(part)
    stats = {"part": part.index, "read": n_read, "malformed": n_malformed, "kept": len(ids), "ids": ids,
             "dropped": dropped, "pii": dict(pii), "input_bytes": input_bytes, "text_bytes": sum(chars)}
    atomic_write_text(marker, json.dumps(stats))
    _crash_point("scan", part.index)
    return {"part": part.index, "skipped": False, **_summary(stats)}


def _summary(stats: dict[str, Any]) -> dict[str, Any]:
    return {k: stats[k] for k in ("read", "kept", "input_bytes")}


def _write_jsonl(path: Path, rows: Any) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _crash_point(stage: str, index: int) -> None:
    """Testing hook: GIGAFACTORY_DATA_CRASH=stage:N ends the process (as a kill would) after unit N of a stage."""
    want = os.environ.get("GIGAFACTORY_DATA_CRASH")
    if want and want == f"{stage}:{index}":
        os._exit(17)


# ---- stage 2: dedup and split ----------------------------------------------------------------------------------
@dataclass
class DedupResult:
    exact: int = 0
    near: int = 0
    candidates: int = 0
    clusters: list[dict[str, Any]] = field(default_factory=list)


def dedup_and_split(paths: Paths, n_parts: int, cfg: PrepareConfig) -> dict[str, Any]:
    """Decide, for every document that passed the filters, drop / train / validation; write dropped.jsonl."""
    marker = paths.work / "keep" / "done.json"
    if marker.is_file():
        return json.loads(marker.read_text())
    stats = [json.loads(paths.scan(i, "json").read_text()) for i in range(n_parts)]
    arrays = [_load_npz(paths.scan(i, "npz")) for i in range(n_parts)]
    ids = [doc_id for s in stats for doc_id in s["ids"]]
    hashes = np.concatenate([a["hash"] for a in arrays]) if arrays else np.zeros(0, dtype="S16")
    sigs = np.concatenate([a["sig"] for a in arrays]) if arrays else np.zeros((0, cfg.dedup.num_perm), np.uint32)
    n = len(ids)
    keep_of = np.arange(n)  # the document each one is a duplicate of (itself when kept)
    reason = np.zeros(n, dtype=np.int8)  # 0 kept, 1 exact, 2 near
    if cfg.exact_dedup and n:
        first = dd.exact_duplicates(hashes)
        reason[first != keep_of] = 1
        keep_of = first
    candidates = 0
    if cfg.near_dedup and n:
        unique = np.flatnonzero(reason == 0)
        roots, candidates = dd.near_duplicates(sigs[unique], cfg.dedup)
        near = unique[roots] != unique
        reason[unique[near]] = 2
        keep_of[unique[near]] = unique[roots[near]]
    split = np.where(_val_draw(hashes) < cfg.val_fraction, 2, 1).astype(np.int8)
    code = np.where(reason == 0, split, 0).astype(np.int8)
    offsets = np.cumsum([0] + [s["kept"] for s in stats])
    for i in range(n_parts):
        atomic_write_bytes(paths.keep(i), _npy_bytes(code[offsets[i] : offsets[i + 1]]))
    dropped_rows = []
    for s in stats:
        dropped_rows.extend({k: v for k, v in d.items() if k != "chars"} for d in s["dropped"])
    names = {1: "exact_duplicate", 2: "near_duplicate"}
    for j in np.flatnonzero(reason):
        dropped_rows.append({"id": ids[j], "reason": names[int(reason[j])], "duplicate_of": ids[keep_of[j]]})
    _write_jsonl(paths.out / "dropped.jsonl", dropped_rows)
    summary = _dedup_summary(stats, arrays, ids, reason, keep_of, code, candidates)
    atomic_write_text(marker, json.dumps(summary))
    return summary


def _val_draw(hashes: np.ndarray) -> np.ndarray:
    """A uniform number in [0, 1) from each document's hash: the split depends on the text only."""
    if not len(hashes):
        return np.zeros(0)
    raw = np.frombuffer(hashes.tobytes(), dtype="<u8").reshape(-1, 2)[:, 0]
    return (raw >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _npy_bytes(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _dedup_summary(stats: list[dict[str, Any]], arrays: list[dict[str, np.ndarray]], ids: list[str],
                   reason: np.ndarray, keep_of: np.ndarray, code: np.ndarray, candidates: int) -> dict[str, Any]:
    rules: Counter[str] = Counter()
    pii: Counter[str] = Counter()
    dropped_chars: list[int] = []
    for s in stats:
        rules.update(d["reason"] for d in s["dropped"])
        pii.update(s["pii"])
        dropped_chars.extend(d["chars"] for d in s["dropped"] if d["reason"] != "malformed")
    chars = np.concatenate([a["chars"] for a in arrays]) if arrays else np.zeros(0, dtype=np.int64)
    rules["exact_duplicate"] = int((reason == 1).sum())
    rules["near_duplicate"] = int((reason == 2).sum())
    sizes = Counter(int(k) for k in keep_of[reason == 2])
    clusters = [{"kept": ids[k], "size": c + 1, "members": [ids[j] for j in np.flatnonzero(
        (keep_of == k) & (reason == 2))][:5]} for k, c in sizes.most_common(20)]
    return {
        "read": sum(s["read"] for s in stats),
        "malformed": sum(s["malformed"] for s in stats),
        "input_bytes": sum(s["input_bytes"] for s in stats),
        "dropped": dict(rules),
        "pii_replaced": dict(pii),
        "kept_train": int((code == 1).sum()),
        "kept_val": int((code == 2).sum()),
        "near_dup_candidates_checked": candidates,
        "near_dup_clusters": len(sizes),
        "largest_clusters": clusters,
        "kept_chars": chars[code > 0].tolist(),
        "dropped_chars": dropped_chars + chars[reason > 0].tolist(),
    }


# ---- stage 3: tokenizer ------------------------------------------------------------------------------------------
def tokenizer_file(out: Path) -> Path | None:
    """The dataset's tokenizer: tokenizer.json (BPE) or tokenizer.model (SentencePiece, e.g. Grok-1)."""
    from gigafactory import tokenizer as toklib

    found = [out / n for n in (toklib.FILENAME, toklib.SP_FILENAME) if (out / n).is_file()]
    return found[0] if found else None


def build_tokenizer(paths: Paths, n_parts: int, cfg: PrepareConfig) -> None:
    from gigafactory import tokenizer as toklib

    if tokenizer_file(paths.out) is not None:
        return
    if cfg.tokenizer == toklib.GROK1:
        toklib.install_grok1(paths.out)
        return
    if cfg.tokenizer != "bpe":
        src = Path(cfg.tokenizer)
        if src.suffix not in (".json", ".model") or not src.is_file():
            raise UserError(f"--tokenizer {src}: give 'bpe', 'grok-1', or an existing tokenizer.json / .model file")
        staging = paths.work / "tokenizer"
        staging.mkdir(parents=True, exist_ok=True)
        name = toklib.FILENAME if src.suffix == ".json" else toklib.SP_FILENAME
        atomic_write_bytes(staging / name, src.read_bytes())
        toklib.eos_id(toklib.load_tokenizer(staging))  # refuses a tokenizer without an end-of-document id
        atomic_write_bytes(paths.out / name, src.read_bytes())
        return
    sample: list[str] = []
    budget = cfg.tokenizer_sample_bytes
    for i in range(n_parts):
        code = np.load(paths.keep(i))
        for doc, c in zip(_read_jsonl(paths.scan(i, "jsonl")), code, strict=True):
            if c == 1 and budget > 0:
                sample.append(doc["text"])
                budget -= len(doc["text"])
        if budget <= 0:
            break
    if not sample:
        raise UserError("no document survived the filters; check --text-field and the quality rules")
    tok = toklib.train_tokenizer(sample, cfg.vocab_size)
    atomic_write_text(paths.out / toklib.FILENAME, tok.to_str())


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ---- stage 4: tokenize -----------------------------------------------------------------------------------------
def tokenize_part(task: dict[str, Any]) -> dict[str, Any]:
    from gigafactory import tokenizer as toklib

    paths = Paths(Path(task["out"]))
    i = task["part"]["index"]
    marker = paths.tok(i, "json")
    if marker.is_file():
        return {"part": i, "skipped": True, **json.loads(marker.read_text())}
    tok = toklib.load_tokenizer(paths.out)
    eos = toklib.eos_id(tok)
    dtype = token_dtype(tok.get_vocab_size())
    code = np.load(paths.keep(i))
    docs = _read_jsonl(paths.scan(i, "jsonl"))
    counts = {}
    for split, c in (("train", 1), ("val", 2)):
        texts = [d["text"] for d, k in zip(docs, code, strict=True) if k == c]
        ids: list[int] = []
        for enc in tok.encode_batch(texts):
            ids.extend(enc.ids)
            ids.append(eos)
        atomic_write_bytes(paths.tok(i, f"{split}.npy"), _npy_bytes(np.asarray(ids, dtype=dtype)))
        counts[split] = {"tokens": len(ids), "documents": len(texts)}
    atomic_write_text(marker, json.dumps(counts))
    _crash_point("tokenize", i)
    return {"part": i, "skipped": False, **counts}


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


# ---- stage 5: pack ------------------------------------------------------------------------------------------------
def pack_split(paths: Paths, split: str, n_parts: int, shard_tokens: int, eos: int,
               log: Any) -> tuple[list[dict[str, Any]], int]:
    """Cut one split's token stream into shards; skip shards a previous run finished (file and checksum match)."""
    journal = paths.work / "shards.jsonl"
    done = {}
    if journal.is_file():
        for line in journal.read_text().splitlines():
            try:
                rec = json.loads(line)
                done[(rec["split"], rec["index"])] = rec
            except (json.JSONDecodeError, KeyError):
                continue  # a line cut short by a crash: that shard is simply redone
    counts = [json.loads(paths.tok(i, "json").read_text())[split]["tokens"] for i in range(n_parts)]
    bounds = np.cumsum([0] + counts)
    total = int(bounds[-1])
    shards, skipped = [], 0
    for j in range(0, -(-total // shard_tokens)):
        lo, hi = j * shard_tokens, min((j + 1) * shard_tokens, total)
        target = paths.shard(split, j)
        rec = done.get((split, j))
        if rec and rec["tokens"] == hi - lo and target.is_file() and sha256_file(target) == rec["sha256"]:
            shards.append({k: rec[k] for k in ("file", "tokens", "documents", "sha256")})
            skipped += 1
            continue
        pieces = []
        for i in range(int(np.searchsorted(bounds, lo, side="right")) - 1, n_parts):
            if bounds[i] >= hi:
                break
            arr = np.load(paths.tok(i, f"{split}.npy"), mmap_mode="r")
            pieces.append(np.asarray(arr[max(lo - bounds[i], 0) : min(hi - bounds[i], counts[i])]))
        data = np.concatenate(pieces) if pieces else np.zeros(0)
        atomic_write_bytes(target, data.tobytes())
        rec = {"split": split, "index": j, "file": f"{split}/{target.name}", "tokens": int(len(data)),
               "documents": int((data == eos).sum()), "sha256": sha256_file(target)}
        with open(journal, "a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())
        shards.append({k: rec[k] for k in ("file", "tokens", "documents", "sha256")})
        log(f"pack {split}: shard {j} ({len(data):,} tokens)")
        _crash_point(f"pack-{split}", j)
    return shards, skipped


# ---- the whole run --------------------------------------------------------------------------------------------
@dataclass
class PrepareResult:
    out: Path
    manifest: dict[str, Any]
    skipped: dict[str, int]
    seconds: float


def prepare(inputs: list[Path], out: Path, cfg: PrepareConfig, engine: Engine, keep_work: bool = False,
            quiet: bool = False) -> PrepareResult:
    t0 = time.perf_counter()
    out = Path(out)
    paths = Paths(out)
    parts = sources.make_parts([Path(p) for p in inputs], cfg.part_bytes)
    fingerprint = {"config": cfg.model_dump(mode="json"), "parts": [p.to_dict() for p in parts],
                   "sizes": [Path(p.path).stat().st_size for p in parts]}
    _check_or_start(out, fingerprint)
    logger = _Log(out / "prepare.log", quiet)
    logger(f"{len(parts)} parts from {len(sources.list_files(inputs))} files; engine {engine.name}")
    skipped = {}
    base = {"out": str(out), "cfg": cfg.model_dump(mode="json")}
    tasks = [{**base, "part": p.to_dict()} for p in parts]
    sizes = [sources.part_size(p) for p in parts]
    results = engine.map(scan_part, tasks, "scan", logger, weights=sizes)
    skipped["scan"] = sum(r["skipped"] for r in results)
    summary = dedup_and_split(paths, len(parts), cfg)
    logger(f"dedup: {summary['dropped'].get('exact_duplicate', 0):,} exact and "
           f"{summary['dropped'].get('near_duplicate', 0):,} near duplicates of {summary['read']:,} documents")
    build_tokenizer(paths, len(parts), cfg)
    results = engine.map(tokenize_part, tasks, "tokenize", logger, weights=sizes)
    skipped["tokenize"] = sum(r["skipped"] for r in results)
    from gigafactory import tokenizer as toklib

    tok = toklib.load_tokenizer(out)
    eos = toklib.eos_id(tok)
    tok_path = tokenizer_file(out)
    assert tok_path is not None
    splits = {}
    skipped["shards"] = 0
    for split in ("train", "val"):
        shards, n_skip = pack_split(paths, split, len(parts), cfg.shard_tokens, eos, logger)
        skipped["shards"] += n_skip
        splits[split] = {"tokens": sum(s["tokens"] for s in shards),
                         "documents": sum(s["documents"] for s in shards), "shards": shards}
    manifest = {
        "format": FORMAT,
        "tokenizer": tok_path.name,
        "tokenizer_sha256": sha256_file(tok_path),
        "vocab_size": tok.get_vocab_size(),
        "eos_id": eos,
        "dtype": token_dtype(tok.get_vocab_size()).name,
        "shard_tokens": cfg.shard_tokens,
        "splits": splits,
        "stats": {k: v for k, v in summary.items() if not k.endswith("_chars")},
        "config": cfg.model_dump(mode="json"),
        "inputs": [str(p) for p in inputs],
    }
    from gigafactory.data.data_report import render_report

    atomic_write_text(out / "report.html", render_report(manifest, summary))
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1))
    if not keep_work:
        shutil.rmtree(paths.work, ignore_errors=True)
    seconds = time.perf_counter() - t0
    logger(f"done in {seconds:.1f} s: {splits['train']['tokens']:,} train and {splits['val']['tokens']:,} "
           f"validation tokens in {len(splits['train']['shards'])} + {len(splits['val']['shards'])} shards")
    return PrepareResult(out, manifest, skipped, seconds)


def _check_or_start(out: Path, fingerprint: dict[str, Any]) -> None:
    """A run resumes only with the same inputs and settings; a finished dataset is never overwritten."""
    if (out / MANIFEST).is_file():
        raise UserError(f"{out} already holds a prepared dataset; choose another --out or delete it")
    state = out / "work" / "run.json"
    if state.is_file():
        if json.loads(state.read_text()) != fingerprint:
            raise UserError(f"{out} holds an unfinished run with other inputs or settings; rerun it with the same "
                            "ones to resume, or delete the folder to start over")
        return
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not a dataset being prepared; choose an empty or new --out")
    atomic_write_text(state, json.dumps(fingerprint))


class _Log:
    """Progress lines to the terminal (stderr) and to prepare.log."""

    def __init__(self, path: Path, quiet: bool) -> None:
        self.path, self.quiet = path, quiet

    def __call__(self, line: str) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        with open(self.path, "a") as f:
            f.write(f"{stamp} {line}\n")
        if not self.quiet:
            import sys

            print(line, file=sys.stderr, flush=True)
