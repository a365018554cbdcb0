"""`AsyncLLM` on a real engine (tiny model): streams, abort, backpressure, step failures, shutdown."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from gllm_engine.core.engine_core import EngineCore
from gllm_engine.entrypoints.async_llm import AsyncLLM, EngineStepError, EngineUnavailableError, QueueFullError
from gllm_engine.executor.comm import RankDiedError
from gllm_engine.loader import ModelLoadError
from gllm_engine.sampling_params import SamplingParams
from tests.server.conftest import StepGate, slow_down_steps

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


async def collect(llm, prompt, request_id, params=GREEDY):
    return [out async for out in llm.generate(prompt, params, request_id)]


def wait_for(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def all_blocks_free(llm) -> bool:
    s = llm.stats()
    return s.num_free_blocks == s.num_total_blocks and s.num_running == s.num_waiting == 0


def test_text_and_token_prompts_stream_cumulative_outputs(make_llm):
    llm = make_llm()
    ids = llm.tokenizer.encode("The sky is")

    async def main():
        return await asyncio.gather(collect(llm, "The sky is", "a"), collect(llm, ids, "b"))

    by_text, by_ids = asyncio.run(main())
    assert [o.finished for o in by_text] == [False] * (len(by_text) - 1) + [True]
    lengths = [len(o.outputs[0].token_ids) for o in by_text]
    assert lengths == sorted(lengths) and lengths[-1] == 8  # cumulative, up to max_tokens
    assert by_text[-1].prompt == "The sky is" and by_text[-1].prompt_token_ids == ids
    assert by_text[-1].outputs[0].token_ids == by_ids[-1].outputs[0].token_ids
    assert all_blocks_free(llm)


def test_leaving_early_aborts_and_frees_blocks(make_llm):
    llm = make_llm()
    long = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)

    async def main():
        stream = llm.generate([5, 6, 7], long, "left")
        async for out in stream:
            if len(out.outputs[0].token_ids) >= 2:
                break
        await stream.aclose()
        task = asyncio.create_task(collect(llm, [8, 9], "cancelled", long))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    wait_for(lambda: all_blocks_free(llm) and not llm.engine.requests)
    assert llm.stats().num_generation_tokens < 300  # neither ran on to its 400 tokens


def test_a_failed_step_fails_its_requests_and_the_engine_goes_on(make_llm):
    llm = make_llm()
    gate = StepGate(llm, closed=True, fail=RuntimeError("boom"))

    async def main():
        first = asyncio.create_task(collect(llm, [1, 2, 3], "doomed"))
        await asyncio.to_thread(gate.entered.wait, 10)
        gate.open()
        with pytest.raises(EngineStepError, match="boom"):
            await first
        return await collect(llm, [1, 2, 3], "after")

    after = asyncio.run(main())
    assert after[-1].finished and len(after[-1].outputs[0].token_ids) == 8
    assert all_blocks_free(llm)


def test_a_dead_rank_makes_the_engine_unavailable(make_llm):
    llm = make_llm()
    StepGate(llm, fail=RankDiedError("rank 1 exited"))

    async def main():
        with pytest.raises(EngineUnavailableError, match="rank 1 exited"):
            await collect(llm, [1, 2, 3], "x")
        with pytest.raises(EngineUnavailableError):
            await collect(llm, [1, 2, 3], "y")

    asyncio.run(main())
    assert llm.dead is not None


def test_waiting_queue_limit(make_llm):
    llm = make_llm(max_waiting_requests=2)
    gate = StepGate(llm, closed=True)  # nothing gets scheduled while the gate is closed

    async def main():
        first = asyncio.create_task(collect(llm, [1, 2], "r0"))
        await asyncio.to_thread(gate.entered.wait, 10)  # r0 is queued in the engine, its first step held
        second = asyncio.create_task(collect(llm, [1, 2], "r1"))
        await asyncio.sleep(0)  # r1 is on its way to the engine thread
        with pytest.raises(QueueFullError, match="2 requests are waiting, the limit is 2"):
            await collect(llm, [1, 2], "refused")
        gate.open()
        results = await asyncio.gather(first, second)
        assert all(r[-1].finished for r in results)
        await collect(llm, [1, 2], "later")  # room again

    asyncio.run(main())


def test_duplicate_request_id_and_rejected_prompt(make_llm):
    llm = make_llm()

    async def main():
        with pytest.raises(ValueError, match=f"{llm.max_model_len}"):
            await collect(llm, [1] * llm.max_model_len, "too-long")
        gate = StepGate(llm, closed=True)
        first = asyncio.create_task(collect(llm, [1, 2], "same"))
        await asyncio.to_thread(gate.entered.wait, 10)
        with pytest.raises(ValueError, match="already in use"):
            await collect(llm, [1, 2], "same")
        gate.open()
        await first

    asyncio.run(main())


def test_shutdown_lets_requests_finish_then_aborts_the_rest(make_llm):
    llm = make_llm()
    # 10 ms a step: "short" (8 tokens) ends well inside the 1 s grace, "endless" (up to the
    # context, 500 tokens) cannot, however fast the machine.
    slow_down_steps(llm, 0.01)

    async def main():
        short = asyncio.create_task(collect(llm, [1, 2, 3], "short"))
        endless = asyncio.create_task(collect(llm, [4, 5, 6], "endless",
                                              SamplingParams(max_tokens=None, ignore_eos=True)))
        await asyncio.sleep(0.1)
        await asyncio.to_thread(llm.shutdown, 1.0)
        with pytest.raises(EngineUnavailableError, match="shutting down"):
            await collect(llm, [1], "too-late")
        return await short, await endless

    short, endless = asyncio.run(main())
    assert short[-1].outputs[0].finish_reason == "length"
    assert endless[-1].outputs[0].finish_reason == "abort"
    assert all_blocks_free(llm)


def test_the_engine_thread_builds_the_engine_it_steps(make_llm, monkeypatch):
    """On the CPU, stepping from another thread than the one that loaded the model is slower: one thread does both."""
    built_on, stepped_on = [], []
    init, step = EngineCore.__init__, EngineCore.step

    def recording_init(self, *args, **kwargs):
        built_on.append(threading.get_ident())
        init(self, *args, **kwargs)

    def recording_step(self):
        stepped_on.append(threading.get_ident())
        return step(self)

    monkeypatch.setattr(EngineCore, "__init__", recording_init)
    monkeypatch.setattr(EngineCore, "step", recording_step)
    llm = make_llm(engine_process=False)
    asyncio.run(collect(llm, [1, 2, 3], "a"))
    assert len(built_on) == 1 and built_on[0] != threading.get_ident()
    assert stepped_on and set(stepped_on) == set(built_on)


def test_an_engine_that_fails_to_build_raises_from_the_constructor(tiny_config, monkeypatch):
    def failing_init(self, *args, **kwargs):
        raise ModelLoadError("no weights here")

    monkeypatch.setattr(EngineCore, "__init__", failing_init)
    with pytest.raises(ModelLoadError, match="no weights here"):
        AsyncLLM(tiny_config, show_progress=False, engine_process=False)
