"""Peer snapshots: a restarted rank takes its state from a peer's host memory instead of the disk checkpoint, as
Gemini (Wang et al., SOSP 2023) and ByteRobust describe.

Every `--peer-snapshot-every K` steps each rank serialises its own state (its model and optimizer shards as local
tensors, the step, the data position, its RNG state) and sends it over a dedicated gloo group to its peer: the same
local rank on the next host, `(rank + local_world) % world`, or the next rank when the job has one host. The peer
keeps it, with a SHA-256 of the bytes, as one file in `/dev/shm` (tmpfs: host RAM, not disk; the directory can be
moved with GIGAFACTORY_PEER_STORE). A file there outlives the worker processes that torchrun's agent (or
`gigafactory launch`) kills and starts again, so no separate keeper process is needed; it does not outlive a reboot
or the loss of the peer's host. The copy of rank r is never on r's own host when there are several hosts, so a
host that dies takes only the copies it held, never the only copy of its own ranks.

After a restart every rank reads the copy it holds and checks its checksum, and all ranks agree: if every copy is
present, intact, of one step, of this world size and layout, and not older than the newest disk checkpoint, each
holder sends its copy back to its owner (the ring in reverse) and every rank restores from it; the disk is not
read. Otherwise all ranks load the disk checkpoint, with one line saying why (missing, corrupt, stale, another
world). Every rank, failed or not, restores from its peer: a torchrun restart ends all workers.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

MAGIC = b"GFPEER1\n"


def store_root() -> Path:
    """Where held copies live: GIGAFACTORY_PEER_STORE, else /dev/shm (host RAM), else the temporary directory."""
    env = os.environ.get("GIGAFACTORY_PEER_STORE")
    if env:
        return Path(env)
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


def ring(rank: int, world: int, local_world: int) -> tuple[int, int]:
    """(peer that holds this rank's copy, owner whose copy this rank holds): the same local rank on the next host,
    or the next rank on a single host."""
    step = local_world if 0 < local_world < world and world % local_world == 0 else 1
    return (rank + step) % world, (rank - step) % world


def local_tensors(state: Any) -> Any:
    """The state with every (distributed) tensor replaced by a CPU copy of this rank's shard."""
    if isinstance(state, torch.Tensor):
        local = state.to_local() if hasattr(state, "to_local") else state
        return local.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {k: local_tensors(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(local_tensors(v) for v in state)
    return state


def fill(fresh: Any, saved: Any, where: str = "") -> Any:
    """Copy `saved` (from `local_tensors`) into the tensors of `fresh` in place (the same structure, as built by
    get_state_dict); non-tensor values are taken from `saved`. ValueError if the structures differ."""
    if isinstance(fresh, torch.Tensor):
        local = fresh.to_local() if hasattr(fresh, "to_local") else fresh
        if not isinstance(saved, torch.Tensor) or saved.shape != local.shape:
            raise ValueError(f"{where or 'state'} has another shape in the snapshot")
        with torch.no_grad():
            local.copy_(saved)
        return fresh
    if isinstance(fresh, dict):
        if not isinstance(saved, dict) or set(fresh) != set(saved):
            raise ValueError(f"{where or 'state'} has other entries in the snapshot")
        return {k: fill(v, saved[k], f"{where}.{k}") for k, v in fresh.items()}
    if isinstance(fresh, (list, tuple)):
        if not isinstance(saved, (list, tuple)) or len(saved) != len(fresh):
            raise ValueError(f"{where or 'state'} has another length in the snapshot")
        return type(fresh)(fill(v, s, f"{where}[{i}]") for i, (v, s) in enumerate(zip(fresh, saved, strict=True)))
    return saved


def encode(state: Any, meta: dict[str, Any]) -> bytes:
    """MAGIC, the SHA-256 of the rest, one line of JSON metadata, then the tensors (torch.save)."""
    buf = io.BytesIO()
    buf.write(json.dumps(meta).encode() + b"\n")
    torch.save(local_tensors(state), buf)
    body = buf.getvalue()
    return MAGIC + hashlib.sha256(body).hexdigest().encode() + b"\n" + body


def _split(blob: bytes, verify: bool) -> tuple[dict[str, Any], memoryview]:
    head = len(MAGIC) + 65
    if not blob.startswith(MAGIC) or len(blob) < head:
        raise ValueError("not a peer snapshot")
    body = memoryview(blob)[head:]
    if verify and hashlib.sha256(body).hexdigest() != blob[len(MAGIC) : head - 1].decode():
        raise ValueError("checksum mismatch")
    end = blob.index(b"\n", head)
    return json.loads(blob[head:end]), body[end + 1 - head :]


def read_meta(blob: bytes) -> dict[str, Any]:
    """The metadata of an encoded snapshot whose checksum matches; ValueError otherwise."""
    return _split(blob, verify=True)[0]


def decode(blob: bytes, verify: bool = True) -> dict[str, Any]:
    """{"meta", "state"} of an encoded snapshot; ValueError if it is not one or (with `verify`) its checksum does
    not match."""
    meta, tensors = _split(blob, verify)
    return {"meta": meta, "state": torch.load(io.BytesIO(tensors), weights_only=True)}


@dataclass
class Held:
    """What a rank found in its store after a restart: the copy it holds for `owner`, or why there is none."""

    owner: int
    blob: bytes | None
    meta: dict[str, Any] | None
    problem: str | None


class PeerSnapshots:
    """One rank's side of the scheme: `snapshot` every K steps (collective), `restore` after a restart
    (collective), `discard` when the run ends."""

    def __init__(self, run_dir: Path, every: int, fingerprint: str) -> None:
        self.every, self.fingerprint = every, fingerprint
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1
        self.local_world = int(os.environ.get("LOCAL_WORLD_SIZE", self.world))
        self.peer, self.owner = ring(self.rank, self.world, self.local_world)
        key = hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]
        self.dir = store_root() / f"gigafactory-peer-{key}"
        self.path = self.dir / f"held-by-rank{self.rank}.snap"
        self.group = dist.new_group(backend="gloo") if self.distributed else None
        self.last_bytes = 0

    # ---- taking snapshots -----------------------------------------------------------------------------------
    def snapshot(self, step: int, state: Any, meta: dict[str, Any]) -> str | None:
        """Send this rank's state of `step` to its peer and keep the copy received from its owner. A copy that does
        not fit (a small /dev/shm) is dropped with the reason returned, never a crash: the disk checkpoint remains."""
        blob = encode(state, {**meta, "step": step, "owner": self.rank, "world": self.world,
                              "fingerprint": self.fingerprint})
        held = self._exchange(blob, send_to=self.peer, recv_from=self.owner)
        self.last_bytes = len(blob)
        return self._keep(held)

    def _keep(self, blob: bytes) -> str | None:
        """Write atomically (tmpfs: no fsync needed for RAM, a rename keeps readers from a half-written copy)."""
        tmp = self.path.with_name(self.path.name + f".{os.getpid()}.tmp")
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(blob)
            os.replace(tmp, self.path)
        except OSError as err:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            self.forget()  # an older copy would only be restored if every rank still had one
            return f"peer snapshot not kept in {self.dir} ({err.strerror or err}); restarts will load from disk"
        return None

    def _exchange(self, blob: bytes, send_to: int, recv_from: int) -> bytes:
        """Send `blob` to one rank and receive another's (sizes first): point-to-point on the gloo group."""
        if not self.distributed or send_to == self.rank:
            return blob
        size, other = torch.tensor([len(blob)], dtype=torch.int64), torch.zeros(1, dtype=torch.int64)
        self._p2p(size, other, send_to, recv_from)
        out = torch.empty(int(other.item()), dtype=torch.uint8)
        self._p2p(torch.frombuffer(bytearray(blob), dtype=torch.uint8), out, send_to, recv_from)
        return out.numpy().tobytes()

    def _p2p(self, send: torch.Tensor, recv: torch.Tensor, send_to: int, recv_from: int) -> None:
        ops = [dist.P2POp(dist.isend, send, send_to, self.group), dist.P2POp(dist.irecv, recv, recv_from, self.group)]
        for req in dist.batch_isend_irecv(ops):
            req.wait()

    # ---- restoring --------------------------------------------------------------------------------------------
    def read_held(self) -> Held:
        try:
            blob = self.path.read_bytes()
        except OSError:
            return Held(self.owner, None, None, f"rank {self.rank} holds no snapshot of rank {self.owner}")
        try:
            meta = read_meta(blob)
        except Exception as err:  # a damaged pickle raises assorted errors; all mean "do not use it"
            return Held(self.owner, None, None, f"the snapshot of rank {self.owner} held by rank {self.rank} is "
                        f"corrupt ({str(err).splitlines()[0][:120]})")
        return Held(self.owner, blob, meta, None)

    def restore(self, disk_step: int) -> tuple[dict[str, Any] | None, str]:
        """Collective. ({"meta", "state"} of this rank's own snapshot, "") when every rank can restore from its
        peer; (None, why not) otherwise, on every rank alike."""
        held = self.read_held()
        info = {"problem": held.problem, "meta": None if held.meta is None else
                {k: held.meta.get(k) for k in ("step", "owner", "world", "fingerprint")}}
        infos = [info]
        if self.distributed:
            infos = [None] * self.world
            dist.all_gather_object(infos, info, group=self.group)
        why = judge(infos, held_owner=[ring(r, self.world, self.local_world)[1] for r in range(self.world)],
                    world=self.world, fingerprint=self.fingerprint, disk_step=disk_step)
        if why:
            return None, why
        assert held.blob is not None
        mine = self._exchange(held.blob, send_to=self.owner, recv_from=self.peer)
        return decode(mine, verify=False), ""  # verified by its holder just now; TCP carried it

    def forget(self) -> None:
        """Drop the copy this rank holds (a store that cannot be reached holds none)."""
        with contextlib.suppress(OSError):
            self.path.unlink(missing_ok=True)

    def discard(self) -> None:
        """The run ended: free the host memory the copies take (collective; each host's first rank removes its
        store after all ranks are done with theirs)."""
        self.forget()
        if self.distributed:
            dist.barrier(group=self.group)
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            shutil.rmtree(self.dir, ignore_errors=True)


def judge(infos: list[dict[str, Any]], held_owner: list[int], world: int, fingerprint: str,
          disk_step: int) -> str:
    """Why the ranks cannot restore from peer copies ("" if they can): the first problem any rank found."""
    for rank, info in enumerate(infos):
        if info["problem"]:
            return info["problem"]
        meta = info["meta"]
        if meta["world"] != world or meta["owner"] != held_owner[rank] or meta["fingerprint"] != fingerprint:
            return (f"the snapshot held by rank {rank} is of another job shape (world {meta['world']}, rank "
                    f"{meta['owner']}); this job has world {world}")
    steps = sorted({info["meta"]["step"] for info in infos})
    if len(steps) > 1:
        return f"the peer snapshots are of different steps ({', '.join(map(str, steps))}): a snapshot was cut short"
    if steps[0] < disk_step:
        return f"the peer snapshots (step {steps[0]}) are older than the newest checkpoint (step {disk_step})"
    return ""


def fingerprint(*parts: Any) -> str:
    """A short digest of what makes two jobs' shards interchangeable (model, layout, batch, seed)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
