"""The inference engine: a scheduler with continuous batching over a paged KV cache, run in its own thread.

Every step the scheduler (1) drops aborted sequences, (2) admits waiting ones while the batch has room and the
pool can hold their prompts (after reusing cached prefix blocks), (3) spends a token budget: one token for each
decoding sequence first, the rest on prompt chunks, so a long prompt is prefilled over several steps instead of
stalling everyone's next token. Decodes and prefill chunks run as two forwards (a [B, 1] batch and a padded
[B, chunk] batch) to avoid padding every decode up to the longest chunk. When blocks run out, the newest
sequence is preempted: its blocks are freed and it is recomputed later from its tokens so far (its random
generator is kept, so a seeded request gives the same tokens either way).

A sequence is just its tokens and how many of them are in the cache; when all are, the last logits give the
next token. Prefill, decode and recompute after preemption are the same code path.

Results go to each request's `sink` (called from the engine thread); the HTTP layer forwards them to asyncio.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from prometheus_client import generate_latest
from tokenizers import Tokenizer
from torch import Tensor

from gigafactory.errors import UserError
from gigafactory.model.grok import PAD_ID, GrokModel
from gigafactory.serve.json_mode import JsonConstraint, TokenTexts
from gigafactory.serve.kv_cache import BlockPool, BlockTable, OutOfBlocks, PagedBatch
from gigafactory.serve.metrics import ServeMetrics
from gigafactory.serve.sampling import SamplingParams, TextTracker, TokenLogprob, next_token

log = logging.getLogger(__name__)
EOS_ID = 1  # the tokenizer's document separator


class QueueFull(Exception):
    """Too many requests waiting; the client should retry later (HTTP 429)."""


@dataclass
class Output:
    """A piece of one sequence's result: new text, and at the end why it stopped."""

    text: str
    finish_reason: str | None = None  # "stop", "length", "abort" or "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of the tokens since the previous piece


@dataclass
class Sequence:
    prompt: list[int]
    params: SamplingParams
    sink: Callable[[Output], None]
    id: int = 0
    request: int = 0
    tokens: list[int] = field(default_factory=list)
    computed: int = 0
    table: BlockTable = field(default_factory=BlockTable)
    generator: torch.Generator | None = None
    tracker: TextTracker | None = None
    json: JsonConstraint | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)  # not yet sent
    arrival: float = field(default_factory=time.monotonic)
    last_token_at: float | None = None

    @property
    def n_out(self) -> int:
        return len(self.tokens) - len(self.prompt)


@dataclass
class EngineConfig:
    max_batch: int = 32  # sequences decoding together
    kv_cache_mb: float = 64.0  # the pool's memory budget
    block_size: int = 16
    max_queue: int = 256  # waiting requests (not sequences: n > 1 is one request) beyond this are refused
    step_tokens: int = 256  # token budget per step: decodes first, then prefill chunks
    # Small matrices gain nothing from a second thread, and on a shared CPU a busy one makes OpenMP's
    # spin-waits catastrophic (measured: 40x slower steps under load with 2 threads).
    threads: int = 1


class Engine:
    def __init__(
        self, model: GrokModel, tok: Tokenizer, config: EngineConfig | None = None, metrics: ServeMetrics | None = None
    ) -> None:
        self.model, self.tok = model, tok
        self.eos_id = getattr(tok, "eos_id", EOS_ID)  # the Grok-1 SentencePiece model ends documents with id 2
        self.config = cfg = config or EngineConfig()
        self.spec = model.spec
        self.metrics = metrics or ServeMetrics()
        param = next(model.parameters())
        self.device = param.device
        kv_heads = getattr(model, "kv_heads", None)  # a tensor-parallel rank's share (`serve.parallel`)
        per_block = BlockPool.bytes_per_block(self.spec, cfg.block_size, param.dtype, kv_heads)
        num_blocks = int(cfg.kv_cache_mb * 2**20 // per_block)
        need = -(-self.spec.max_seq_len // cfg.block_size)
        if num_blocks < need:
            raise UserError(
                f"--kv-cache-mb {cfg.kv_cache_mb} holds {num_blocks} blocks; one full-context sequence needs "
                f"{need} ({need * per_block / 2**20:.2f} MB)"
            )
        self.pool = BlockPool(self.spec, num_blocks, cfg.block_size, self.device, param.dtype, kv_heads)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._inbox: deque[Sequence] = deque()
        self._aborts: set[int] = set()
        self._lock = threading.Condition()
        self._next_id = 0
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._unstarted: dict[int, int] = {}  # request -> its sequences not yet admitted (the queue bound)
        self._json_vocab: TokenTexts | None = None
        self.heartbeat = time.monotonic()  # the loop touches it every iteration; /health reads it

    # -- called from other threads ------------------------------------------------------------------------

    def add(self, prompt: list[int], params: SamplingParams, sink: Callable[[Output], None]) -> int:
        """Queue one sequence as a request of its own; see `submit`."""
        return self.submit([(prompt, params, sink)])[0]

    def submit(self, jobs: list[tuple[list[int], SamplingParams, Callable[[Output], None]]]) -> list[int]:
        """Queue one request's sequences, all or none; returns their ids (for `abort`). Raises QueueFull when
        `max_queue` requests are already waiting to start."""
        with self._lock:
            if len(self._unstarted) >= self.config.max_queue:
                raise QueueFull
            self._next_id += 1
            request = self._next_id
            ids = []
            for prompt, params, sink in jobs:
                self._next_id += 1
                seq = Sequence(prompt=list(prompt), params=params, sink=sink, id=self._next_id, request=request)
                self._inbox.append(seq)
                ids.append(seq.id)
            self._unstarted[request] = len(jobs)
            self._lock.notify()
            return ids

    def queued_requests(self) -> int:
        return len(self._unstarted)

    def abort(self, seq_id: int) -> None:
        """Stop a sequence (its client went away) and free its blocks at the next step."""
        with self._lock:
            self._aborts.add(seq_id)
            self._lock.notify()

    def start(self) -> None:
        torch.set_num_threads(self.config.threads)
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="gigafactory-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        with self._lock:
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stats(self) -> dict[str, int]:
        return {"running": len(self.running), "waiting": len(self.waiting) + len(self._inbox)}

    def exposition(self) -> bytes:
        """The metrics in Prometheus' text format: the engine's and the HTTP side's."""
        return generate_latest(self.metrics.registry) + generate_latest(self.metrics.http_registry)

    # -- the engine thread --------------------------------------------------------------------------------

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stopping:
            self.heartbeat = time.monotonic()
            with self._lock:
                if not self.busy():
                    self._lock.wait(timeout=0.25)  # idle: wake up anyway to keep the heartbeat fresh
            self.step_safely()

    def busy(self) -> bool:
        return bool(self._inbox or self._aborts or self.waiting or self.running)

    def step_safely(self) -> None:
        """One step; a bug must not silently kill the loop: it fails the batch, and serving goes on."""
        try:
            self.step()
        except Exception:
            log.exception("engine step failed")
            for seq in self.running + list(self.waiting):
                self._finish(seq, "error")
            self.running.clear()
            self.waiting.clear()

    def step(self) -> None:
        self._take_inbox()
        self._admit()
        decode, prefill = self._schedule()
        if decode or prefill:
            with torch.inference_mode():
                for group in (decode, prefill):
                    if group:
                        self._run(group)
        self.metrics.observe_engine(self)

    def _take_inbox(self) -> None:
        with self._lock:
            self.waiting.extend(self._inbox)
            self._inbox.clear()
            aborts, self._aborts = self._aborts, set()
        if aborts:
            for seq in [s for s in self.running + list(self.waiting) if s.id in aborts]:
                self._finish(seq, "abort")
            self.running = [s for s in self.running if s.id not in aborts]
            self.waiting = deque(s for s in self.waiting if s.id not in aborts)

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.config.max_batch:
            seq = self.waiting[0]
            if not seq.tokens:  # first admission (a preempted sequence keeps its tokens and generator)
                self._start(seq)
            seq.computed = self.pool.match_prefix(seq.tokens, seq.table)
            # Room for the whole prompt plus one block per running sequence, so admission does not
            # immediately force a preemption.
            need = -(-len(seq.tokens) // self.pool.block_size) - len(seq.table.blocks)
            if need + len(self.running) > self.pool.available():
                self.pool.release(seq.table)
                seq.computed = 0
                return
            self.waiting.popleft()
            self.running.append(seq)

    def _start(self, seq: Sequence) -> None:
        seq.tokens = list(seq.prompt)
        seq.tracker = TextTracker(self.tok, seq.params.stop)
        seq.generator = torch.Generator(device=self.device)
        seq.generator.manual_seed(seq.params.seed if seq.params.seed is not None else torch.seed())
        if seq.params.json_object:
            if self._json_vocab is None:
                self._json_vocab = TokenTexts.of(self.tok)
            seq.json = JsonConstraint(self._json_vocab)
        self._unqueue(seq)

    def _unqueue(self, seq: Sequence) -> None:
        with self._lock:
            left = self._unstarted.get(seq.request, 0) - 1
            if left > 0:
                self._unstarted[seq.request] = left
            else:
                self._unstarted.pop(seq.request, None)

    def _schedule(self) -> tuple[list[tuple[Sequence, int]], list[tuple[Sequence, int]]]:
        budget = self.config.step_tokens
        decode: list[tuple[Sequence, int]] = []
        prefill: list[tuple[Sequence, int]] = []
        # Oldest first: decodes, then prompt chunks; allocation may preempt the newest sequences.
        for want_decode in (True, False):
            for seq in list(self.running):
                todo = len(seq.tokens) - seq.computed
                if (todo == 1) != want_decode or seq not in self.running or budget <= 0:
                    continue
                n = min(todo, budget)
                if not self._reserve(seq, n):
                    continue
                (decode if todo == 1 else prefill).append((seq, n))
                budget -= n
        live = set(id(s) for s in self.running)
        return [x for x in decode if id(x[0]) in live], [x for x in prefill if id(x[0]) in live]

    def _reserve(self, seq: Sequence, n: int) -> bool:
        """Blocks for `n` more tokens of `seq`, preempting newer sequences if the pool is dry."""
        while True:
            try:
                self.pool.ensure(seq.table, seq.computed + n)
                return True
            except OutOfBlocks:
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    return False

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.pool.release(seq.table)
        seq.computed = 0
        self.waiting.appendleft(seq)
        self.metrics.preemptions.inc()

    def _run(self, group: list[tuple[Sequence, int]]) -> None:
        t = max(n for _, n in group)
        starts = [seq.computed for seq, _ in group]
        lengths = [n for _, n in group]
        # Built as Python lists and converted once: per-row tensor writes cost more than the tiny model's math.
        tokens = torch.tensor([seq.tokens[seq.computed : seq.computed + n] + [PAD_ID] * (t - n) for seq, n in group])
        positions = torch.tensor([[seq.computed + min(j, n - 1) for j in range(t)] for seq, n in group])
        cache = PagedBatch(self.pool, [seq.table for seq, _ in group], starts, lengths)
        # Logits of each row's last token only: the others would be thrown away.
        at = (torch.tensor(lengths) - 1).to(self.device)
        last = self.model(tokens.to(self.device), positions.to(self.device), cache, at)[:, 0]  # [B, V]
        # Greedy rows share one argmax (what `sample` does at temperature 0); the others sample one by one,
        # each with its own generator, exactly as `generate` does.
        shared = [self._shares_argmax(seq) for seq, _ in group]
        greedy = last.argmax(-1).tolist() if any(shared) else []
        for row, (seq, n) in enumerate(group):
            seq.computed += n
            self.pool.register_full_blocks(seq.tokens, seq.computed, seq.table)
            if seq.computed == len(seq.tokens):
                self._append(seq, last[row], greedy[row] if shared[row] else None)

    @staticmethod
    def _shares_argmax(seq: Sequence) -> bool:
        return seq.params.temperature <= 0 and seq.params.plain and seq.params.logprobs is None

    def _append(self, seq: Sequence, logits: Tensor, token: int | None = None) -> None:
        p = seq.params
        if token is None:
            remaining = min(p.max_tokens - seq.n_out, self.spec.max_seq_len - len(seq.tokens))
            token, logprob = next_token(logits, p, seq.tokens[len(seq.prompt) :], seq.generator, seq.json, remaining)
            if logprob is not None:
                seq.logprobs.append(logprob)
            if seq.json is not None:
                seq.json.accept(token)
        now = time.monotonic()
        if seq.last_token_at is None:
            self.metrics.ttft.observe(now - seq.arrival)
        else:
            self.metrics.itl.observe(now - seq.last_token_at)
        seq.last_token_at = now
        seq.tokens.append(token)
        self.metrics.generated_tokens.inc()
        assert seq.tracker is not None
        if token == self.eos_id and not p.ignore_eos:
            seq.tokens.pop()  # the separator is not part of the answer
            self._done(seq, "stop")
            return
        piece, hit = seq.tracker.update(seq.tokens[len(seq.prompt) :])
        if hit or (seq.json is not None and seq.json.done):
            self._done(seq, "stop", piece)
        elif seq.n_out >= p.max_tokens or len(seq.tokens) >= self.spec.max_seq_len:
            self._done(seq, "length", piece)
        elif piece:
            seq.sink(Output(piece, logprobs=self._take_logprobs(seq)))

    @staticmethod
    def _take_logprobs(seq: Sequence) -> list[TokenLogprob]:
        out, seq.logprobs = seq.logprobs, []
        return out

    def _done(self, seq: Sequence, reason: str, piece: str = "") -> None:
        self.running.remove(seq)
        self._finish(seq, reason, piece)

    def _finish(self, seq: Sequence, reason: str, piece: str = "") -> None:
        self.pool.release(seq.table)
        if not seq.tokens:  # finished before it started (aborted while queued)
            self._unqueue(seq)
        if seq.tracker is not None and reason in ("stop", "length"):
            piece += seq.tracker.finish()
        self.metrics.finished(reason, time.monotonic() - seq.arrival)
        seq.sink(Output(piece, reason, len(seq.prompt), max(seq.n_out, 0), self._take_logprobs(seq)))
