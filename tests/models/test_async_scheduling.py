"""Async scheduling (the next step planned and launched before this one's tokens reach the host)
changes no output: greedy, seeded, penalised, stopped, preempted, prefix-cached or interrupted."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from gllm_engine import LLM, SamplingParams
from tests.helpers import NO_TOKENIZER_VOCAB_SIZE, make_tiny_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir("LlamaForCausalLM", tmp_path_factory.mktemp("llama"), with_tokenizer=False)


def engine(model_dir, async_scheduling: bool, **kw) -> LLM:
    return LLM(str(model_dir), device="cpu", dtype="float32", skip_tokenizer_init=True, show_progress=False,
               block_size=4, async_scheduling=async_scheduling, **kw)


def prompt_set(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    shared = torch.randint(0, vocab, (12,), generator=g).tolist()  # three full blocks several prompts share
    own = [torch.randint(0, vocab, (3 + 5 * i % 17,), generator=g).tolist() for i in range(8)]
    return [shared + p if i % 2 else p for i, p in enumerate(own)]


def param_set(stop_token: int) -> list[SamplingParams]:
    greedy = dict(temperature=0.0, ignore_eos=True)
    return [
        SamplingParams(max_tokens=20, **greedy),
        SamplingParams(max_tokens=1, **greedy),
        SamplingParams(max_tokens=20, stop_token_ids=[stop_token], **greedy),
        SamplingParams(max_tokens=16, repetition_penalty=1.3, presence_penalty=0.5, **greedy),
        SamplingParams(temperature=0.8, top_k=20, seed=11, max_tokens=16, ignore_eos=True),
        SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=12, ignore_eos=True, logprobs=2),
        SamplingParams(max_tokens=24, min_tokens=4, stop_token_ids=[stop_token], **greedy),
        SamplingParams(max_tokens=9, **greedy),
    ]


def outputs(llm: LLM, prompts, params):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    pool = llm.engine.kv_cache.pool
    pool.check_integrity()
    assert pool.num_free == pool.num_blocks  # every block came back
    return [[(o.token_ids, o.finish_reason, [sorted(lp.items()) for lp in o.logprobs or []]) for o in r.outputs]
            for r in outs]


def count_steps(llm: LLM) -> Counter:
    """Counts the tokens computed, and the steps that fed pending input tokens on the device."""
    runner = llm.engine.executor.runner
    step_arrays = runner.step_arrays
    fed: Counter = Counter()

    def counting(plan, states):
        step = step_arrays(plan, states)
        fed["computed"] += step.num_tokens
        if step.feed_rows.size:
            fed["steps"] += 1
        return step

    runner.step_arrays = counting
    return fed


@pytest.mark.parametrize("case,kw", [
    ("roomy", {}),
    ("chunked", dict(max_num_batched_tokens=8, max_num_seqs=4)),
    ("tight cache: preemption", dict(num_gpu_blocks_override=24)),
])
def test_async_outputs_equal_sync_outputs(model_dir, case, kw):
    prompts = prompt_set(NO_TOKENIZER_VOCAB_SIZE)
    probe = engine(model_dir, False).generate([{"prompt_token_ids": prompts[2]}],
                                              SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    params = param_set(stop_token=probe[0].outputs[0].token_ids[5])  # stops inside the run
    sync = engine(model_dir, False, **kw)
    sync_steps = count_steps(sync)
    expected = outputs(sync, prompts, params)
    assert sync.engine.max_in_flight == 1
    llm = engine(model_dir, True, **kw)
    fed = count_steps(llm)
    got = outputs(llm, prompts, params)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert [x[:2] for x in g] == [x[:2] for x in e], (case, i)
        for (_, _, g_lp), (_, _, e_lp) in zip(g, e):
            assert len(g_lp) == len(e_lp)
            for a, b in zip(g_lp, e_lp):
                assert [k for k, _ in a] == [k for k, _ in b]
                assert [v.logprob for _, v in a] == pytest.approx([v.logprob for _, v in b], abs=1e-5)
    assert expected[2][0][1] == "stop" and len(expected[2][0][0]) == 6
    assert fed["steps"] > 10 and llm.engine.max_in_flight == 2, fed
    if case == "roomy":  # a stopped sequence is computed one step further in both modes, no more
        assert fed["computed"] == sync_steps["computed"], (fed, sync_steps)
    if "preemption" in case:
        assert llm.engine.stats().num_preemptions > 0 and sync.engine.stats().num_preemptions > 0


def test_an_interrupted_async_step_rolls_back_and_the_run_goes_on(model_dir):
    greedy = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    prompts = prompt_set(NO_TOKENIZER_VOCAB_SIZE)[:4]
    expected = [o.outputs[0].token_ids for o in engine(model_dir, True).generate(
        [{"prompt_token_ids": p} for p in prompts], greedy)]

    core = engine(model_dir, True).engine
    for i, p in enumerate(prompts):
        core.add_request(str(i), p, greedy)
    for _ in range(5):
        core.step()
    assert len(core.in_flight) == 2  # the step running and the one launched ahead
    collect = core.executor.collect
    calls = Counter()

    def interrupted():
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt
        return collect()

    core.executor.collect = interrupted
    with pytest.raises(KeyboardInterrupt):
        core.step()  # Ctrl-C while waiting for the older of the two
    assert not core.in_flight and all(s.num_pending == 0 for r in core.requests.values() for s in r.seqs)
    done = {}
    while core.has_unfinished_requests():
        for out in core.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    assert [done[str(i)] for i in range(len(prompts))] == expected
    pool = core.kv_cache.pool
    pool.check_integrity()
    assert pool.num_free == pool.num_blocks
