"""Checkpoints: torch.distributed.checkpoint (DCP) shards plus a manifest that commits them.

Layout of a run directory's checkpoints::

    ckpt/step_000040/            a complete checkpoint: DCP files + manifest.json (written last)
    ckpt/.step_000060.tmp/       a save in progress; never loaded, removed at start and on the next save

A checkpoint counts only once its folder is renamed from the temporary name, which happens after every
file is written and the manifest (step, data position, RNG states, SHA-256 of every file) is on disk. Loading
verifies the checksums first and falls back to the previous checkpoint, saying why, if the newest is
partial or corrupt.

Checksums scale with the job: each rank hashes only the files it wrote (DCP names them `__<rank>_<n>.distcp`;
rank 0 also writes `.metadata`), in the background thread of an async save, and rank 0 only gathers the digests
into the manifest (which records the rank and the hashing time of each). On load every rank checks the sizes of
all files (a stat each) and hashes only its share (file i goes to rank i mod world), then the ranks agree.

DCP files are resharded on load, so a checkpoint written under one layout loads under
another. Used by the trainer (save/resume) and the server (weights only), so it lives outside both.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import re
import shutil
import time
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

try:  # DCP wraps failures of any rank in CheckpointException, which derives from BaseException (not Exception)
    from torch.distributed.checkpoint.api import CheckpointException
except ImportError:  # pragma: no cover - older torch
    CheckpointException = RuntimeError  # type: ignore[assignment,misc]

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


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _barrier(group: Any = None) -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier(group=group)


def all_gather_objects(obj: Any, group: Any = None) -> list[Any]:
    """Every rank's `obj` (one element without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


_RANK_FILE = re.compile(r"^__(\d+)_\d+\.distcp$")


def writer_rank(name: str) -> int:
    """The rank that wrote a DCP file (`__<rank>_<n>.distcp`); rank 0 for everything else (`.metadata`)."""
    m = _RANK_FILE.match(Path(name).name)
    return int(m.group(1)) if m else 0


def digest_own_files(tmp: Path, rank: int) -> dict[str, Any]:
    """SHA-256 and size of the files this rank wrote into a save folder, and how long hashing took."""
    t0 = time.perf_counter()
    files = {}
    for p in sorted(q for q in tmp.rglob("*") if q.is_file()):
        name = str(p.relative_to(tmp))
        if writer_rank(name) == rank and name != MANIFEST:
            files[name] = {"sha256": sha256_file(p), "bytes": p.stat().st_size, "rank": rank}
    return {"files": files, "hash_s": time.perf_counter() - t0, "rank": rank}


def disk_full_error(path: Path, err: BaseException | None = None) -> UserError:
    free = shutil.disk_usage(path if path.exists() else path.parent).free
    why = f" ({err})" if err is not None else ""
    return UserError(f"disk full: cannot write a checkpoint under {path}{why}; {free / 1e9:.2f} GB free. Free "
                     "space (or lower --keep-last) and resume with --resume")


def is_disk_full(err: BaseException) -> bool:
    """An ENOSPC anywhere in the chain (DCP wraps the writer threads' errors, sometimes only as text)."""
    seen: set[int] = set()
    stack: list[Any] = [err]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(e):
            return True
        stack += [e.__cause__, e.__context__, *getattr(e, "failures", {}).values()]
    return False


def last_checkpoint_bytes(run_dir: Path) -> int:
    """Size of the newest committed checkpoint (the best estimate of the next one), 0 if none."""
    found = list_checkpoints(run_dir)
    if not found:
        return 0
    try:
        return sum(int(i["bytes"]) for i in json.loads((found[0] / MANIFEST).read_text())["files"].values())
    except (OSError, ValueError, KeyError, TypeError):
        return sum(p.stat().st_size for p in found[0].rglob("*") if p.is_file())


def state_bytes(state: Any) -> int:
    """Bytes of the tensors this rank holds in a (nested) state dict: what it will write."""
    if isinstance(state, torch.Tensor):
        local = state.to_local() if hasattr(state, "to_local") else state
        return local.numel() * local.element_size()
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    return 0


def check_free_space(run_dir: Path, need_bytes: int, margin: float = 1.1) -> None:
    """A one-line "disk full" UserError, before writing, if `need_bytes` (x margin) will not fit."""
    root = ckpt_root(run_dir)
    where = root if root.exists() else Path(run_dir)
    free = shutil.disk_usage(where).free
    if need_bytes * margin > free:
        raise UserError(f"disk full: the next checkpoint needs about {need_bytes * margin / 1e9:.2f} GB under {root} "
                        f"but only {free / 1e9:.2f} GB is free. Free space (or lower --keep-last) and resume with "
                        "--resume")


def remove_stale_saves(run_dir: Path) -> list[str]:
    """Delete saves that never committed (a crash, a full disk), so a restart does not trip over them. Call once
    at start, under the run-directory lock. Returns the names removed."""
    root = ckpt_root(run_dir)
    if not root.is_dir():
        return []
    gone = []
    for stale in [*root.glob(".step_*.tmp"), *root.glob(".step_*.old")]:
        shutil.rmtree(stale, ignore_errors=True)
        gone.append(stale.name)
    return gone


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


def commit(
    run_dir: Path, step: int, meta: dict[str, Any], keep_last: int = 3, digests: dict[str, Any] | None = None,
    group: Any = None,
) -> Path:
    """After every rank has written its shards: each rank contributes the digests of its own files (`digests`,
    computed in the background by an async save, or here), rank 0 writes the manifest, renames the folder into
    place and applies retention. Until the rename, loaders do not see this checkpoint at all."""
    root = ckpt_root(run_dir)
    final = root / f"step_{step:06d}"
    tmp = root / f".step_{step:06d}.tmp"
    rank = _rank()
    if digests is None:
        digests = digest_own_files(tmp, rank)
    gathered = all_gather_objects(digests, group)
    if rank == 0:
        files: dict[str, Any] = {}
        for d in gathered:
            files.update(d["files"])
        manifest = {
            "step": step,
            **meta,
            "world_size": len(gathered),
            "hash_s_by_rank": [round(d["hash_s"], 6) for d in gathered],
            "files": dict(sorted(files.items())),
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
    _barrier(group)
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
    try:
        (writer or (lambda s, p: dcp.save(s, checkpoint_id=str(p))))(state, tmp)
    except (Exception, CheckpointException) as err:
        if is_disk_full(err):
            raise disk_full_error(ckpt_root(run_dir), None) from None
        raise
    return commit(run_dir, step, meta, keep_last)


def _read_manifest(path: Path) -> dict[str, Any]:
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise CorruptCheckpoint("no manifest (save did not finish)")
    try:
        manifest = json.loads(mpath.read_text())
        if not isinstance(manifest.get("files"), dict):
            raise KeyError("files")
    except (json.JSONDecodeError, KeyError, UnicodeDecodeError, AttributeError) as err:
        raise CorruptCheckpoint(f"unreadable manifest ({err})") from None
    return manifest


def _check_files(path: Path, files: dict[str, Any], rank: int, world: int) -> str | None:
    """Sizes of every file; SHA-256 of this rank's share (file i of the sorted names goes to rank i mod world).
    The first problem found, or None."""
    for i, (name, info) in enumerate(sorted(files.items())):
        f = path / name
        if not f.is_file():
            return f"missing file {name}"
        if f.stat().st_size != info["bytes"]:
            return f"{name} is {f.stat().st_size} bytes, the manifest says {info['bytes']}"
        if i % world == rank and sha256_file(f) != info["sha256"]:
            return f"checksum mismatch in {name}"
    return None


def verify(path: Path, rank: int = 0, world: int = 1) -> dict[str, Any]:
    """The manifest of a checkpoint whose files match their sizes and (this rank's share of) their checksums;
    CorruptCheckpoint otherwise. With the defaults one process checks every file."""
    manifest = _read_manifest(path)
    problem = _check_files(path, manifest["files"], rank, world)
    if problem is not None:
        raise CorruptCheckpoint(problem)
    return manifest


def verify_collective(path: Path) -> dict[str, Any]:
    """`verify` split over the ranks of the process group: every rank hashes 1/world of the files, and all agree
    on the outcome (the first problem any rank found)."""
    rank, world = _rank(), _world()
    try:
        manifest = _read_manifest(path)
        problem = _check_files(path, manifest["files"], rank, world)
    except CorruptCheckpoint as err:
        manifest, problem = {}, str(err)
    problems = [p for p in all_gather_objects(problem) if p is not None]
    if problems:
        raise CorruptCheckpoint(problems[0])
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
            manifest = verify_collective(path)
            dcp.load(state, checkpoint_id=str(path))
        except CorruptCheckpoint as err:
            skipped.append(f"checkpoint {path.name} is unusable: {err}")
            continue
        # DCP raises assorted errors on damaged files that still pass size checks, and wraps any rank's failure
        # in CheckpointException, a BaseException that `except Exception` would let through.
        except (Exception, CheckpointException) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            skipped.append(f"checkpoint {path.name} failed to load: {type(err).__name__}: {first[:200]}")
            continue
        return Loaded(path, manifest, skipped)
    raise UserError(
        f"no usable checkpoint in {ckpt_root(run_dir)}: " + "; ".join(skipped) + ". Start a new run without --resume"
    )


LOCK = ".lock"


class RunLock:
    """An exclusive lock on a run directory, held by rank 0 of the job that trains in it, so two jobs never write
    the same checkpoints. `flock` is released by the kernel when its holder dies, so a lock left by a crashed job
    is never in the way; the holder's host, pid and start time are written into the lock file so that a refusal
    names the holder, and a lock file whose holder is gone is reported as stale and taken over."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK
        self._fd: int | None = None
        self.stale: str | None = None  # the previous holder, if it left without releasing (a crash)

    def acquire(self) -> RunLock:
        """Take the lock, or a UserError naming its holder. Re-entrant within one process (a process is one job:
        tests and notebooks build several trainers on one directory in turn)."""
        import fcntl
        import socket

        self.path.parent.mkdir(parents=True, exist_ok=True)
        key = str(self.path.resolve())
        held = _HELD.get(key)
        if held is not None and held._fd is not None:
            return held
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise UserError(f"{self.path.parent} is in use by another job ({self._holder_text()}); wait for it to "
                            "end or use another --run-dir") from None
        previous = self._holder_text()
        if previous != "holder unknown":
            self.stale = previous
        info = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                        time.gmtime())}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        _HELD[key] = self
        return self

    def _holder_text(self) -> str:
        try:
            h = json.loads(self.path.read_text() or "{}")
            return f"pid {int(h['pid'])} on host {h['host']} since {h['since']}, lock file {self.path}"
        except (OSError, ValueError, KeyError, TypeError):
            return "holder unknown"

    def release(self) -> None:
        if self._fd is None:
            return
        import fcntl

        os.ftruncate(self._fd, 0)  # an empty lock file: released cleanly, nothing stale to report
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None
        _HELD.pop(str(self.path.resolve()), None)


_HELD: dict[str, RunLock] = {}  # locks this process holds, by lock-file path


def lock_run_dir(run_dir: Path) -> tuple[RunLock | None, list[str]]:
    """Collective: rank 0 takes the run directory's lock and removes stale temporary saves; every rank raises
    the same one-line UserError if another job holds it. Returns (the lock on rank 0, notes to print)."""
    lock, notes, problem = None, [], None
    if _rank() == 0:
        try:
            lock = RunLock(run_dir).acquire()
            if lock.stale:
                notes.append(f"stale run-directory lock ({lock.stale}) taken over: its job ended without releasing")
            for name in remove_stale_saves(run_dir):
                notes.append(f"removed the unfinished save {name} left by an earlier run")
        except UserError as err:
            problem = str(err)
    problems = [p for p in all_gather_objects(problem) if p]
    if problems:
        raise UserError(problems[0])
    return lock, notes
