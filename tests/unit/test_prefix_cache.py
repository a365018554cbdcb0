"""Prefix caching in the block pool and scheduler, without a model."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gllm_engine.config import SchedulerConfig
from gllm_engine.core.kv_cache import KVCacheManager
from gllm_engine.core.request import Request
from gllm_engine.core.scheduler import Scheduler
from gllm_engine.sampling_params import SamplingParams
from tests.helpers import run_scheduled_step


def make_scheduler(num_blocks: int = 64, block_size: int = 4, budget: int = 64, max_num_seqs: int = 8):
    cfg = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, max_model_len=4096)
    return Scheduler(cfg, KVCacheManager(num_blocks, block_size, enable_prefix_caching=True))


def make_seq(tokens: list[int], rid: str = "r", n: int = 1, cache_salt: str | None = None):
    return Request.create(rid, tokens, SamplingParams(max_tokens=1000, n=n), cache_salt=cache_salt).seqs



def check_accounting(sched: Scheduler, live) -> None:
    pool = sched.kv_cache.pool
    pool.check_integrity()
    used = sum(1 for c in pool.ref_counts if c > 0)
    assert used + pool.num_free == pool.num_blocks
    assert sum(pool.ref_counts) == sum(len(s.block_ids) for s in live)


def test_second_identical_prompt_hits_all_full_blocks_but_the_last_token():
    sched = make_scheduler()
    prompt = list(range(100, 112))  # 12 tokens = 3 full blocks of 4
    (a,) = make_seq(prompt, "a")
    sched.add(a)
    run_scheduled_step(sched)
    (b,) = make_seq(prompt, "b")
    sched.add(b)
    plan = run_scheduled_step(sched)
    # Only 2 blocks may be reused: the last token must be computed to get logits.
    assert b.num_cached_tokens == 8 and b.block_ids[:2] == a.block_ids[:2]
    assert [s.num_new_tokens for s in plan.scheduled if s.seq is b] == [4]
    assert b.block_ids[2] != a.block_ids[2]


def test_only_requests_with_the_same_cache_salt_share_blocks():
    sched = make_scheduler()
    prompt = list(range(200, 212))
    seqs = [make_seq(prompt, rid, cache_salt=salt)[0]
            for rid, salt in (("plain", None), ("a1", "a"), ("a2", "a"), ("b", "b"), ("plain2", None))]
    for s in seqs:
        sched.add(s)
        run_scheduled_step(sched)
    assert [s.num_cached_tokens for s in seqs] == [0, 0, 8, 0, 8]
    plain, a1, a2, b, plain2 = seqs
    assert a2.block_ids[:2] == a1.block_ids[:2] and plain2.block_ids[:2] == plain.block_ids[:2]
    assert not set(b.block_ids) & (set(a1.block_ids) | set(plain.block_ids))
    check_accounting(sched, seqs)


def test_prompts_diverging_inside_a_block_share_only_the_blocks_before():
    sched = make_scheduler()
    (a,) = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], "a")
    (b,) = make_seq([1, 2, 3, 4, 5, 6, 0, 8, 9, 10], "b")
    sched.add(a)
    run_scheduled_step(sched)
    sched.add(b)
    run_scheduled_step(sched)
    assert b.num_cached_tokens == 4 and b.block_ids[0] == a.block_ids[0] and b.block_ids[1] != a.block_ids[1]


def test_freed_blocks_stay_reusable_until_evicted_lru():
    sched = make_scheduler(num_blocks=6)
    (a,) = make_seq(list(range(9)), "a")
    sched.add(a)
    run_scheduled_step(sched)
    sched.finish(a, "stop")
    assert sched.kv_cache.num_free_blocks == 6
    (b,) = make_seq(list(range(9)), "b")
    sched.add(b)
    run_scheduled_step(sched)
    assert b.num_cached_tokens == 8
    sched.finish(b, "stop")
    # Fill the whole pool with other content: the cached blocks are evicted, nothing breaks.
    (c,) = make_seq(list(range(50, 72)), "c")
    sched.add(c)
    run_scheduled_step(sched)
    sched.finish(c, "stop")
    (d,) = make_seq(list(range(9)), "d")
    sched.add(d)
    run_scheduled_step(sched)
    assert d.num_cached_tokens == 0
    check_accounting(sched, [d])


def test_parallel_samples_share_the_prompt_blocks():
    sched = make_scheduler()
    seqs = make_seq(list(range(13)), "p", n=3)
    for s in seqs:
        sched.add(s)
    run_scheduled_step(sched)
    first = [s.block_ids[:3] for s in seqs]
    assert first[0] == first[1] == first[2]
    assert sched.kv_cache.pool.ref_counts[first[0][0]] == 3
    check_accounting(sched, seqs)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "step", "step", "finish", "abort"]),
                          st.integers(0, 3), st.integers(1, 30)), min_size=1, max_size=40))
def test_random_workloads_keep_the_pool_consistent(ops):
    """add/step/finish/abort in any order, with a pool small enough to force eviction and preemption."""
    sched = make_scheduler(num_blocks=12, block_size=4, budget=16, max_num_seqs=4)
    prefixes = [[7] * 8, [7] * 4 + [8] * 4, list(range(12)), [3, 1, 4, 1, 5, 9, 2, 6]]
    live, counter = [], 0
    for op, which, length in ops:
        if op == "add":
            tokens = (prefixes[which] + [which + 20] * length)[: max(1, length)]
            if len(tokens) >= 40:
                continue
            seqs = make_seq(tokens, f"r{counter}", n=1 + which % 2)
            counter += 1
            for s in seqs:
                sched.add(s)
            live.extend(seqs)
        elif op == "step":
            run_scheduled_step(sched)
            for s in [s for s in live if s.num_tokens >= 48 and not s.finished]:
                sched.finish(s, "length")
        elif live:
            victim = live[which % len(live)]
            sched.finish(victim, "stop" if op == "finish" else "abort")
        live = [s for s in live if not s.finished]
        check_accounting(sched, live)
    for s in live:
        sched.finish(s, "abort")
    check_accounting(sched, [])
    assert sched.kv_cache.num_free_blocks == 12


def test_a_rolled_back_step_leaves_no_names_for_unwritten_blocks():
    sched = make_scheduler()
    (a,) = make_seq(list(range(100, 113)), "a")
    sched.add(a)
    plan = sched.schedule()  # names blocks 0..2 ahead of the forward pass
    assert len(sched.kv_cache.pool.cached) == 3
    sched.rollback(plan)  # the forward pass never ran (e.g. Ctrl-C)
    assert not sched.kv_cache.pool.cached and a.num_computed_tokens == 0 and sched.waiting[0] is a
    check_accounting(sched, [a])
    sched.finish(a, "abort")
    (b,) = make_seq(list(range(100, 113)), "b")
    sched.add(b)
    run_scheduled_step(sched)
    assert b.num_cached_tokens == 0  # nothing stale was reused
