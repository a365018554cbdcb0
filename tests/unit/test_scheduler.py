"""Scheduler and block pool, without a model: plans, budgets, preemption and block accounting."""

from __future__ import annotations

import pytest

from gllm_engine.config import SchedulerConfig
from gllm_engine.core.kv_cache import BlockPool, KVCacheManager
from gllm_engine.core.request import Request
from gllm_engine.core.scheduler import Scheduler
from gllm_engine.sampling_params import SamplingParams


def make_scheduler(num_blocks: int = 64, block_size: int = 4, max_num_seqs: int = 8,
                   max_num_batched_tokens: int = 64, chunked: bool = True) -> Scheduler:
    cfg = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                          max_model_len=1024, enable_chunked_prefill=chunked)
    return Scheduler(cfg, KVCacheManager(num_blocks, block_size))


def make_seq(prompt_len: int, rid: str = "r"):
    return Request.create(rid, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=100)).seqs[0]


def run_step(sched: Scheduler, token: int = 7):
    """Schedule, pretend to run, append one sampled token to every sequence that samples."""
    plan = sched.schedule()
    sched.update(plan)
    for s in plan.scheduled:
        if s.samples:
            s.seq.token_ids.append(token)
    return plan


def test_prefill_then_decodes_first():
    sched = make_scheduler()
    a, b = make_seq(10, "a"), make_seq(6, "b")
    sched.add(a)
    run_step(sched)  # a prefilled
    sched.add(b)
    plan = run_step(sched)
    assert [(s.seq.request_id, s.num_new_tokens) for s in plan.scheduled] == [("a", 1), ("b", 6)]
    assert plan.num_decodes == 1
    assert all(s.samples for s in plan.scheduled)


def test_chunked_prefill_respects_budget_and_samples_only_at_the_end():
    sched = make_scheduler(max_num_batched_tokens=8)
    seq = make_seq(20)
    sched.add(seq)
    chunks = []
    while seq.num_output_tokens == 0:
        plan = run_step(sched)
        assert plan.num_tokens <= 8
        chunks.append((plan.scheduled[0].num_new_tokens, plan.scheduled[0].samples))
    assert chunks == [(8, False), (8, False), (4, True)]
    assert seq.num_computed_tokens == 20 and seq.num_tokens == 21


def test_without_chunking_a_prompt_waits_for_a_whole_budget():
    sched = make_scheduler(max_num_batched_tokens=12, chunked=False)
    a, b = make_seq(8, "a"), make_seq(8, "b")
    sched.add(a)
    sched.add(b)
    plan = run_step(sched)
    assert [s.seq.request_id for s in plan.scheduled] == ["a"]
    plan = run_step(sched)
    assert [(s.seq.request_id, s.num_new_tokens) for s in plan.scheduled] == [("a", 1), ("b", 8)]


def test_max_num_seqs_limits_running():
    sched = make_scheduler(max_num_seqs=2)
    for i in range(3):
        sched.add(make_seq(3, str(i)))
    run_step(sched)
    assert len(sched.running) == 2 and len(sched.waiting) == 1


def test_preemption_frees_blocks_and_recomputes_later():
    # 4 blocks of 4 tokens: two sequences of 7 tokens fit (2 blocks each) until both grow past 8.
    sched = make_scheduler(num_blocks=4, block_size=4)
    a, b = make_seq(7, "a"), make_seq(7, "b")
    sched.add(a)
    sched.add(b)
    run_step(sched)  # both prefilled (7 computed, 8 known): 2 blocks each
    run_step(sched)  # 8 computed, 9 known: still 2 blocks each
    plan = run_step(sched)  # position 8 needs a third block each: b (latest) is preempted
    assert plan.preempted == [b]
    assert b.block_ids == [] and b.num_computed_tokens == 0 and sched.waiting[0] is b
    assert sched.kv_cache.num_free_blocks == 1
    sched.finish(a, "stop")
    plan = run_step(sched)  # b recomputes its prompt and its two generated tokens
    assert plan.scheduled[0].seq is b and plan.scheduled[0].num_new_tokens == 9
    sched.finish(b, "stop")
    assert sched.kv_cache.num_free_blocks == 4
    sched.kv_cache.pool.check_integrity()


def test_a_sequence_that_cannot_grow_while_the_rest_is_scheduled_preempts_itself():
    sched = make_scheduler(num_blocks=3, block_size=4)
    first, second = make_seq(4, "a"), make_seq(4, "b")
    sched.add(first)
    sched.add(second)
    run_step(sched)  # both prompts, one block each; one block left
    plan = run_step(sched)  # both need a second block: the first takes it, the second has no victim but itself
    assert [s.seq for s in plan.scheduled] == [first] and plan.preempted == [second]


def test_a_sequence_that_fills_the_whole_cache_is_not_scheduled_further():
    sched = make_scheduler(num_blocks=2, block_size=4)
    assert sched.max_seq_len == 8  # the cache, not max_model_len (1024), is the limit
    seq = make_seq(7)
    sched.add(seq)
    run_step(sched)  # 7 prompt tokens, then the 8th sampled: the engine finishes it for length
    plan = sched.schedule()
    assert plan.is_empty and not plan.preempted


def test_block_pool_accounting():
    pool = BlockPool(4)
    ids = pool.allocate(3)
    assert pool.num_free == 1 and sorted(ids) == [0, 1, 2]
    with pytest.raises(RuntimeError):
        pool.allocate(2)
    pool.release(ids)
    pool.check_integrity()
    with pytest.raises(RuntimeError, match="already free"):
        pool.release([ids[0]])
