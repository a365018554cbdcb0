"""The engine in a process of its own (`AsyncLLM(engine_process=True)`, `gllm serve --engine-process`):
the same answers as on a thread, streams equal to whole answers, abort, concurrency, a dying engine,
load errors, and shutdown with a grace period (last: it stops the module's engine)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import load_file, save_file

from gllm_engine.config import EngineConfig
from gllm_engine.entrypoints.async_llm import AsyncLLM, EngineUnavailableError
from gllm_engine.sampling_params import RequestOutputKind, SamplingParams
from gllm_engine.server.app import OpenAIServer

LONG = SamplingParams(temperature=0, max_tokens=4000, ignore_eos=True)


@pytest.fixture(scope="module")
def long_config(tiny_model_dir) -> EngineConfig:
    """The tiny model with 65536 positions, all of them in the KV cache: a request without max_tokens
    outlasts any grace period here, however fast the machine."""
    model = tiny_model_dir("LlamaForCausalLM", max_position_embeddings=65536)
    return EngineConfig.create(str(model), device="cpu", cpu_kv_cache_gib=0.04)


@pytest.fixture(scope="module")
def proc_llm(long_config):
    llm = AsyncLLM(long_config, show_progress=False, engine_process=True)
    yield llm
    llm.shutdown(grace_s=0)


def app_client(llm: AsyncLLM) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=OpenAIServer(llm).app), base_url="http://t",
                             timeout=120)


def sse_events(text: str) -> list[dict]:
    events = [e for e in text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    return [json.loads(e[6:]) for e in events[:-1]]


def wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def all_blocks_free(llm: AsyncLLM) -> bool:
    s = llm.stats()
    return s.num_free_blocks == s.num_total_blocks and s.num_running == s.num_waiting == 0


def test_streams_equal_whole_answers_and_the_thread_engine(proc_llm, long_config):
    assert proc_llm.engine is None and proc_llm.engine_pid != os.getpid()
    comp = {"prompt": "The sky is", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 12, "temperature": 0, "ignore_eos": True}

    async def answers(llm: AsyncLLM) -> dict:
        async with app_client(llm) as c:
            whole = (await c.post("/v1/completions", json=comp)).json()["choices"][0]["text"]
            stop = whole[len(whole) // 2:len(whole) // 2 + 3]  # a stop string in mid-answer
            cut = (await c.post("/v1/completions", json={**comp, "stop": [stop]})).json()["choices"][0]["text"]
            events = sse_events((await c.post("/v1/completions", json={**comp, "stop": [stop], "stream": True})).text)
            streamed_cut = "".join(e["choices"][0]["text"] for e in events if e["choices"])
            chat_whole = (await c.post("/v1/chat/completions", json=chat)).json()["choices"][0]["message"]
            events = sse_events((await c.post("/v1/chat/completions", json={**chat, "stream": True})).text)
            chat_streamed = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
        assert cut == whole[:whole.index(stop)] == streamed_cut  # no piece of the stop string was streamed
        assert chat_streamed == chat_whole["content"]
        return {"whole": whole, "chat": chat_whole["content"]}

    in_process = asyncio.run(answers(proc_llm))
    thread_llm = AsyncLLM(long_config, show_progress=False, engine_process=False)
    try:
        assert asyncio.run(answers(thread_llm)) == in_process
    finally:
        thread_llm.shutdown(grace_s=0)


def test_output_kinds_agree(proc_llm):
    async def run(kind: RequestOutputKind) -> list:
        params = SamplingParams(n=2, temperature=1.0, seed=7, max_tokens=10, ignore_eos=True, logprobs=2,
                                output_kind=kind)
        return [out async for out in proc_llm.generate("Once upon a time", params, f"kind-{kind.name}")]

    async def main() -> dict:
        return {kind: await run(kind) for kind in RequestOutputKind}

    outs = asyncio.run(main())
    (final,) = outs[RequestOutputKind.FINAL_ONLY]
    assert final.finished and final.metrics.arrival_time < final.metrics.first_token_time
    for index in (0, 1):
        whole = final.outputs[index]
        cumulative = outs[RequestOutputKind.CUMULATIVE][-1].outputs[index]
        deltas = [o for out in outs[RequestOutputKind.DELTA] for o in out.outputs if o.index == index]
        assert len(whole.token_ids) == 10 and cumulative.token_ids == whole.token_ids
        assert [t for o in deltas for t in o.token_ids] == whole.token_ids
        assert "".join(o.text for o in deltas) == cumulative.text == whole.text
        assert [lp for o in deltas for lp in o.logprobs] == cumulative.logprobs == whole.logprobs
        assert [o.finish_reason for o in deltas] == [None] * (len(deltas) - 1) + ["length"]
    assert final.outputs[0].token_ids != final.outputs[1].token_ids  # two samples, not one twice


def test_leaving_early_returns_every_block(proc_llm):
    before = proc_llm.stats().num_generation_tokens

    async def leave():
        stream = proc_llm.generate([5, 6, 7], LONG, "left")
        async for out in stream:
            if len(out.outputs[0].token_ids) >= 2:
                break
        await stream.aclose()

    async def cancel():
        final_only = SamplingParams(temperature=0, max_tokens=4000, ignore_eos=True,
                                    output_kind=RequestOutputKind.FINAL_ONLY)
        task = asyncio.create_task(anext(proc_llm.generate([8, 9], final_only, "cancelled")))
        await asyncio.to_thread(wait_for, lambda: proc_llm.stats().num_running == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(leave())
    wait_for(lambda: all_blocks_free(proc_llm))
    asyncio.run(cancel())
    wait_for(lambda: all_blocks_free(proc_llm))
    assert proc_llm.stats().num_generation_tokens - before < 1000  # neither ran on to its 4000 tokens


def test_concurrent_streams_finish_with_exact_usage(proc_llm):
    ids = proc_llm.tokenizer.encode("Count to ten")
    server = OpenAIServer(proc_llm)
    body = {"max_tokens": 8, "temperature": 0, "ignore_eos": True, "logprobs": 1, "stream": True,
            "stream_options": {"include_usage": True}}
    before = proc_llm.stats().num_generation_tokens

    async def one(c: httpx.AsyncClient, i: int) -> tuple[int, int, int]:
        events = sse_events((await c.post("/v1/completions", json={**body, "prompt": [*ids, 10 + i]})).text)
        usage = events[-1]["usage"]
        logprobs = sum(len(e["choices"][0]["logprobs"]["tokens"]) for e in events if e["choices"])
        return usage["completion_tokens"], logprobs, usage["prompt_tokens"]

    async def main() -> tuple[list, str]:
        transport = httpx.ASGITransport(app=server.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=120) as c:
            results = await asyncio.gather(*(one(c, i) for i in range(24)))
            return results, (await c.get("/metrics")).text

    results, metrics = asyncio.run(main())
    assert results == [(8, 8, len(ids) + 1)] * 24
    assert proc_llm.stats().num_generation_tokens == before + 24 * 8
    assert all_blocks_free(proc_llm)
    samples = {(s.name, s.labels.get("finished_reason")): s.value
               for family in text_string_to_metric_families(metrics) for s in family.samples}
    assert samples[("gllm:request_success_total", "length")] == 24
    assert samples[("gllm:time_to_first_token_seconds_count", None)] == 24
    assert samples[("gllm:generation_tokens_total", None)] == proc_llm.stats().num_generation_tokens


def test_a_killed_engine_process_fails_requests_and_health(long_config):
    llm = AsyncLLM(long_config, show_progress=False, engine_process=True)
    app = OpenAIServer(llm).app

    async def main():
        stream = llm.generate([1, 2, 3], LONG, "doomed")
        await anext(stream)
        os.kill(llm.engine_pid, signal.SIGKILL)

        async def drain():  # outputs already on their way before the kill still arrive first
            async for _ in stream:
                pass

        with pytest.raises(EngineUnavailableError, match="signal 9"):
            await asyncio.wait_for(drain(), timeout=30)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            health = await c.get("/health")
            refused = await c.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 2})
        return health, refused

    try:
        health, refused = asyncio.run(main())
    finally:
        llm.shutdown(grace_s=0)
    assert health.status_code == 503 and "engine process died" in health.json()["error"]["message"]
    assert refused.status_code == 503 and refused.json()["error"]["type"] == "service_unavailable"


def test_a_load_error_is_one_line_from_gllm_serve(tiny_model_dir):
    model = tiny_model_dir("LlamaForCausalLM", with_tokenizer=False)
    weights = load_file(str(model / "model.safetensors"))
    del weights["model.norm.weight"]
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    r = subprocess.run([sys.executable, "-m", "gllm_cli.main", "serve", str(model), "--device", "cpu",
                        "--engine-process"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: 1 parameters of LlamaForCausalLM are not in the checkpoint {model}: model.norm.weight "
        f"(is it the right model, complete?)")
    assert "Traceback" not in r.stderr


def test_shutdown_lets_requests_finish_then_aborts_the_rest(proc_llm):  # last: it stops the module's engine
    async def collect(prompt, request_id, params):
        return [out async for out in proc_llm.generate(prompt, params, request_id)]

    prompt_tokens = proc_llm.stats().num_prompt_tokens

    async def main():
        short = asyncio.create_task(collect([1, 2, 3], "short", SamplingParams(max_tokens=8, ignore_eos=True)))
        endless = asyncio.create_task(collect([4, 5, 6], "endless", SamplingParams(max_tokens=None,
                                                                                     ignore_eos=True)))
        await asyncio.to_thread(wait_for, lambda: proc_llm.stats().num_prompt_tokens >= prompt_tokens + 6)
        await asyncio.to_thread(proc_llm.shutdown, 2.0)
        with pytest.raises(EngineUnavailableError, match="shutting down"):
            await collect([1], "too-late", SamplingParams())
        return await short, await endless

    short, endless = asyncio.run(main())
    assert short[-1].outputs[0].finish_reason == "length" and len(short[-1].outputs[0].token_ids) == 8
    assert endless[-1].outputs[0].finish_reason == "abort"
    assert all_blocks_free(proc_llm)
    with pytest.raises(ProcessLookupError):  # the engine process has exited, and was reaped
        os.kill(proc_llm.engine_pid, 0)
