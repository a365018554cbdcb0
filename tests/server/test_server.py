"""`gllm serve` as clients meet it: a real server process on 127.0.0.1, httpx and the openai client."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gllm_cli.serve import spawn_server as start_server

API_KEY = "test-key"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server_proc():
    proc, url = start_server("--api-key", API_KEY)
    yield proc, url
    if proc.poll() is None:  # the last test stops it itself
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0


@pytest.fixture(scope="module")
def server(server_proc):
    return server_proc[1]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def post(url: str, path: str, body, key: str | None = API_KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = body if isinstance(body, str) else json.dumps(body)
    return httpx.post(f"{url}{path}", content=content, headers={**headers, "content-type": "application/json"},
                      timeout=120)


def metric(url: str, name: str, **labels: str) -> float:
    """One sample of the server's /metrics (labels beyond model_name must match those given)."""
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise KeyError(name)


def test_models_health_version(server, model):
    assert httpx.get(f"{server}/health").status_code == 200
    assert "version" in httpx.get(f"{server}/version").json()
    assert model.startswith("SmolLM2")


def test_chat_answers_and_usage_is_exact(client, model, server):
    r = client.chat.completions.create(model=model, messages=CHAT, max_tokens=16, temperature=0)
    assert "Paris" in r.choices[0].message.content
    ids = post(server, "/tokenize", {"messages": CHAT}).json()["tokens"]
    assert r.usage.prompt_tokens == len(ids) and r.usage.total_tokens == len(ids) + r.usage.completion_tokens


def test_stream_equals_non_stream_at_temperature_zero(client, model):
    kw = dict(model=model, messages=CHAT, max_tokens=12, temperature=0)
    full = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    comp = dict(model=model, prompt="The sky is", max_tokens=8, temperature=0)
    whole = client.completions.create(**comp).choices[0].text
    assert "".join(c.choices[0].text for c in client.completions.create(stream=True, **comp) if c.choices) == whole


def test_completions_prompt_forms_echo_and_n(client, model, server):
    ids = post(server, "/tokenize", {"prompt": "Hello there"}).json()["tokens"]
    r = client.completions.create(model=model, prompt=[ids, "Hello there"], max_tokens=4, temperature=0, echo=True)
    assert len(r.choices) == 2 and r.choices[0].text == r.choices[1].text
    assert r.choices[1].text.startswith("Hello there")
    many = client.completions.create(model=model, prompt="Once upon a time", max_tokens=6, n=3, temperature=1.0,
                                     seed=1)
    assert sorted(c.index for c in many.choices) == [0, 1, 2] and many.usage.completion_tokens == 18
    assert post(server, "/v1/completions", {"prompt": "a", "suffix": "b"}).status_code == 400


def test_seed_stop_and_logprobs(client, model):
    kw = dict(model=model, messages=CHAT, max_tokens=10, temperature=1.0, seed=42)
    assert client.chat.completions.create(**kw).choices[0].message.content == \
        client.chat.completions.create(**kw).choices[0].message.content
    full = client.completions.create(model=model, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0).choices[0]
    cut = client.completions.create(model=model, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, stop=["7"])
    assert "7" in full.text and cut.choices[0].text == full.text[: full.text.index("7")]
    assert cut.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(model=model, messages=CHAT, max_tokens=5, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens and all(len(c.top_logprobs) == 3 for c in content)
    c = client.completions.create(model=model, prompt="Hi", max_tokens=4, temperature=0, logprobs=2).choices[0]
    assert len(c.logprobs.tokens) == 4 and all(len(t) >= 2 for t in c.logprobs.top_logprobs)


def test_cache_salt_keeps_prefix_caches_apart(server):
    prompt = " ".join(["a long shared system prompt"] * 20)  # several full KV blocks

    def cached(salt: str) -> int:
        body = {"prompt": prompt, "max_tokens": 1, "cache_salt": salt}
        return post(server, "/v1/completions", body).json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    assert cached("tenant-a") == 0
    assert cached("tenant-a") > 0  # the same salt finds the blocks
    assert cached("tenant-b") == 0  # another salt does not


@pytest.mark.parametrize("body,status,param", [
    ('{"messages": [', 400, None),
    ({"messages": "hi"}, 400, "messages"),
    ({"messages": CHAT, "max_tokens": "ten"}, 400, "max_tokens"),
    ({"messages": CHAT, "temperature": -1}, 400, "temperature"),
    ({"messages": CHAT, "top_p": 2}, 400, "top_p"),
    ({"messages": CHAT, "model": "no-such-model"}, 404, "model"),
    ({"messages": CHAT, "cache_salt": ""}, 400, "cache_salt"),
])
def test_errors_use_openai_shape(server, body, status, param):
    r = post(server, "/v1/chat/completions", body)
    assert r.status_code == status
    err = r.json()["error"]
    assert err["message"] and err["type"] and err["param"] == param


def test_context_overflow_names_both_numbers(server):
    r = post(server, "/v1/completions", {"prompt": list(range(10, 9000)), "max_tokens": 4})
    assert r.status_code == 400 and "8990" in r.json()["error"]["message"] and "8192" in r.json()["error"]["message"]


def test_api_key_is_required(server):
    assert post(server, "/v1/chat/completions", {"messages": CHAT}, key=None).status_code == 401
    assert post(server, "/v1/chat/completions", {"messages": CHAT}, key="wrong").status_code == 401


def test_disconnect_mid_stream_returns_every_block(server):
    total = metric(server, "gllm:kv_cache_total_blocks")
    body = {"messages": CHAT, "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i == 6:
                break  # leave mid-stream
    deadline = time.monotonic() + 30
    while metric(server, "gllm:kv_cache_free_blocks") != total and time.monotonic() < deadline:
        time.sleep(0.2)
    assert metric(server, "gllm:kv_cache_free_blocks") == total
    assert metric(server, "gllm:num_requests_running") == 0


def test_client_leaving_a_non_streaming_request_aborts_it(server):
    total = metric(server, "gllm:kv_cache_total_blocks")
    aborted = metric(server, "gllm:request_success_total", finished_reason="abort")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server}/v1/completions", json={"prompt": "Tell me a story", "max_tokens": 2000,
                                                     "ignore_eos": True},
                   headers={"Authorization": f"Bearer {API_KEY}"}, timeout=1.5)
    deadline = time.monotonic() + 30
    while metric(server, "gllm:kv_cache_free_blocks") != total and time.monotonic() < deadline:
        time.sleep(0.2)
    assert metric(server, "gllm:kv_cache_free_blocks") == total
    assert metric(server, "gllm:request_success_total", finished_reason="abort") == aborted + 1


def test_32_concurrent_streams_finish_with_exact_usage(server, model):
    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[int, int, int, int]:
        messages = [{"role": "user", "content": f"Count to {i}."}]
        stream = await client.chat.completions.create(
            model=model, messages=messages, max_tokens=8, temperature=0, logprobs=True, stream=True,
            stream_options={"include_usage": True})
        tokens, usage = 0, None
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            tokens += sum(len(c.logprobs.content) for c in chunk.choices if c.logprobs is not None)
        prompt = (await client.post("/../tokenize", body={"messages": messages}, cast_to=httpx.Response)).json()
        return usage.completion_tokens, tokens, usage.prompt_tokens, prompt["count"]

    async def main():
        async with openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=API_KEY) as client:
            return await asyncio.gather(*(one(client, i) for i in range(32)))

    before = metric(server, "gllm:e2e_request_latency_seconds_count")
    results = asyncio.run(main())
    assert len(results) == 32
    for completion, streamed, prompt, tokenized in results:
        assert 0 < completion == streamed <= 8 and prompt == tokenized
    assert metric(server, "gllm:e2e_request_latency_seconds_count") == before + 32
    assert metric(server, "gllm:time_to_first_token_seconds_count") >= 32
    assert metric(server, "gllm:generation_tokens_total") >= sum(r[0] for r in results)


def test_full_waiting_queue_answers_429():
    proc, url = start_server("--max-waiting-requests", "0")
    try:
        r = post(url, "/v1/completions", {"prompt": "hi", "max_tokens": 2}, key=None)
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C stops it as cleanly as SIGTERM
        assert proc.wait(timeout=60) == 0


def test_sigterm_lets_the_stream_in_flight_finish(server_proc):  # last: it stops the module's server
    proc, url = server_proc
    body = {"prompt": "Once upon a time", "max_tokens": 16, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"},
                      timeout=60) as r:
        lines = r.iter_lines()
        events = [next(line for line in lines if line.startswith("data: "))]
        proc.send_signal(signal.SIGTERM)
        events += [line for line in lines if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"
    assert proc.wait(timeout=60) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health")
