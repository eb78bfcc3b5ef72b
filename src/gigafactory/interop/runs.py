"""Imported weights become a run directory (spec, tokenizer, personas, a verified DCP checkpoint at step 0)
that `gigafactory chat` and `gigafactory serve` read like any trained run.

The Grok-1 import is resumable: each release tensor is first converted, one at a time, into a staged
safetensors file under ``RUN/.import/`` (written atomically, recorded with its source file's size and the
staged file's checksum); an interrupted import skips the tensors already staged. The model is then filled
from the staged files (memory-mapped, one at a time, so the process holds the model once) and saved as a
checkpoint committed by an atomic rename; only then is the staging folder removed.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

from gigafactory import checkpoint as ckpt
from gigafactory import tokenizer as toklib
from gigafactory.errors import UserError
from gigafactory.interop import grok1
from gigafactory.personas import FILENAME as PERSONAS_FILE
from gigafactory.specs.model_spec import ModelSpec
from gigafactory.util import atomic_write_text, sha256_file

STAGING = ".import"
DEFAULT_PERSONA = "Grok"


class Progress:
    """One line per second at most (and the last): done/total, rate and ETA, to stderr and an optional log."""

    def __init__(self, what: str, log: Path | None = None) -> None:
        self.what, self.log, self.start, self.shown = what, log, time.monotonic(), 0.0

    def __call__(self, done: int, total: int, name: str = "") -> None:
        now = time.monotonic()
        if now - self.shown < 1.0 and done < total:
            return
        self.shown = now
        elapsed = max(now - self.start, 1e-9)
        rate = done / elapsed
        eta = (total - done) / rate if rate > 0 else float("inf")
        line = f"{self.what}: {done}/{total} tensors, {rate:.1f}/s, ETA {eta:.0f} s  {name}"
        print(line, file=sys.stderr, flush=True)
        if self.log is not None:
            with open(self.log, "a") as f:
                f.write(line + "\n")


def refuse_existing(run_dir: Path) -> None:
    if ckpt.list_checkpoints(run_dir):
        raise UserError(f"{run_dir} already holds a checkpoint; import into a new --run-dir")


def write_run(run_dir: Path, model: Any, tokenizer: str | Path, meta: dict[str, Any]) -> Path:
    """Spec, tokenizer (``grok-1`` or a folder holding tokenizer.json / tokenizer.model), personas and the
    weights as checkpoint step 0."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer == toklib.GROK1:
        toklib.install_grok1(run_dir)
    elif not toklib.copy_tokenizer(Path(tokenizer), run_dir):
        raise UserError(f"{tokenizer} has no tokenizer.json or tokenizer.model; add the model's tokenizer file "
                        "(or pass --tokenizer grok-1 for the Grok-1 tokenizer)")
    if not (run_dir / PERSONAS_FILE).is_file():
        atomic_write_text(run_dir / PERSONAS_FILE, json.dumps({DEFAULT_PERSONA: 1}))
    atomic_write_text(run_dir / "spec.json", json.dumps(model.spec.model_dump(), indent=1))
    path = ckpt.save(run_dir, 0, {"model": model.state_dict()}, {"imported": meta}, keep_last=1)
    return path


# ---- the Grok-1 release, staged --------------------------------------------------------------------------
def _staged_path(staging: Path, index: int) -> Path:
    return staging / f"{index:05d}.safetensors"


def _stage_one(release: grok1.ReleaseParams, index: int, name: str, staging: Path) -> dict[str, Any]:
    """Convert one release file into a staged safetensors file (atomic rename); returns its record."""
    value = release[name]
    if isinstance(value, grok1.QuantizedWeight8bit):
        arrays = {"weight": value.weight, "scales": value.scales.astype(np.float32)}  # bf16 -> f32 is exact
    else:
        arrays = {"value": np.ascontiguousarray(value.astype(np.float32))}
    final = _staged_path(staging, index)
    tmp = final.with_suffix(".tmp")
    save_file(arrays, str(tmp))
    tmp.rename(final)
    return {"name": name, "source_bytes": grok1.tensor_path(release.dir, index).stat().st_size,
            "sha256": sha256_file(final)}


class StagedParams(Mapping[str, Any]):
    """The staged tensors as the mapping `from_original_params` takes (read lazily, memory-mapped)."""

    def __init__(self, staging: Path, names: list[str]) -> None:
        self.staging, self.names = staging, names
        self.index = {n: i for i, n in enumerate(names)}

    def __getitem__(self, name: str) -> Any:
        with safe_open(str(_staged_path(self.staging, self.index[name])), framework="numpy") as f:
            if "value" in f.keys():
                return f.get_tensor("value")
            scales = f.get_tensor("scales").astype(grok1.BF16)
            return grok1.QuantizedWeight8bit(f.get_tensor("weight"), scales)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def _load_records(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}  # the record is rewritten atomically, so this is a foreign file: start the staging over


def stage_release(
    ckpt_dir: Path, spec: ModelSpec, run_dir: Path, stop_after: int | None = None
) -> tuple[Path, list[str]]:
    """Stage every release tensor not staged yet. `stop_after` ends early after that many new tensors (tests
    use it to simulate an interruption). Returns (staging folder, names in file order)."""
    release = grok1.ReleaseParams(ckpt_dir, spec)
    staging = Path(run_dir) / STAGING
    staging.mkdir(parents=True, exist_ok=True)
    record_path = staging / "staged.json"
    records = _load_records(record_path)
    progress = Progress("staging", staging / "progress.log")
    converted = 0
    for i, name in enumerate(release.names):
        key = f"{i:05d}"
        rec = records.get(key)
        src = grok1.tensor_path(release.dir, i)
        staged = _staged_path(staging, i)
        if (rec and rec["name"] == name and rec["source_bytes"] == src.stat().st_size and staged.is_file()
                and sha256_file(staged) == rec["sha256"]):
            continue
        if stop_after is not None and converted >= stop_after:
            raise KeyboardInterrupt("stopped early (test)")
        records[key] = _stage_one(release, i, name, staging)
        atomic_write_text(record_path, json.dumps(records))
        converted += 1
        progress(i + 1, len(release.names), name)
    return staging, release.names


def import_grok1(
    ckpt_dir: Path, run_dir: Path, spec: ModelSpec, stop_after: int | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """`gigafactory import grok-1`: the release checkpoint → a run directory (resumable)."""
    run_dir = Path(run_dir)
    refuse_existing(run_dir)
    grok1.check_grok1_shaped(spec)
    if spec.vocab_size < toklib.GROK1_VOCAB:
        raise UserError(f"spec {spec.name!r} has vocab_size {spec.vocab_size}, but the run will use the Grok-1 "
                        f"tokenizer's {toklib.GROK1_VOCAB:,} ids; pass a --model with vocab_size {toklib.GROK1_VOCAB}")
    staging, names = stage_release(ckpt_dir, spec, run_dir, stop_after)
    with torch.no_grad():
        model = grok1.from_original_params(StagedParams(staging, names), spec, Progress("loading"))
    path = write_run(run_dir, model, toklib.GROK1, {"format": "grok-1 release", "source": str(ckpt_dir)})
    shutil.rmtree(staging, ignore_errors=True)
    log(f"imported {len(names)} tensors of {spec.name} into {path}")
    return path
