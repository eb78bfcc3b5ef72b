"""A paged KV cache: fixed-size blocks in one preallocated pool, per-sequence block tables, and a prefix cache.

Why paged: sequences grow one token at a time and finish at unpredictable lengths; giving each a list of
fixed-size blocks from a shared pool wastes at most one partial block per sequence, and lets full blocks be
shared. A full block's contents depend only on the tokens up to and including it, so it is named by a SHA-256
hash chained over the blocks before it (collision-resistant: a crafted prompt cannot make another user's
request read its cached keys, the concern of vLLM's CVE-2025-25183 about Python's `hash()`); a new request
whose prompt starts with the same blocks (the persona's preamble, say) reuses them instead of recomputing them.
Unreferenced cached blocks stay in an LRU list and are evicted only when the pool runs dry.

`PagedBatch` adapts the pool to the model's `KVCacheLike` protocol for one forward pass over several sequences,
so `GrokModel.forward` runs unchanged: it writes the new keys/values into their slots and hands attention each
sequence's whole context gathered from its blocks, with the keys' positions and padding flags, as `KVCache` does.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import Tensor

from gigafactory.model.grok import PAD_ID
from gigafactory.specs import ModelSpec


class OutOfBlocks(Exception):
    """The pool has no free or evictable block; the scheduler preempts a sequence and retries."""


@dataclass
class BlockTable:
    """One sequence's blocks, in order; `hashes[i]` is set once block i is full and registered."""

    blocks: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)


ROOT = b"gigafactory-kv-v1"  # the parent of a sequence's first block


def chain_hash(parent: bytes, block: list[int]) -> bytes:
    """SHA-256 of the parent block's hash and this block's token ids (fixed-width, so no two lists collide)."""
    h = hashlib.sha256(parent)
    h.update(b"".join(t.to_bytes(8, "little", signed=True) for t in block))
    return h.digest()


def block_hashes(tokens: list[int], block_size: int) -> list[bytes]:
    """Chained hashes of the full blocks of `tokens` (a block's identity includes everything before it)."""
    out: list[bytes] = []
    parent = ROOT
    for i in range(len(tokens) // block_size):
        parent = chain_hash(parent, tokens[i * block_size : (i + 1) * block_size])
        out.append(parent)
    return out


class BlockPool:
    def __init__(
        self, spec: ModelSpec, num_blocks: int, block_size: int, device: torch.device, dtype: torch.dtype,
        kv_heads: int | None = None,
    ) -> None:  # fmt: skip
        """`kv_heads`: the heads this rank keeps (a tensor-parallel rank holds n_kv_heads / tp); default all."""
        self.block_size, self.num_blocks = block_size, num_blocks
        shape = (spec.n_layers, num_blocks, kv_heads or spec.n_kv_heads, block_size, spec.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        # Padding tokens are never attended to (as in the model's own cache), so each slot remembers it.
        self.slot_ok = torch.zeros(num_blocks, block_size, dtype=torch.bool, device=device)
        self.refs = [0] * num_blocks
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))
        self.cached: dict[bytes, int] = {}  # chained hash -> block
        self.hash_of: dict[int, bytes] = {}  # block -> chained hash
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks nobody uses, oldest first
        self.prefix_queries = 0  # prompt tokens looked up, and how many were found
        self.prefix_hits = 0

    @staticmethod
    def bytes_per_block(spec: ModelSpec, block_size: int, dtype: torch.dtype, kv_heads: int | None = None) -> int:
        elem = torch.empty(0, dtype=dtype).element_size()
        return 2 * spec.n_layers * (kv_heads or spec.n_kv_heads) * block_size * spec.head_dim * elem

    def available(self) -> int:
        return len(self.free) + len(self.evictable)

    def usage(self) -> float:
        """Share of blocks held by running sequences (cached-but-idle blocks count as free)."""
        return 1.0 - self.available() / self.num_blocks

    def allocate(self) -> int:
        if self.free:
            block = self.free.pop()
        elif self.evictable:
            block, _ = self.evictable.popitem(last=False)
            del self.cached[self.hash_of.pop(block)]
        else:
            raise OutOfBlocks
        self.refs[block] = 1
        return block

    def release(self, table: BlockTable) -> None:
        for block in reversed(table.blocks):  # tail blocks first, so shared prefixes are evicted last
            self.refs[block] -= 1
            if self.refs[block] == 0:
                if block in self.hash_of:
                    self.evictable[block] = None
                else:
                    self.free.append(block)
        table.blocks.clear()
        table.hashes.clear()

    def match_prefix(self, tokens: list[int], table: BlockTable) -> int:
        """Attach the cached blocks that start `tokens`; return how many tokens they cover. At least one token
        is always left to compute, since its logits are needed to sample the next one."""
        hashes = block_hashes(tokens[:-1], self.block_size)
        for h in hashes:
            block = self.cached.get(h)
            if block is None:
                break
            if self.refs[block] == 0:
                self.evictable.pop(block, None)
            self.refs[block] += 1
            table.blocks.append(block)
            table.hashes.append(h)
        hit = len(table.blocks) * self.block_size
        self.prefix_queries += len(tokens)
        self.prefix_hits += hit
        return hit

    def register_full_blocks(self, tokens: list[int], computed: int, table: BlockTable) -> None:
        """Name the blocks that became full of computed tokens, so later prompts can reuse them."""
        n_full = computed // self.block_size
        if n_full <= len(table.hashes):
            return
        parent = table.hashes[-1] if table.hashes else ROOT
        for i in range(len(table.hashes), n_full):
            parent = chain_hash(parent, tokens[i * self.block_size : (i + 1) * self.block_size])
            table.hashes.append(parent)
            block = table.blocks[i]
            if parent not in self.cached and block not in self.hash_of:
                self.cached[parent] = block
                self.hash_of[block] = parent

    def ensure(self, table: BlockTable, n_tokens: int) -> None:
        """Grow `table` to hold `n_tokens`; all or nothing, so a failed grow leaves nothing dangling."""
        need = -(-n_tokens // self.block_size) - len(table.blocks)
        if need <= 0:
            return
        if need > self.available():
            raise OutOfBlocks
        table.blocks.extend(self.allocate() for _ in range(need))


class PagedBatch:
    """`KVCacheLike` for one forward over B sequences. Row b computes tokens at positions
    `starts[b] .. starts[b] + lengths[b] - 1` (right-padded with PAD_ID to T); its context is the first
    `starts[b] + lengths[b]` slots of its block table, slot index = position."""

    def __init__(self, pool: BlockPool, tables: list[BlockTable], starts: list[int], lengths: list[int]) -> None:
        self.pool = pool
        dev = pool.k.device
        bs = pool.block_size
        n_blocks = max(-(-(s + n) // bs) for s, n in zip(starts, lengths, strict=True))
        # Rows with fewer blocks point their tail at block 0: those keys are masked, never read as context.
        self.tables = torch.tensor(
            [t.blocks[:n_blocks] + [0] * (n_blocks - len(t.blocks[:n_blocks])) for t in tables], device=dev
        )
        self.starts = torch.tensor(starts, device=dev)
        self.lengths = torch.tensor(lengths, device=dev)
        self._slots: tuple[Tensor, Tensor, Tensor, Tensor] | None = None

    def begin(self, tokens: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        b, t = tokens.shape
        bs = self.pool.block_size
        real = torch.arange(t, device=tokens.device)[None, :] < self.lengths[:, None]  # [B, T]
        rows, cols = real.nonzero(as_tuple=True)
        pos = positions[rows, cols]
        blocks = self.tables[rows, pos // bs]
        offsets = pos % bs
        self._slots = (rows, cols, blocks, offsets)
        self.pool.slot_ok[blocks, offsets] = tokens[rows, cols] != PAD_ID
        s = self.tables.shape[1] * bs
        key_pos = torch.arange(s, device=tokens.device)
        key_ok = self.pool.slot_ok[self.tables].reshape(b, s)
        # The model applies `attend`'s rule (causal by position, padding masked, a token sees itself); a padding
        # row's output is discarded (and finite: a row with no allowed key gives zeros).
        return key_pos.expand(b, s), key_ok

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        assert self._slots is not None, "begin() must come first"
        rows, cols, blocks, offsets = self._slots
        kp, vp = self.pool.k[layer], self.pool.v[layer]  # [N, Hkv, bs, D]
        kp[blocks, :, offsets] = k[rows, :, cols]
        vp[blocks, :, offsets] = v[rows, :, cols]
        b = k.shape[0]
        # Gather [B, nb, Hkv, bs, D] -> [B, Hkv, nb * bs, D]: the sequence's keys in position order.
        k_all = kp[self.tables].permute(0, 2, 1, 3, 4).reshape(b, kp.shape[1], -1, kp.shape[3])
        v_all = vp[self.tables].permute(0, 2, 1, 3, 4).reshape(b, vp.shape[1], -1, vp.shape[3])
        return k_all, v_all
