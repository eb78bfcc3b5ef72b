"""The server as a demanding user tries it: 60+ bad requests, a body too large while /health is polled, API keys
with the official openai client, per-caller limits, keep-alive while queued, CORS, logprobs, logit_bias,
JSON mode, and usage with n > 1."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest

from gigafactory.serve.api import ServerOptions, build_state, create_app
from gigafactory.serve.engine import EngineConfig
from gigafactory.serve.limits import ApiKeys
from serve_helpers import running, trained_run, wait_until

KEY = "sk-test-0123456789"
CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    run = trained_run(tmp_path_factory)
    return build_state(run, None, EngineConfig(max_batch=8, kv_cache_mb=2.0, max_queue=32), health_timeout=5)


@pytest.fixture(scope="module")
def url(state):
    options = ServerOptions(api_keys=ApiKeys([KEY, "sk-second-key-abcdef"]), max_body_mb=1.0, keepalive_s=0.1)
    with running(create_app(state, options)) as base:
        yield base


def post(url: str, path: str, body=None, *, key: str | None = KEY, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if body is not None:  # json.dumps escapes lone surrogates as \udXXX, as a JavaScript client would send them
        kw["content"] = json.dumps(body).encode()
        headers["content-type"] = "application/json"
    return httpx.post(url + path, headers={**headers, **kw.pop("headers", {})}, timeout=30, **kw)


def chat(**extra) -> dict:
    return {"model": "ROMEO", "messages": HI, "max_tokens": 2, **extra}


def comp(**extra) -> dict:
    return {"model": "ROMEO", "prompt": "ROMEO:\n", "max_tokens": 2, **extra}


def raw(text: str) -> dict:
    return {"content": text.encode(), "headers": {"content-type": "application/json"}}


# (path, JSON body or raw bytes, expected status, expected error code or None)
BAD: list[tuple[str, object, int, str | None]] = [
    # strict types: no coercion
    (CHAT, chat(stream="yes"), 400, "invalid_value"),
    (CHAT, chat(max_tokens=True), 400, "invalid_value"),
    (CHAT, chat(max_tokens="5"), 400, "invalid_value"),
    (CHAT, chat(max_tokens=2.5), 400, "invalid_value"),
    (CHAT, chat(temperature="0.5"), 400, "invalid_value"),
    (CHAT, chat(n="2"), 400, "invalid_value"),
    (CHAT, chat(seed="1"), 400, "invalid_value"),
    (CHAT, chat(logprobs="true"), 400, "invalid_value"),
    (CHAT, chat(stream_options={"include_usage": "yes"}), 400, "invalid_value"),
    (CHAT, {"model": 5, "messages": HI}, 400, "invalid_value"),
    # invalid text: lone surrogates (the JSON parser refuses them)
    (CHAT, {"model": "ROMEO", "messages": [{"role": "user", "content": "\ud800"}]}, 400, None),
    (CHAT, {"model": "RO\udfffMEO", "messages": HI}, 400, None),
    (CHAT, chat(stop="\udc00"), 400, None),
    (CHAT, {"model": "ROMEO", "messages": [{"role": "user", "content": [{"type": "text", "text": "\ud83d"}]}]}, 400,
     None),  # fmt: skip
    # messages
    (CHAT, {"model": "ROMEO", "messages": [{"role": "user", "content": None}]}, 400, "invalid_value"),
    (CHAT, {"model": "ROMEO", "messages": [{"role": "user"}]}, 400, "invalid_value"),
    (CHAT, {"model": "ROMEO", "messages": [{"role": "assistant", "content": None}]}, 400, "invalid_value"),
    (CHAT, {"model": "ROMEO", "messages": [{"content": "hi"}]}, 400, "invalid_value"),
    (CHAT, {"model": "ROMEO", "messages": [{"role": "robot", "content": "hi"}]}, 400, "invalid_value"),
    (CHAT, {"model": "ROMEO", "messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]}, 400,
     "unsupported_parameter"),  # fmt: skip
    (CHAT, {"model": "ROMEO", "messages": [{"role": "user", "content": "hi", "name": "bob"}]}, 400,
     "unsupported_parameter"),  # fmt: skip
    (CHAT, {"model": "ROMEO", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     400, "unsupported_parameter"),  # fmt: skip
    (CHAT, {"model": "ROMEO", "messages": [{"role": "user", "content": [{"type": "text"}]}]}, 400, "invalid_value"),
    (CHAT, {"model": "ROMEO", "messages": [{"role": "user", "content": "hi", "extra": 1}]}, 400, "unknown_parameter"),
    (CHAT, {"model": "ROMEO", "messages": []}, 400, "invalid_value"),
    (CHAT, {"model": "ROMEO", "messages": "hi"}, 400, "invalid_value"),
    (CHAT, {"model": "ROMEO", "messages": [[]]}, 400, "invalid_value"),
    (CHAT, {"model": "ROMEO"}, 400, "invalid_value"),
    (CHAT, {"messages": HI}, 400, "invalid_value"),
    (CHAT, {"model": "", "messages": HI}, 400, "invalid_value"),
    (CHAT, {"model": "x" * 300, "messages": HI}, 400, "invalid_value"),
    (CHAT, {"model": "nobody", "messages": HI}, 404, "model_not_found"),
    # unsupported OpenAI features, refused by name
    (CHAT, chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "unsupported_parameter"),
    (CHAT, chat(tool_choice="auto"), 400, "unsupported_parameter"),
    (CHAT, chat(functions=[{"name": "f"}]), 400, "unsupported_parameter"),
    (CHAT, chat(response_format={"type": "json_schema", "json_schema": {}}), 400, "unsupported_parameter"),
    (CHAT, chat(response_format={"type": "xml"}), 400, "invalid_value"),
    (CHAT, chat(modalities=["audio"]), 400, "unsupported_parameter"),
    (CHAT, chat(audio={"voice": "x"}), 400, "unsupported_parameter"),
    (CHAT, chat(prediction={"type": "content", "content": "x"}), 400, "unsupported_parameter"),
    (CHAT, chat(store=True), 400, "unsupported_parameter"),
    (CHAT, chat(reasoning_effort="high"), 400, "unsupported_parameter"),
    (CHAT, chat(parallel_tool_calls=False), 400, "unsupported_parameter"),
    (CHAT, chat(frobnicate=1), 400, "unknown_parameter"),
    # ranges
    (CHAT, chat(max_tokens=0), 400, "invalid_value"),
    (CHAT, chat(max_tokens=10**12), 400, "invalid_value"),
    (CHAT, chat(max_completion_tokens=-1), 400, "invalid_value"),
    (CHAT, chat(temperature=2.5), 400, "invalid_value"),
    (CHAT, chat(temperature=-0.1), 400, "invalid_value"),
    (CHAT, chat(top_p=0), 400, "invalid_value"),
    (CHAT, chat(min_p=1.5), 400, "invalid_value"),
    (CHAT, chat(top_k=-1), 400, "invalid_value"),
    (CHAT, chat(n=0), 400, "invalid_value"),
    (CHAT, chat(n=1000), 400, "invalid_value"),
    (CHAT, chat(seed=10**30), 400, "invalid_value"),
    (CHAT, chat(stop=["a"] * 9), 400, "invalid_value"),
    (CHAT, chat(presence_penalty=3), 400, "invalid_value"),
    (CHAT, chat(frequency_penalty=-2.5), 400, "invalid_value"),
    (CHAT, chat(logit_bias={"5": 101}), 400, "invalid_value"),
    (CHAT, chat(logit_bias={"abc": 1}), 400, "invalid_value"),
    (CHAT, chat(logit_bias={"99999999": 1}), 400, "invalid_value"),
    (CHAT, chat(logit_bias={"5": "1"}), 400, "invalid_value"),
    (CHAT, chat(logprobs=True, top_logprobs=21), 400, "invalid_value"),
    (CHAT, chat(top_logprobs=2), 400, "invalid_value"),
    (CHAT, chat(greeting=-1), 400, "invalid_value"),
    (CHAT, {"model": "ROMEO", "messages": [{"role": "user", "content": "word " * 500}]}, 400,
     "context_length_exceeded"),  # fmt: skip
    # completions
    (COMP, comp(suffix="x"), 400, "unsupported_parameter"),
    (COMP, comp(best_of=3), 400, "unsupported_parameter"),
    (COMP, comp(prompt=[1, 2, 3]), 400, "unsupported_parameter"),
    (COMP, comp(prompt=""), 400, "invalid_value"),
    (COMP, comp(prompt=[]), 400, "invalid_value"),
    (COMP, comp(prompt=["a"] * 9), 400, "invalid_value"),
    (COMP, comp(prompt=["a", "b"], n=5), 400, "invalid_value"),
    (COMP, comp(prompt="x " * 300), 400, "context_length_exceeded"),
    (COMP, comp(logprobs=6), 400, "invalid_value"),
    (COMP, comp(logprobs=True), 400, "invalid_value"),
    (COMP, comp(echo="yes"), 400, "invalid_value"),
    (COMP, comp(prompt="\ud800"), 400, None),
    # transport
    (CHAT, raw("{not json"), 400, None),
    (CHAT, {"content": b"\xff\xfe{}", "headers": {"content-type": "application/json"}}, 400, None),
    (CHAT, raw('{"model": "ROMEO", "messages": [{"role": "user", "content": "\\ud800"}]}'), 400, None),
    (CHAT, raw(""), 400, None),
    (CHAT, raw("[1, 2, 3]"), 400, None),
    (CHAT, raw("null"), 400, None),
    (CHAT, {"content": b"x" * (2 * 2**20), "headers": {"content-type": "application/json"}}, 413, "request_too_large"),
]


def send(url: str, path: str, body) -> httpx.Response:
    if isinstance(body, dict) and "content" in body and "headers" in body and set(body) == {"content", "headers"}:
        return post(url, path, **body)
    return post(url, path, body)


def test_sixty_bad_requests_get_openai_errors_and_the_server_stays_healthy(url):
    assert len(BAD) >= 60
    wrong = []
    for path, body, status, code in BAD:
        resp = send(url, path, body)
        try:
            err = resp.json()["error"]
            ok = (
                resp.status_code == status
                and set(err) == {"message", "type", "param", "code"}
                and bool(err["message"])
                and (code is None or err["code"] == code)
            )
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            wrong.append((path, str(body)[:80], resp.status_code, resp.text[:200]))
    assert not wrong, "\n".join(map(str, wrong))
    # The unsupported field is named.
    err = post(url, CHAT, chat(tools=[{"type": "function"}])).json()["error"]
    assert err["param"] == "tools" and "tools" in err["message"]
    # Other routes
    for resp, status in [
        (httpx.get(f"{url}/v1/models/nobody", headers={"Authorization": f"Bearer {KEY}"}), 404),
        (httpx.get(f"{url}/v1/nothing"), 404),
        (httpx.get(url + CHAT, headers={"Authorization": f"Bearer {KEY}"}), 405),
    ]:
        assert resp.status_code == status and set(resp.json()["error"]) == {"message", "type", "param", "code"}
    # Still healthy, and still serving.
    assert httpx.get(f"{url}/health").status_code == 200
    assert post(url, CHAT, chat()).status_code == 200


def test_health_answers_while_a_five_megabyte_prompt_is_refused(url):
    """The timing figure is in benchmarks/serve_abuse.py; here: the refusal is a 413 and /health keeps answering."""
    body = json.dumps(chat(messages=[{"role": "user", "content": "x" * (5 * 2**20)}])).encode()
    result: dict[str, httpx.Response] = {}

    def big() -> None:
        result["resp"] = post(url, CHAT, content=body, headers={"content-type": "application/json"})

    thread = threading.Thread(target=big)
    thread.start()
    answers = []
    while thread.is_alive() or not answers:
        answers.append(httpx.get(f"{url}/health", timeout=5).status_code)
    thread.join()
    assert result["resp"].status_code == 413 and result["resp"].json()["error"]["code"] == "request_too_large"
    assert set(answers) == {200}


def test_api_keys_and_the_official_client(url):
    for key in (None, "sk-wrong-key-000000", KEY[:-1]):
        resp = post(url, CHAT, chat(), key=key)
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"
        assert set(resp.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(f"{url}/v1/models").status_code == 401
    assert httpx.get(f"{url}/health").status_code == 200  # open: load balancers probe it
    assert httpx.get(f"{url}/").status_code == 200  # the page asks for the key itself
    denied = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-wrong-key-000000", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        denied.models.list()
    for key in (KEY, "sk-second-key-abcdef"):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=30)
        assert "ROMEO" in [m.id for m in client.models.list()]
        reply = client.chat.completions.create(model="ROMEO", messages=HI, max_tokens=3, seed=1)
        assert reply.choices[0].finish_reason in ("stop", "length")
        stream = client.chat.completions.create(model="ROMEO", messages=HI, max_tokens=3, seed=1, stream=True)
        streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert streamed == reply.choices[0].message.content


def test_api_keys_from_environment_and_file(tmp_path, monkeypatch):
    path = tmp_path / "keys.txt"
    path.write_text("# ops keys\nsk-from-file-123456\n\n")
    monkeypatch.setenv("GIGAFACTORY_API_KEYS", "sk-from-env-1234567, sk-from-env-7654321")
    keys = ApiKeys.gather(["sk-from-cli-1234567"], path)
    assert len(keys) == 4
    for key in ("sk-from-cli-1234567", "sk-from-file-123456", "sk-from-env-7654321"):
        assert keys.check(f"Bearer {key}") == key
    assert keys.check("Bearer sk-from-file-12345") is None and keys.check("sk-from-file-123456") is None
    from gigafactory.errors import UserError

    with pytest.raises(UserError, match="at least 8"):
        ApiKeys.gather(["short"], env=False)


def test_streams_send_headers_and_keepalives_while_queued(url, state):
    """With the engine held, a stream still gets its 200, a first chunk and keep-alive comments at once."""
    engine = state.engine
    release = threading.Event()
    real_step = engine.step

    def held() -> None:
        release.wait(10)
        real_step()

    engine.step = held  # type: ignore[method-assign]
    try:
        started = time.monotonic()
        headers = {"Authorization": f"Bearer {KEY}"}
        with httpx.stream("POST", url + CHAT, json=chat(stream=True), headers=headers, timeout=5) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            first = next(lines)
            assert first.startswith("data: ") and json.loads(first[6:])["choices"][0]["delta"]["role"] == "assistant"
            seen = [next(lines) for _ in range(6)]
            assert ": keep-alive" in seen and time.monotonic() - started < 5
            release.set()
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
    finally:
        release.set()
        engine.step = real_step  # type: ignore[method-assign]


def test_per_caller_rate_and_concurrency_limits(state):
    options = ServerOptions(rate_per_caller=3, concurrency_per_caller=0)
    with running(create_app(state, options)) as base:
        codes = [post(base, CHAT, chat(), key=None) for _ in range(4)]
        assert [r.status_code for r in codes[:3]] == [200] * 3
        assert codes[3].status_code == 429 and codes[3].json()["error"]["code"] == "rate_limit_exceeded"
        assert int(codes[3].headers["retry-after"]) >= 1
    # With keys, each key has its own bucket.
    keyed = ServerOptions(api_keys=ApiKeys([KEY, "sk-second-key-abcdef"]), rate_per_caller=2, concurrency_per_caller=0)
    with running(create_app(state, keyed)) as base:
        assert [post(base, CHAT, chat()).status_code for _ in range(3)] == [200, 200, 429]
        assert post(base, CHAT, chat(), key="sk-second-key-abcdef").status_code == 200
    from gigafactory.serve.limits import CallerLimits

    limits = CallerLimits(concurrency=2)
    assert limits.acquire("a") is None and limits.acquire("a") is None
    assert limits.acquire("a") == 1.0 and limits.acquire("b") is None  # per caller
    limits.release("a")
    assert limits.acquire("a") is None


def test_cors_and_docs_are_off_unless_asked(url, state):
    pre = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST"}
    assert "access-control-allow-origin" not in httpx.options(url + CHAT, headers=pre).headers
    assert httpx.get(f"{url}/docs").status_code == 404 and httpx.get(f"{url}/openapi.json").status_code == 404
    options = ServerOptions(allowed_origins=["http://app.example"], docs=True)
    with running(create_app(state, options)) as base:
        resp = httpx.options(base + CHAT, headers={**pre, "Access-Control-Request-Headers": "authorization"})
        assert resp.headers["access-control-allow-origin"] == "http://app.example"
        other = httpx.options(base + CHAT, headers={**pre, "Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in other.headers
        assert httpx.get(f"{base}/docs").status_code == 200


def test_logprobs_match_the_chosen_tokens(url, state):
    reply = post(url, CHAT, chat(max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)).json()
    content = reply["choices"][0]["logprobs"]["content"]
    assert len(content) == reply["usage"]["completion_tokens"] > 0
    for entry in content:  # greedy: the chosen token is the most likely one
        assert entry["logprob"] <= 0 and len(entry["top_logprobs"]) == 3
        assert entry["top_logprobs"][0]["token"] == entry["token"]
        assert entry["top_logprobs"][0]["logprob"] == pytest.approx(entry["logprob"])
    text = bytes(b for e in content for b in e["bytes"]).decode("utf-8", "replace")
    assert text.startswith(reply["choices"][0]["message"]["content"].rstrip("\n"))
    done = post(url, COMP, comp(max_tokens=5, temperature=0, logprobs=2, ignore_eos=True)).json()
    lp = done["choices"][0]["logprobs"]
    assert "".join(lp["tokens"]) == done["choices"][0]["text"] and len(lp["token_logprobs"]) == 5
    assert all(len(top) <= 2 for top in lp["top_logprobs"]) and lp["text_offset"][0] == 0


def test_logit_bias_forces_a_token(url, state):
    tok = state.tok
    target = tok.encode(" love").ids[0]
    done = post(url, COMP, comp(max_tokens=4, temperature=0.9, seed=3, ignore_eos=True,
                                logit_bias={str(target): 100})).json()  # fmt: skip
    assert done["choices"][0]["text"] == tok.decode([target] * 4)


def test_json_mode_output_parses_as_an_object(url):
    for seed, max_tokens in [(1, 8), (2, 20), (3, 40), (4, 60)]:
        body = chat(max_tokens=max_tokens, temperature=1.0, seed=seed, response_format={"type": "json_object"})
        reply = post(url, CHAT, body).json()
        text = reply["choices"][0]["message"]["content"]
        assert isinstance(json.loads(text), dict), text
        assert reply["usage"]["completion_tokens"] <= max_tokens


def test_usage_counts_each_prompt_once(url):
    one = post(url, COMP, comp(n=1)).json()["usage"]["prompt_tokens"]
    assert post(url, COMP, comp(n=3)).json()["usage"]["prompt_tokens"] == one
    assert post(url, COMP, comp(prompt=["ROMEO:\n", "ROMEO:\n"], n=2)).json()["usage"]["prompt_tokens"] == 2 * one
    chat_one = post(url, CHAT, chat(n=1)).json()["usage"]["prompt_tokens"]
    assert post(url, CHAT, chat(n=3)).json()["usage"]["prompt_tokens"] == chat_one


def test_queue_bound_counts_requests_not_sequences(state):
    engine = state.engine
    bound = engine.config.max_queue
    real_step = engine.step
    release = threading.Event()

    def held() -> None:
        release.wait(10)
        real_step()

    engine.step = held  # type: ignore[method-assign]
    engine.config.max_queue = 2
    try:
        from gigafactory.serve.engine import QueueFull
        from gigafactory.serve.sampling import SamplingParams

        params = SamplingParams(max_tokens=1)
        ids = [engine.submit([([5, 6], params, lambda o: None)] * 4)]  # one request of 4 sequences
        ids.append(engine.submit([([5, 6], params, lambda o: None)] * 4))
        assert engine.queued_requests() == 2
        with pytest.raises(QueueFull):
            engine.submit([([5, 6], params, lambda o: None)])
        for group in ids:
            for seq_id in group:
                engine.abort(seq_id)
    finally:
        engine.config.max_queue = bound
        release.set()
        engine.step = real_step  # type: ignore[method-assign]
    wait_until(lambda: engine.queued_requests() == 0)


def test_chat_url_sends_the_key_from_the_environment(url, monkeypatch):
    from gigafactory.errors import UserError
    from gigafactory.serve.client import RemoteChat

    monkeypatch.delenv("GIGAFACTORY_API_KEY", raising=False)
    with pytest.raises(UserError, match="needs an API key"):
        RemoteChat(url, "romeo")
    monkeypatch.setenv("GIGAFACTORY_API_KEY", KEY)
    chat_ = RemoteChat(url, "romeo")
    assert chat_.persona == "ROMEO" and "".join(chat_.reply("hi", max_tokens=3, seed=1)) is not None


def test_public_bind_without_a_key_warns(cli, cli_here, tmp_path):
    missing = str(tmp_path / "no-run")
    warned = cli("serve", missing, "--host", "0.0.0.0")
    assert warned.returncode != 0 and "without an API key" in warned.stderr and "Traceback" not in warned.stderr
    code, _, err = cli_here("serve", missing, "--host", "0.0.0.0", "--api-key", "short")
    assert code != 0 and "at least 8" in err and "Traceback" not in err
