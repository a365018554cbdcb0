"""Request validation and response shapes (pure functions), then the app in process on a tiny model:
error statuses, engine failures, backpressure, and a fuzz that no request body ever gets a 500."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from gllm_engine.entrypoints.async_llm import AsyncLLM
from gllm_engine.executor.comm import RankDiedError
from gllm_engine.outputs import CompletionOutput, Logprob
from gllm_engine.server import protocol as P
from gllm_engine.server.app import OpenAIServer
from tests.server.conftest import StepGate

CHAT = [{"role": "user", "content": "Hi"}]


# ---- protocol, no engine ---------------------------------------------------------------------------
@pytest.mark.parametrize("raw,fragment", [
    (b'{"a": ', "not valid JSON"), (b'[1, 2]', "JSON object"), (b'{"temperature": NaN}', "NaN"),
    (b'{"top_p": -Infinity}', "-Infinity"), (b'\xff\xfe', "not valid JSON"),
])
def test_parse_body_rejects_what_is_not_a_json_object(raw, fragment):
    with pytest.raises(P.APIError) as e:
        P.parse_body(raw)
    assert e.value.status == 400 and fragment in e.value.message


@pytest.mark.parametrize("body,param,fragment", [
    ({"max_tokens": "ten"}, "max_tokens", "integer"),
    ({"max_tokens": True}, "max_tokens", "integer"),
    ({"max_tokens": 0}, "max_tokens", ">= 1"),
    ({"max_completion_tokens": 0, "max_tokens": 5}, "max_completion_tokens", ">= 1"),
    ({"temperature": -1}, "temperature", ">= 0"),
    ({"temperature": 1e999}, "temperature", "finite"),
    ({"top_p": 2}, "top_p", "(0, 1]"),
    ({"n": 1000}, "n", "at most 128"),
    ({"n": 0}, "n", ">= 1"),
    ({"seed": 2**64}, "seed", "must be in"),
    ({"stop": 5}, "stop", "string"),
    ({"stop_token_ids": 5}, "stop_token_ids", "list of integers"),
    ({"logprobs": True, "top_logprobs": 30}, "top_logprobs", "[0, 20]"),
    ({"presence_penalty": 3}, "presence_penalty", "[-2, 2]"),
])
def test_chat_sampling_errors_name_their_field(body, param, fragment):
    with pytest.raises(P.APIError) as e:
        P.sampling_params(body, chat=True)
    assert (e.value.status, e.value.param) == (400, param) and fragment in e.value.message


def test_sampling_params_mapping():
    chat = P.sampling_params({"max_completion_tokens": 7, "max_tokens": 3, "logprobs": True, "top_logprobs": 2,
                              "stop": "x", "seed": 5, "n": 2, "user": "ignored"}, chat=True)
    assert (chat.max_tokens, chat.logprobs, chat.stop, chat.seed, chat.n) == (7, 2, ["x"], 5, 2)
    assert P.sampling_params({}, chat=True).max_tokens is None  # chat: up to the context limit
    completion = P.sampling_params({"logprobs": 3, "top_k": 5, "min_p": 0.1, "ignore_eos": True}, chat=False)
    assert (completion.max_tokens, completion.logprobs, completion.top_k, completion.ignore_eos) == (16, 3, 5, True)
    with pytest.raises(P.APIError, match="logprobs"):
        P.sampling_params({"logprobs": True}, chat=False)  # completions take a count, not a flag


def test_stream_options_prompts_and_messages():
    assert P.include_usage({"stream_options": {"include_usage": True}}) is True
    assert P.include_usage({}) is False
    for bad in ({"stream_options": "yes"}, {"stream_options": {"include_usage": 1}}):
        with pytest.raises(P.APIError, match="stream_options"):
            P.include_usage(bad)
    assert P.prompts({"prompt": "a"}) == ["a"]
    assert P.prompts({"prompt": [1, 2]}) == [[1, 2]]
    assert P.prompts({"prompt": ["a", [3]]}) == ["a", [3]]
    for bad in ({"prompt": []}, {"prompt": [1, "a"]}, {"prompt": [True]}, {"prompt": {"a": 1}}, {}):
        with pytest.raises(P.APIError, match="'prompt' must be"):
            P.prompts(bad)
    messages = P.messages({"messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "name": "x"}]})
    assert messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "ab"}]
    for bad, fragment in [([{"role": "tool", "content": "x"}], "messages[0].role"),
                          ([CHAT[0], {"role": "user", "content": None}], "messages[1].content"),
                          ([{"role": "user", "content": [{"type": "image_url"}]}], "content parts must be")]:
        with pytest.raises(P.APIError, match=fragment.replace("[", r"\[")):
            P.messages({"messages": bad})


def test_sse_and_logprob_shapes():
    event = P.sse({"text": "héllo"})
    assert event.startswith("data: ") and event.endswith("\n\n") and json.loads(event[6:]) == {"text": "héllo"}
    assert P.DONE == "data: [DONE]\n\n"
    out = CompletionOutput(index=0, text="ab", token_ids=[7, 8], finish_reason=None, stop_reason=None, logprobs=[
        {7: Logprob(-0.1, 1, "a"), 9: Logprob(-2.0, 2, "z")},
        {5: Logprob(-0.2, 1, "y"), 8: Logprob(-1.0, 2, "b"), 6: Logprob(-3.0, 3, "w")}])
    chat = P.chat_logprobs(out, None, top_n=1, start=1)["content"]
    assert [c["token"] for c in chat] == ["b"] and chat[0]["top_logprobs"][0]["token"] == "y"
    assert chat[0]["bytes"] == [98]
    comp = P.completion_logprobs(out, None)
    assert comp["tokens"] == ["a", "b"] and comp["token_logprobs"] == [-0.1, -1.0]
    assert comp["top_logprobs"][1] == {"y": -0.2, "b": -1.0, "w": -3.0}


# ---- the app in process ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shared_llm(tiny_config):
    llm = AsyncLLM(tiny_config, show_progress=False)
    yield llm
    llm.shutdown(grace_s=0)


@pytest.fixture(scope="module")
def client(shared_llm):
    with TestClient(OpenAIServer(shared_llm).app, raise_server_exceptions=False) as c:
        yield c


def sse_events(text: str) -> list:
    lines = [line for line in text.split("\n\n") if line]
    assert lines[-1] == "data: [DONE]", "a stream must end with [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


def assert_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)
    return error


def test_status_of_each_error(client, shared_llm):
    name = shared_llm.config.model.name
    assert assert_error(client.post("/v1/chat/completions", json={"messages": CHAT, "model": 3}), 400)["param"] == \
        "model"
    assert assert_error(client.post("/v1/completions", json={"prompt": "a", "model": "x"}), 404)["code"] == \
        "model_not_found"
    error = assert_error(client.post("/v1/completions", json={"prompt": [1] * 600}), 400)
    assert "600" in error["message"] and str(shared_llm.max_model_len) in error["message"]
    assert_error(client.post("/v1/completions", json={"prompt": [10**9]}), 400)
    assert_error(client.post("/v1/completions", json={"prompt": "a", "suffix": "b"}), 400)
    assert_error(client.post("/detokenize", json={"tokens": [2**40]}), 400)
    assert_error(client.post("/v1/completions", json={"prompt": "a", "stream": True, "stream_options": 1}), 400)
    assert_error(client.get("/v1/nothing"), 404)
    assert client.get("/v1/models").json()["data"][0]["id"] == name


def test_api_key_and_chat_template_errors(shared_llm):
    server = OpenAIServer(shared_llm, api_key="k", served_model_name="m",
                          chat_template="{{ raise_exception('no chatting here') }}")
    with TestClient(server.app) as c:
        assert assert_error(c.get("/v1/models"), 401)["type"] == "authentication_error"
        headers = {"Authorization": "Bearer k"}
        assert c.get("/v1/models", headers=headers).json()["data"][0]["id"] == "m"
        error = assert_error(c.post("/v1/chat/completions", json={"messages": CHAT}, headers=headers), 400)
        assert "no chatting here" in error["message"]


def test_engine_failure_is_a_500_object_and_the_server_goes_on(make_llm):
    llm = make_llm()
    with TestClient(OpenAIServer(llm).app, raise_server_exceptions=False) as c:
        StepGate(llm, fail=RuntimeError("device on fire"))
        body = {"prompt": [1, 2, 3], "max_tokens": 4}
        assert "device on fire" in assert_error(c.post("/v1/completions", json=body), 500)["message"]
        assert c.post("/v1/completions", json=body).json()["usage"]["completion_tokens"] == 4
        # Mid-stream, after the status line: an error event, then [DONE]. (The first step call only
        # launches the prefill; the next two report tokens, then the fourth fails.)
        StepGate(llm, fail=RuntimeError("again"), after=3)
        events = sse_events(c.post("/v1/completions", json={**body, "stream": True, "ignore_eos": True}).text)
        assert events[0]["choices"] and "again" in events[-1]["error"]["message"]
        assert c.get("/health").status_code == 200


def test_dead_engine_answers_503(make_llm):
    llm = make_llm()
    with TestClient(OpenAIServer(llm).app) as c:
        StepGate(llm, fail=RankDiedError("rank 1 exited"))
        assert_error(c.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 2}), 503)
        assert_error(c.get("/health"), 503)
        assert_error(c.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 2}), 503)


def test_full_queue_answers_429(make_llm):
    llm = make_llm(max_waiting_requests=1)
    gate = StepGate(llm, closed=True)
    app = OpenAIServer(llm).app

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            body = {"prompt": [1, 2], "max_tokens": 2}
            first = asyncio.create_task(c.post("/v1/completions", json=body))
            await asyncio.to_thread(gate.entered.wait, 10)
            refused = await c.post("/v1/completions", json=body)
            gate.open()
            return (await first), refused

    first, refused = asyncio.run(main())
    assert first.status_code == 200
    assert assert_error(refused, 429)["type"] == "rate_limit_error"


def json_values():
    scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.text(max_size=5)
               | st.floats(allow_nan=False, allow_infinity=False))
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                        | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)


def maybe(valid: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(*[valid] * 6, json_values())  # mostly valid, so that many requests get through


FIELDS = {
    "temperature": maybe(st.floats(0, 2)), "top_p": maybe(st.floats(0.01, 1)), "top_k": maybe(st.integers(-1, 50)),
    "min_p": maybe(st.floats(0, 1)), "seed": maybe(st.integers(-2**64, 2**64)),
    "stop": maybe(st.lists(st.text(min_size=1, max_size=3), max_size=2)),
    "stop_token_ids": maybe(st.lists(st.integers(0, 60000), max_size=2)),
    "presence_penalty": maybe(st.floats(-3, 3)), "frequency_penalty": maybe(st.floats(-3, 3)),
    "repetition_penalty": maybe(st.floats(0, 3)), "min_tokens": maybe(st.integers(0, 3)),
    "ignore_eos": maybe(st.booleans()), "stream": st.booleans(), "echo": maybe(st.booleans()),
    "stream_options": maybe(st.fixed_dictionaries({"include_usage": st.booleans()})),
    "logprobs": maybe(st.booleans() | st.integers(0, 3)), "top_logprobs": maybe(st.integers(0, 25)),
    "user": json_values(), "model": maybe(st.just("SmolLM2")), "skip_special_tokens": maybe(st.booleans()),
}
# Generation stays short: n and max_tokens are either small or of a kind that must be refused.
SHORT = {"n": st.one_of(*[st.integers(1, 3)] * 6, st.integers(-3, 0), st.text(max_size=2), st.integers(129, 2**40)),
         "max_tokens": st.one_of(*[st.integers(1, 4)] * 6, st.integers(-3, 0), st.floats(-1e9, 1e9),
                                 st.lists(st.integers(), max_size=1))}
PROMPT = maybe(st.text(min_size=1, max_size=20) | st.lists(st.integers(0, 49151), min_size=1, max_size=8)
               | st.lists(st.lists(st.integers(0, 60000), max_size=4), min_size=1, max_size=2))
MESSAGES = maybe(st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "x"]),
                                                 "content": st.text(max_size=10) | json_values()}),
                          min_size=1, max_size=3))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chat=st.booleans(), fields=st.fixed_dictionaries({}, optional={**FIELDS, **SHORT}), data=st.data())
def test_no_request_body_gets_a_500(client, shared_llm, chat, fields, data):
    body = {**fields, "max_tokens": fields.get("max_tokens", 2)}
    body["messages" if chat else "prompt"] = data.draw(MESSAGES if chat else PROMPT)
    if body.get("model") == "SmolLM2":
        body["model"] = shared_llm.config.model.name
    r = client.post("/v1/chat/completions" if chat else "/v1/completions", json=body)
    event(f"status {r.status_code} {'' if r.status_code == 200 else r.json()['error']['param']}")
    if r.status_code != 200:
        assert_error(r, 404 if isinstance(body.get("model"), str) and r.status_code == 404 else 400)
        return
    if body.get("stream"):
        events = sse_events(r.text)
        assert all("error" not in e for e in events), events
        usage = [e["usage"] for e in events if e.get("usage")]
    else:
        usage = [r.json()["usage"]]
        assert len(r.json()["choices"]) >= body.get("n", 1)
    for u in usage:
        assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] and u["prompt_tokens"] > 0
    wanted = bool(body.get("stream") and isinstance(body.get("stream_options"), dict)
                  and body["stream_options"].get("include_usage"))
    assert len(usage) == (1 if wanted or not body.get("stream") else 0)
