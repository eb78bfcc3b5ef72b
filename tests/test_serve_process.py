"""The engine in a process of its own (`gigafactory serve`'s default): the in-process engine's tokens, streamed or
not; a disconnect aborts across the pipe; `/metrics` joins both sides; the queue bound; a dead engine process
fails what was in flight and `/health`."""

import json
import os
import signal
import time

import httpx
import pytest
import torch

from gigafactory.model.generate import generate
from gigafactory.runs import load_for_inference
from gigafactory.serve.api import build_state, create_app
from gigafactory.serve.engine import EngineConfig
from serve_helpers import running, trained_run, wait_until


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    run = trained_run(tmp_path_factory)
    state = build_state(run, None, EngineConfig(max_batch=8, kv_cache_mb=2.0, max_queue=16), 5, process=True)
    assert state.engine.pid != os.getpid()
    with running(create_app(state)) as url:
        yield url, state, run


def complete(url: str, **extra) -> httpx.Response:
    body = {"model": "ROMEO", "prompt": "ROMEO:\nGood morrow", "max_tokens": 30, "temperature": 0, "ignore_eos": True}
    return httpx.post(f"{url}/v1/completions", json={**body, **extra}, timeout=30)


def test_same_tokens_as_the_model_streamed_or_not(server):
    url, state, run = server
    model, tok, _ = load_for_inference(run, quiet=True)
    with torch.no_grad():
        expected = tok.decode(list(generate(model, tok.encode("ROMEO:\nGood morrow").ids, 30, temperature=0)))
    assert complete(url).json()["choices"][0]["text"] == expected
    events = [line[6:] for line in complete(url, stream=True).text.splitlines() if line.startswith("data: {")]
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events) == expected


def test_disconnect_aborts_in_the_engine_process_and_metrics_join(server):
    url, state, _ = server
    assert httpx.get(f"{url}/v1/models/nobody").status_code == 404  # counted on the HTTP side
    body = {"model": "ROMEO", "prompt": "ROMEO:\n", "max_tokens": 120, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as resp:
        lines = resp.iter_lines()
        for _ in range(3):
            next(lines)
    aborted = 'gigafactory_serve_sequences_finished_total{reason="abort"} 1.0'
    wait_until(lambda: aborted in httpx.get(f"{url}/metrics").text)
    text = httpx.get(f"{url}/metrics").text
    assert 'gigafactory_serve_http_errors_total{status="404"}' in text
    assert "gigafactory_serve_generated_tokens_total" in text and "gigafactory_serve_kv_cache_usage_ratio" in text
    wait_until(lambda: httpx.get(f"{url}/health").json()["running"] == 0)


def test_queue_bound_is_kept_on_the_http_side(server):
    url, state, _ = server
    bound, state.engine.config.max_queue = state.engine.config.max_queue, 0
    try:
        resp = complete(url)
        assert resp.status_code == 429 and resp.json()["error"]["code"] == "queue_full"
    finally:
        state.engine.config.max_queue = bound
    assert complete(url).status_code == 200


def test_a_killed_engine_process_fails_streams_and_health(server):  # last: it ends the module's engine
    url, state, _ = server
    body = {"model": "ROMEO", "prompt": "ROMEO:\n", "max_tokens": 120, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as resp:
        lines = resp.iter_lines()
        next(lines)
        os.kill(state.engine.pid, signal.SIGKILL)
        rest, deadline = [], time.monotonic() + 10  # a stream left waiting would get keep-alives forever
        for line in lines:
            rest.append(line)
            if time.monotonic() > deadline:
                break
    assert any('"server_error"' in line for line in rest) and rest[-1] != "data: [DONE]"
    wait_until(lambda: httpx.get(f"{url}/health").status_code == 503)
    assert httpx.get(f"{url}/health").json()["error"]["code"] == "engine_down"
