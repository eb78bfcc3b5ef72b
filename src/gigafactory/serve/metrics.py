"""Prometheus metrics for the server. Each server gets its own registry, so several can live in one process
(tests) without clashing over metric names."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

if TYPE_CHECKING:
    from gigafactory.serve.engine import Engine

# Seconds; CPU-sized at the low end, with room for a loaded server's queueing at the high end.
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_PREFIX = "gigafactory_serve_"


class ServeMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.ttft = Histogram(
            _PREFIX + "time_to_first_token_seconds", "Arrival to first token", buckets=_LATENCY, registry=r
        )
        self.itl = Histogram(
            _PREFIX + "inter_token_latency_seconds", "Time between a sequence's tokens", buckets=_LATENCY, registry=r
        )
        self.e2e = Histogram(
            _PREFIX + "e2e_request_latency_seconds", "Arrival to last token", buckets=_LATENCY, registry=r
        )
        self.requests = Counter(_PREFIX + "sequences_finished", "Finished sequences by reason", ["reason"], registry=r)
        self.generated_tokens = Counter(_PREFIX + "generated_tokens", "Tokens sampled", registry=r)
        self.preemptions = Counter(_PREFIX + "preemptions", "Sequences evicted from the KV cache", registry=r)
        self.waiting = Gauge(_PREFIX + "queue_length", "Requests waiting to start", registry=r)
        self.running = Gauge(_PREFIX + "running_sequences", "Sequences in the running batch", registry=r)
        self.kv_usage = Gauge(_PREFIX + "kv_cache_usage_ratio", "Share of KV blocks held by sequences", registry=r)
        self.prefix_queries = Gauge(_PREFIX + "prefix_cache_queried_tokens", "Prompt tokens looked up", registry=r)
        self.prefix_hits = Gauge(_PREFIX + "prefix_cache_hit_tokens", "Prompt tokens found cached", registry=r)
        self.prefix_hit_rate = Gauge(_PREFIX + "prefix_cache_hit_rate", "Hit tokens / queried tokens", registry=r)
        # The HTTP side's own, apart: with the engine in another process (`engine_process`), each side
        # exposes its registry and `/metrics` joins the two.
        self.http_registry = CollectorRegistry()
        self.http_errors = Counter(
            _PREFIX + "http_errors", "Error responses by status", ["status"], registry=self.http_registry
        )

    def finished(self, reason: str, seconds: float) -> None:
        self.requests.labels(reason).inc()
        if reason in ("stop", "length"):
            self.e2e.observe(seconds)

    def observe_engine(self, engine: Engine) -> None:
        stats = engine.stats()
        self.waiting.set(stats["waiting"])
        self.running.set(stats["running"])
        pool = engine.pool
        self.kv_usage.set(pool.usage())
        self.prefix_queries.set(pool.prefix_queries)
        self.prefix_hits.set(pool.prefix_hits)
        self.prefix_hit_rate.set(pool.prefix_hits / pool.prefix_queries if pool.prefix_queries else 0.0)
