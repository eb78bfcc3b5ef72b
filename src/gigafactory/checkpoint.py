"""Checkpoints: torch.distributed.checkpoint (DCP) shards plus a manifest that commits them.

Layout of a run directory's checkpoints::

    ckpt/step_000040/            a complete checkpoint: DCP files + manifest.json (written last)
    ckpt/.step_000060.tmp/       a save in progress; never loaded, removed on the next save

A checkpoint counts only once its folder is renamed from the temporary name, which happens after every
file is written and the manifest (step, data position, RNG states, SHA-256 of every file) is on disk. Loading
verifies the checksums first and falls back to the previous checkpoint, saying why, if the newest is
partial or corrupt. DCP files are resharded on load, so a checkpoint written under one layout loads under
another. Used by the trainer (save/resume) and the server (weights only), so it lives outside both.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from gigafactory.errors import UserError
from gigafactory.util import atomic_write_text, fsync_dir, sha256_file

MANIFEST = "manifest.json"
# One process without a process group is a supported DCP mode; its warning would only confuse users.
warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
_STEP_DIR = re.compile(r"^step_(\d{6,})$")


class CorruptCheckpoint(Exception):
    pass


@dataclass
class Loaded:
    path: Path
    manifest: dict[str, Any]
    skipped: list[str]  # one line per newer checkpoint that could not be used, and why


def ckpt_root(run_dir: Path) -> Path:
    return Path(run_dir) / "ckpt"


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier(group: Any = None) -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier(group=group)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Committed checkpoints, newest first."""
    root = ckpt_root(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def encode_rng() -> dict[str, str]:
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return {k: base64.b64encode(v.numpy().tobytes()).decode() for k, v in states.items()}


def restore_rng(encoded: dict[str, str]) -> None:
    def tensor(key: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(encoded[key])), dtype=torch.uint8)

    torch.set_rng_state(tensor("torch"))
    if "cuda" in encoded and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensor("cuda"))


def begin(run_dir: Path, step: int) -> Path:
    """The temporary folder a save of `step` writes into (collective: rank 0 creates it, all ranks wait)."""
    root = ckpt_root(run_dir)
    tmp = root / f".step_{step:06d}.tmp"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".step_*.tmp"):  # saves that never committed (a crash): nothing reads them
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    return tmp


def commit(run_dir: Path, step: int, meta: dict[str, Any], keep_last: int = 3) -> Path:
    """After every rank has written its shards: rank 0 checksums them, writes the manifest, renames the folder
    into place and applies retention. Until the rename, loaders do not see this checkpoint at all."""
    root = ckpt_root(run_dir)
    final = root / f"step_{step:06d}"
    tmp = root / f".step_{step:06d}.tmp"
    _barrier()
    if _rank() == 0:
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {
            "step": step,
            **meta,
            "files": {str(p.relative_to(tmp)): {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in files},
        }
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1))
        fsync_dir(tmp)
        if final.exists():  # re-saving a step after a resume: the new copy is complete, so replace the old
            trash = root / f".step_{step:06d}.old"
            shutil.rmtree(trash, ignore_errors=True)
            final.rename(trash)
            tmp.rename(final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(final)
        fsync_dir(root)
        # Checkpoints of later steps belong to a history this run left (it resumed from an older one, e.g. past
        # a corrupt newest): drop them, so retention and the next resume only see this history.
        for other in list_checkpoints(run_dir):
            if int(other.name.removeprefix("step_")) > step:
                shutil.rmtree(other, ignore_errors=True)
        for old in list_checkpoints(run_dir)[keep_last:]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def save(
    run_dir: Path,
    step: int,
    state: dict[str, Any],
    meta: dict[str, Any],
    keep_last: int = 3,
    writer: Callable[[dict[str, Any], Path], None] | None = None,
) -> Path:
    """Write `state` (model/optimizer state dicts, possibly sharded) with DCP and commit it atomically.
    Collective when a process group exists. `writer` replaces the DCP call (tests inject failures with it)."""
    tmp = begin(run_dir, step)
    (writer or (lambda s, p: dcp.save(s, checkpoint_id=str(p))))(state, tmp)
    return commit(run_dir, step, meta, keep_last)


def verify(path: Path) -> dict[str, Any]:
    """The manifest of a checkpoint whose files all match their checksums; CorruptCheckpoint otherwise."""
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise CorruptCheckpoint("no manifest (save did not finish)")
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as err:
        raise CorruptCheckpoint(f"unreadable manifest ({err})") from None
    for name, info in files.items():
        f = path / name
        if not f.is_file():
            raise CorruptCheckpoint(f"missing file {name}")
        if f.stat().st_size != info["bytes"]:
            raise CorruptCheckpoint(f"{name} is {f.stat().st_size} bytes, the manifest says {info['bytes']}")
        if sha256_file(f) != info["sha256"]:
            raise CorruptCheckpoint(f"checksum mismatch in {name}")
    return manifest


def load_latest(run_dir: Path, state: dict[str, Any]) -> Loaded | None:
    """Load the newest verified checkpoint into `state` in place (DCP reshards to its layout). Newer ones that
    fail verification or loading are skipped and reported. None if there is no checkpoint at all."""
    candidates = list_checkpoints(run_dir)
    if not candidates:
        return None
    skipped: list[str] = []
    for path in candidates:
        try:
            manifest = verify(path)
            dcp.load(state, checkpoint_id=str(path))
        except CorruptCheckpoint as err:
            skipped.append(f"checkpoint {path.name} is unusable: {err}")
            continue
        except Exception as err:  # DCP raises assorted errors on damaged files that still pass size checks
            skipped.append(f"checkpoint {path.name} failed to load: {type(err).__name__}: {str(err)[:200]}")
            continue
        return Loaded(path, manifest, skipped)
    raise UserError(
        f"no usable checkpoint in {ckpt_root(run_dir)}: " + "; ".join(skipped) + ". Start a new run without --resume"
    )
