"""The router in front of replicas: the routing policy and metrics sums on their own, then two real replicas
as actors on a local Ray instance: persona/prefix affinity, and a replica killed under load loses no request
that had not started streaming while its in-flight streams end with a clear error."""

import asyncio

import httpx
import pytest

from gigafactory.serve.router import Replica, Router, RoutingPolicy, aggregate_metrics, create_router_app
from serve_helpers import running, trained_run


def test_policy_keeps_a_key_on_one_replica_until_it_is_overloaded():
    replicas = [Replica(f"http://r{i}", f"r{i}") for i in range(3)]
    policy = RoutingPolicy(prefix_chars=32, slack=2)
    keys = [policy.key({"model": f"persona{i}", "messages": [{"role": "user", "content": "hi"}]}) for i in range(30)]
    first = [policy.choose(replicas, k) for k in keys]
    assert len({r.name for r in first}) == 3  # keys spread over the replicas
    # The same conversation, one turn later (its start unchanged), goes where it went before.
    body = {"model": "Persona3", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]}
    assert policy.choose(replicas, policy.key(body)) is first[3]
    # Bounded load: the preferred replica is skipped once it is `slack` requests busier than the least busy.
    favourite = first[0]
    favourite.inflight = 3
    assert policy.choose(replicas, keys[0]) is not favourite
    favourite.inflight = 2
    assert policy.choose(replicas, keys[0]) is favourite
    # A replica that is down (or already tried) is skipped; the others keep their keys.
    favourite.up = False
    moved = [policy.choose(replicas, k) for k in keys]
    assert all(m is not favourite for m in moved)
    assert all(m is f for m, f in zip(moved, first, strict=True) if f is not favourite)


def test_metrics_are_summed_and_the_hit_rate_recomputed():
    def text(hits: int, queries: int, tokens: int) -> str:
        return (
            "# TYPE gigafactory_serve_generated_tokens counter\n"
            f"gigafactory_serve_generated_tokens_total {tokens}\n"
            "gigafactory_serve_generated_tokens_created 1.7e9\n"
            "# TYPE gigafactory_serve_prefix_cache_hit_tokens gauge\n"
            f"gigafactory_serve_prefix_cache_hit_tokens {hits}\n"
            "# TYPE gigafactory_serve_prefix_cache_queried_tokens gauge\n"
            f"gigafactory_serve_prefix_cache_queried_tokens {queries}\n"
            "# TYPE gigafactory_serve_prefix_cache_hit_rate gauge\n"
            f"gigafactory_serve_prefix_cache_hit_rate {hits / queries}\n"
            "# TYPE gigafactory_serve_sequences_finished counter\n"
            'gigafactory_serve_sequences_finished_total{reason="stop"} 2\n'
        )

    out = aggregate_metrics([text(10, 100, 7), text(90, 100, 5)])
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in out.splitlines() if line[0] != "#"}
    assert values["gigafactory_serve_generated_tokens_total"] == 12
    assert values['gigafactory_serve_sequences_finished_total{reason="stop"}'] == 4
    assert values["gigafactory_serve_prefix_cache_hit_rate"] == pytest.approx(0.5)  # 100/200, not 0.1 + 0.9
    assert not any("_created" in k for k in values)


# -- two replicas on a local Ray instance ------------------------------------------------------------------


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    pytest.importorskip("ray")
    from gigafactory.serve.replicas import RayReplicas

    engine = {"max_batch": 8, "kv_cache_mb": 1.0, "max_queue": 64, "block_size": 4}  # short prompts fill blocks
    replicas = RayReplicas(trained_run(tmp_path_factory), 2, {"engine": engine}, num_cpus=0.5)
    urls = replicas.start(timeout=120)
    yield replicas, urls
    replicas.stop()


@pytest.fixture
def front(fleet):
    """A fresh router over the fleet for each test (replica state, metrics)."""
    _, urls = fleet
    router = Router([Replica(u, f"r{i}") for i, u in enumerate(urls)], RoutingPolicy(prefix_chars=64, slack=8),
                    health_interval=0.2)  # fmt: skip
    with running(create_router_app(router)) as url:
        yield url, router


def _chat(persona: str, opening: str, **extra) -> dict:
    return {"model": persona, "messages": [{"role": "user", "content": opening}], "temperature": 0, **extra}


def _completion(persona: str, prompt: str) -> dict:
    return {"model": persona, "prompt": prompt, "temperature": 0, "max_tokens": 40, "ignore_eos": True}


def test_a_conversation_stays_on_its_replica_and_the_metrics_aggregate(front):
    url, router = front
    personas = [p["id"] for p in httpx.get(f"{url}/v1/models").json()["data"]][:6]
    assert len(personas) >= 2
    placed: dict[str, set[str]] = {}
    with httpx.Client(timeout=60) as client:
        for _ in range(2):  # the same openings twice: the second time every prefix is a cache hit
            for p in personas:
                resp = client.post(f"{url}/v1/chat/completions", json=_chat(p, "Good morrow", max_tokens=2))
                assert resp.status_code == 200, resp.text
                placed.setdefault(p, set()).add(resp.headers["x-gigafactory-replica"])
        metrics = client.get(f"{url}/metrics").text
    assert all(len(names) == 1 for names in placed.values()), placed  # affinity
    assert len(set.union(*placed.values())) == 2  # and both replicas got work
    values = {ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1]) for ln in metrics.splitlines() if ln[0] != "#"}
    finished = sum(v for k, v in values.items() if k.startswith("gigafactory_serve_sequences_finished_total"))
    assert finished >= 2 * len(personas)  # summed over both replicas (the module's earlier requests add more)
    assert values["gigafactory_serve_prefix_cache_hit_rate"] > 0.2
    routed = [v for k, v in values.items() if k.startswith("gigafactory_router_requests_total")]
    assert sum(routed) == 2 * len(personas)


def test_a_killed_replica_loses_no_unstarted_request(front, fleet):
    """Load on both replicas, one killed mid-load: every request that had not started streaming completes on
    the survivor; streams that had started end with a `replica_lost` error event, nothing hangs."""
    url, router = front
    replicas, _ = fleet
    personas = [p["id"] for p in httpx.get(f"{url}/v1/models").json()["data"]]
    victim = 1
    results: list[tuple[str, str, str]] = []  # (kind, outcome, replica)
    victim_streaming = asyncio.Event()

    async def stream_one(client: httpx.AsyncClient, body: dict) -> None:
        text, outcome = "", "incomplete"
        async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
            replica = resp.headers.get("x-gigafactory-replica", "?")
            async for line in resp.aiter_lines():
                if line.startswith("data: {"):
                    event = httpx.Response(200, content=line[6:]).json()
                    if "error" in event:
                        outcome = "error:" + event["error"]["code"]
                    else:
                        text += event["choices"][0]["text"]
                        if replica == f"r{victim}" and text:
                            victim_streaming.set()
                        if event["choices"][0].get("finish_reason"):
                            outcome = "finished"
                elif line == "data: [DONE]":
                    break
        results.append(("stream", outcome if outcome != "finished" or text else "empty", replica))

    async def unary_one(client: httpx.AsyncClient, body: dict) -> None:
        resp = await client.post(f"{url}/v1/completions", json=body)
        ok = resp.status_code == 200 and resp.json()["choices"][0]["finish_reason"] == "length"
        results.append(
            (
                "unary",
                "finished" if ok else f"failed:{resp.status_code}",
                resp.headers.get("x-gigafactory-replica", "?"),
            )
        )

    async def load() -> None:
        async with httpx.AsyncClient(timeout=120) as client:
            bodies = [_completion(personas[i % len(personas)], f"Line {i}") for i in range(16)]
            tasks = [
                asyncio.create_task(
                    (stream_one if i % 2 else unary_one)(client, b if i % 2 == 0 else {**b, "stream": True})
                )
                for i, b in enumerate(bodies)
            ]
            # Kill once the victim is busy: some of its streams have sent text, other requests are queued there.
            await asyncio.wait_for(victim_streaming.wait(), 60)
            await asyncio.to_thread(replicas.kill, victim)
            await asyncio.wait_for(asyncio.gather(*tasks), 120)

    asyncio.run(load())
    assert len(results) == 16
    outcomes = [o for _, o, _ in results]
    # Nothing vanished: every request finished, or was a stream that had started and ended with the clear error.
    assert set(outcomes) <= {"finished", "error:replica_lost"}, results
    assert "error:replica_lost" in outcomes  # the streams that had started on the victim say what happened
    unary = [r for r in results if r[0] == "unary"]
    assert all(o == "finished" for _, o, _ in unary)  # unstarted (non-streamed) work moved to the survivor
    moved = sum(v for k, v in _samples(router).items() if k.startswith("retries"))
    assert moved >= 1  # the kill really hit requests in flight on the victim
    assert not router.replicas[victim].up


def _samples(router: Router) -> dict[str, float]:
    out = {}
    for fam in router.metrics.registry.collect():
        for s in fam.samples:
            if not s.name.endswith("_created"):
                out[s.name.removeprefix("gigafactory_router_") + str(sorted(s.labels.items()))] = s.value
    return out
