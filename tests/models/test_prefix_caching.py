"""Prefix caching never changes a greedy output, and reports what it reused."""

from __future__ import annotations

import pytest

from gllm_engine import LLM, SamplingParams
from tests.helpers import make_tiny_model_dir

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir("Qwen3ForCausalLM", tmp_path_factory.mktemp("qwen3"), with_tokenizer=False)


def run(model_dir, prompts, params=GREEDY, **kw):
    llm = LLM(str(model_dir), device="cpu", skip_tokenizer_init=True, show_progress=False, block_size=4, **kw)
    outs = []
    for batch in prompts:  # each inner list is one generate() call, so later calls can hit earlier blocks
        outs += llm.generate([{"prompt_token_ids": p} for p in batch], params)
    pool = llm.engine.kv_cache.pool
    pool.check_integrity()
    assert pool.num_free == pool.num_blocks
    return [[o.token_ids for o in r.outputs] for r in outs], [r.num_cached_tokens for r in outs]


SYSTEM = list(range(10, 46))  # 36 tokens: 9 full blocks of 4


@pytest.mark.parametrize("case,prompts", [
    ("same prompt twice", [[SYSTEM + [5, 6, 7]], [SYSTEM + [5, 6, 7]]]),
    ("shared system prompt", [[SYSTEM + [1, 2]], [SYSTEM + [3, 4, 5], SYSTEM + [9] * 7]]),
    ("exact multiple of the block size", [[SYSTEM], [SYSTEM]]),
    ("diverging inside a block", [[SYSTEM[:30] + [1, 2, 3]], [SYSTEM[:30] + [1, 9, 3]]]),
])
def test_caching_on_equals_off(model_dir, case, prompts):
    on, cached = run(model_dir, prompts)
    off, uncached = run(model_dir, prompts, enable_prefix_caching=False)
    assert on == off, case
    assert cached[-1] > 0 and set(uncached) == {0}


def test_parallel_sampling_shares_and_matches(model_dir):
    params = SamplingParams(n=3, temperature=0.8, seed=5, max_tokens=10, ignore_eos=True)
    on, _ = run(model_dir, [[SYSTEM + [1]]], params)
    off, _ = run(model_dir, [[SYSTEM + [1]]], params, enable_prefix_caching=False)
    assert on == off and len(on[0]) == 3


def test_tiny_cache_forces_eviction_and_preemption(model_dir):
    prompts = [[SYSTEM + [i] * (3 + i) for i in range(6)], [SYSTEM + [i] for i in range(6)]]
    on, _ = run(model_dir, prompts, num_gpu_blocks_override=30)
    off, _ = run(model_dir, prompts, enable_prefix_caching=False)
    assert on == off


def test_a_cache_salt_shares_only_with_the_same_salt(model_dir):
    llm = LLM(str(model_dir), device="cpu", skip_tokenizer_init=True, show_progress=False, block_size=4)
    salts = [None, "a", "a", "b", None]
    outs = [llm.generate({"prompt_token_ids": SYSTEM + [1], "cache_salt": salt}, GREEDY)[0] for salt in salts]
    assert [o.num_cached_tokens for o in outs] == [0, 0, 36, 0, 36]
    assert len({tuple(o.outputs[0].token_ids) for o in outs}) == 1  # the salt changes what is shared, not the output
