"""Scheduler and block pool, without a model: plans, budgets, preemption and block accounting."""

from __future__ import annotations

import pytest

from gllm_engine.config import SchedulerConfig
from gllm_engine.core.kv_cache import BlockPool, KVCacheManager
from gllm_engine.core.request import Request
from gllm_engine.core.scheduler import Scheduler
from gllm_engine.sampling_params import SamplingParams
from tests.helpers import run_scheduled_step


def make_scheduler(num_blocks: int = 64, block_size: int = 4, max_num_seqs: int = 8,
                   max_num_batched_tokens: int = 64, chunked: bool = True, policy: str = "fcfs",
                   min_running: int = 1, decode_batch_sizes: tuple[int, ...] = ()) -> Scheduler:
    cfg = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                          max_model_len=1024, enable_chunked_prefill=chunked, scheduling_policy=policy,
                          longest_first_min_running=min_running)
    return Scheduler(cfg, KVCacheManager(num_blocks, block_size), decode_batch_sizes=decode_batch_sizes)


def make_seq(prompt_len: int, rid: str = "r", max_tokens: int = 100):
    return Request.create(rid, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens)).seqs[0]


def run_to_completion(sched: Scheduler) -> list[tuple[int, list[str]]]:
    """Step until every sequence reaches its max_tokens; per step, how many ran and which were admitted."""
    steps, seen = [], set()
    while sched.num_unfinished:
        plan = run_scheduled_step(sched)
        new = [s.seq.request_id for s in plan.scheduled if s.seq.request_id not in seen]
        seen.update(new)
        steps.append((len(plan.scheduled), new))
        for seq in list(sched.running):
            if seq.at_length_limit(sched.max_seq_len):
                sched.finish(seq, "length")
    return steps



def test_prefill_then_decodes_first():
    sched = make_scheduler()
    a, b = make_seq(10, "a"), make_seq(6, "b")
    sched.add(a)
    run_scheduled_step(sched)  # a prefilled
    sched.add(b)
    plan = run_scheduled_step(sched)
    assert [(s.seq.request_id, s.num_new_tokens) for s in plan.scheduled] == [("a", 1), ("b", 6)]
    assert plan.num_decodes == 1
    assert all(s.samples for s in plan.scheduled)


def test_chunked_prefill_respects_budget_and_samples_only_at_the_end():
    sched = make_scheduler(max_num_batched_tokens=8)
    seq = make_seq(20)
    sched.add(seq)
    chunks = []
    while seq.num_output_tokens == 0:
        plan = run_scheduled_step(sched)
        assert plan.num_tokens <= 8
        chunks.append((plan.scheduled[0].num_new_tokens, plan.scheduled[0].samples))
    assert chunks == [(8, False), (8, False), (4, True)]
    assert seq.num_computed_tokens == 20 and seq.num_tokens == 21


def test_without_chunking_a_prompt_waits_for_a_whole_budget():
    sched = make_scheduler(max_num_batched_tokens=12, chunked=False)
    a, b = make_seq(8, "a"), make_seq(8, "b")
    sched.add(a)
    sched.add(b)
    plan = run_scheduled_step(sched)
    assert [s.seq.request_id for s in plan.scheduled] == ["a"]
    plan = run_scheduled_step(sched)
    assert [(s.seq.request_id, s.num_new_tokens) for s in plan.scheduled] == [("a", 1), ("b", 8)]


def test_max_num_seqs_limits_running():
    sched = make_scheduler(max_num_seqs=2)
    for i in range(3):
        sched.add(make_seq(3, str(i)))
    run_scheduled_step(sched)
    assert len(sched.running) == 2 and len(sched.waiting) == 1


def test_preemption_frees_blocks_and_recomputes_later():
    # 4 blocks of 4 tokens: two sequences of 7 tokens fit (2 blocks each) until both grow past 8.
    sched = make_scheduler(num_blocks=4, block_size=4)
    a, b = make_seq(7, "a"), make_seq(7, "b")
    sched.add(a)
    sched.add(b)
    run_scheduled_step(sched)  # both prefilled (7 computed, 8 known): 2 blocks each
    run_scheduled_step(sched)  # 8 computed, 9 known: still 2 blocks each
    plan = run_scheduled_step(sched)  # position 8 needs a third block each: b (latest) is preempted
    assert plan.preempted == [b]
    assert b.block_ids == [] and b.num_computed_tokens == 0 and sched.waiting[0] is b
    assert sched.kv_cache.num_free_blocks == 1
    sched.finish(a, "stop")
    plan = run_scheduled_step(sched)  # b recomputes its prompt and its two generated tokens
    assert plan.scheduled[0].seq is b and plan.scheduled[0].num_new_tokens == 9
    sched.finish(b, "stop")
    assert sched.kv_cache.num_free_blocks == 4
    sched.kv_cache.pool.check_integrity()


def test_a_sequence_that_cannot_grow_while_the_rest_is_scheduled_preempts_itself():
    sched = make_scheduler(num_blocks=3, block_size=4)
    first, second = make_seq(4, "a"), make_seq(4, "b")
    sched.add(first)
    sched.add(second)
    run_scheduled_step(sched)  # both prompts, one block each; one block left
    plan = run_scheduled_step(sched)  # both need a second block: the first gets it, the second has no victim but itself
    assert [s.seq for s in plan.scheduled] == [first] and plan.preempted == [second]


def test_a_sequence_that_fills_the_whole_cache_is_not_scheduled_further():
    sched = make_scheduler(num_blocks=2, block_size=4)
    assert sched.max_seq_len == 8  # the cache, not max_model_len (1024), is the limit
    seq = make_seq(7)
    sched.add(seq)
    run_scheduled_step(sched)  # 7 prompt tokens, then the 8th sampled: the engine finishes it for length
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


def test_a_planned_step_is_credited_at_once_and_its_sample_is_pending():
    sched = make_scheduler(max_num_batched_tokens=8)
    seq = make_seq(12)
    sched.add(seq)
    first = sched.schedule()
    assert (first.scheduled[0].start, seq.num_computed_tokens, seq.num_pending) == (0, 8, 0)
    second = sched.schedule()  # the next chunk can be planned while the first runs
    assert (second.scheduled[0].start, second.scheduled[0].num_new_tokens, second.scheduled[0].samples) == (8, 4, True)
    assert seq.num_pending == 1
    assert sched.schedule().is_empty  # without async decodes, the pending token waits for the engine


def test_async_decodes_take_one_pending_token_at_a_time():
    cfg = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=1024)
    sched = Scheduler(cfg, KVCacheManager(64, 4), decode_pending=True)
    seq = make_seq(6)
    penalised = Request.create("p", [1, 2, 3], SamplingParams(max_tokens=100, repetition_penalty=1.2)).seqs[0]
    sched.add(seq)
    sched.add(penalised)
    sched.schedule()  # both prompts
    plan = sched.schedule()
    # The decode of the pending token (the runner feeds it); penalties need the token on the host first.
    assert [(s.seq, s.start, s.samples) for s in plan.scheduled] == [(seq, 6, True)]
    assert (seq.num_pending, seq.num_computed_tokens) == (2, 7)
    assert sched.schedule().is_empty  # never two pending tokens deep
    seq.num_pending -= 1
    seq.token_ids.append(40)  # the engine collected the first step
    assert [s.seq for s in sched.schedule().scheduled] == [seq]


def test_a_block_ending_in_a_pending_token_is_named_once_the_token_is_known():
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=1024),
                      KVCacheManager(64, 4, enable_prefix_caching=True), decode_pending=True)
    seq = make_seq(7)  # tokens 1..7: block 0 full, block 1 holds 5, 6, 7
    sched.add(seq)
    sched.schedule()
    pool = sched.kv_cache.pool
    assert len(pool.cached) == 1
    sched.schedule()  # computes position 7, whose token is still being sampled: block 1 stays unnamed
    assert len(pool.cached) == 1 and seq.num_named_blocks == 1
    seq.num_pending -= 1
    seq.token_ids.append(99)
    sched.schedule()
    assert seq.num_named_blocks == 2 and pool.keys[seq.block_ids[1]][1] == (5, 6, 7, 99)


def test_rolling_back_steps_in_flight_unnames_their_blocks_and_drops_pending_tokens():
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=1024),
                      KVCacheManager(64, 4, enable_prefix_caching=True), decode_pending=True)
    seq = make_seq(9, "a")
    other = Request.create("b", [50, 51, 52, 53], SamplingParams(max_tokens=100)).seqs[0]
    sched.add(seq)
    first = sched.schedule()
    sched.add(other)
    second = sched.schedule()  # seq's pending decode and other's prompt
    assert len(sched.kv_cache.pool.cached) == 3
    for plan in (first, second):
        sched.rollback(plan)
    pool = sched.kv_cache.pool
    assert not pool.cached and pool.num_free == pool.num_blocks
    assert [s.num_pending for s in (seq, other)] == [0, 0] and list(sched.waiting) == [other, seq]
    pool.check_integrity()


def test_longest_first_orders_by_max_tokens_and_keeps_preempted_sequences_first():
    sched = make_scheduler(policy="longest_first")
    seqs = {rid: make_seq(4, rid, n) for rid, n in (("a", 5), ("b", 20), ("c", 5), ("d", 50), ("e", 20))}
    for seq in seqs.values():
        sched.add(seq)
    assert [s.request_id for s in sched.waiting] == ["d", "b", "e", "a", "c"]  # ties in arrival order
    sched.waiting.remove(seqs["b"])
    assert seqs["b"] not in sched.waiting and len(sched.waiting) == 4
    sched.add(seqs["b"])
    assert [s.request_id for s in sched.waiting] == ["d", "e", "b", "a", "c"]
    late = make_seq(4, "late", 10)
    late.num_preemptions = 1
    sched.waiting.requeue(late)
    sched.add(make_seq(4, "f", 99))
    assert [s.request_id for s in sched.waiting] == ["late", "f", "d", "e", "b", "a", "c"]


def test_longest_first_spreads_admissions_over_the_longest_sequence_and_still_ends_with_it():
    lengths = {"long": 12, "m1": 6, "m2": 6, "s1": 3, "s2": 3, "s3": 3}  # 33 tokens over 12 steps: 3 at a time
    level = make_scheduler(policy="longest_first", min_running=1)
    fcfs = make_scheduler()
    for sched in (level, fcfs):
        for rid, n in lengths.items():
            sched.add(make_seq(2, rid, n))
    leveled, at_once = run_to_completion(level), run_to_completion(fcfs)
    assert at_once[0] == (6, list(lengths))
    assert leveled[0] == (3, ["long", "m1", "m2"])
    assert max(n for n, _ in leveled) == 3  # never more than the level
    assert len(leveled) == len(at_once) == 12  # the longest sequence still starts at once and sets the end
    assert level.kv_cache.num_free_blocks == level.kv_cache.pool.num_blocks


def test_longest_first_admits_up_to_its_minimum_without_holding_back():
    sched = make_scheduler(policy="longest_first", min_running=4)
    for rid, n in (("long", 40), ("a", 2), ("b", 2), ("c", 2), ("d", 2)):
        sched.add(make_seq(2, rid, n))
    plan = run_scheduled_step(sched)
    assert [s.seq.request_id for s in plan.scheduled] == ["long", "a", "b", "c"]


def test_longest_first_levels_over_the_most_any_sequence_has_left_preempted_ones_included():
    sched = make_scheduler(policy="longest_first", min_running=1)
    back = make_seq(4, "back", 50)
    back.num_preemptions = 1
    sched.waiting.requeue(back)
    for rid in ("a", "b"):
        sched.add(make_seq(4, rid, 10))
    assert sched.waiting.max_running([]) == 2  # 70 tokens left over the 50 of the longest
    running = make_seq(4, "run", 200)
    assert sched.waiting.max_running([running]) == 2  # 270 over 200
    fcfs = make_scheduler()
    fcfs.add(make_seq(4, "x", 10))
    assert fcfs.waiting.max_running([running]) == 8  # fcfs: max_num_seqs


def test_longest_first_fills_the_rows_its_decode_steps_are_padded_to():
    lengths = {"long": 12, "m1": 6, "m2": 6, "s1": 3, "s2": 3, "s3": 3}  # leveled: 3 at a time
    graphs = make_scheduler(policy="longest_first", decode_batch_sizes=(1, 2, 4, 8))
    for rid, n in lengths.items():
        graphs.add(make_seq(2, rid, n))
    assert graphs.waiting.max_running([]) == 4  # 3 would run padded to 4
    steps = run_to_completion(graphs)
    assert steps[0] == (4, ["long", "m1", "m2", "s1"])
    assert len(steps) == 12  # still ends with the longest
    capped = make_scheduler(policy="longest_first", max_num_seqs=3, decode_batch_sizes=(1, 2, 4, 8))
    beyond = make_scheduler(policy="longest_first", decode_batch_sizes=(1, 2))
    for sched in (capped, beyond):
        for rid, n in lengths.items():
            sched.add(make_seq(2, rid, n))
    assert capped.waiting.max_running([]) == 3  # never past max_num_seqs
    assert beyond.waiting.max_running([]) == 3  # past the largest graph: eager, nothing to fill
