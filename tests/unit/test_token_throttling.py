"""Token throttling: the policy's rules, and a simulated pipeline against greedy first-come micro-batching."""

from __future__ import annotations

from benchmarks.pipeline_balance import sharegpt_like_trace, simulate
from gllm_engine.config import ThrottleConfig
from gllm_engine.core.throttling import CacheState, TokenThrottlePolicy


def state(free=1000, total=1000, remaining_out=0, waiting=0, waiting_tokens=0) -> CacheState:
    return CacheState(num_free_blocks=free, num_total_blocks=total, block_size=16,
                      remaining_output_tokens=remaining_out, num_waiting=waiting, waiting_prefill_tokens=waiting_tokens)


def test_decodes_are_spread_over_the_micro_batches_with_a_rotating_offset():
    policy = TokenThrottlePolicy(pp_size=4)
    # 10 decodes over 4 micro-batches: offsets 0..3 give 2, 2, 3, 3 (sum 10), then the cycle repeats.
    assert [policy.decode_quota(10, 256) for _ in range(8)] == [2, 2, 3, 3, 2, 2, 3, 3]
    assert policy.decode_quota(3, 256) == 1  # fewer than P: one each
    assert TokenThrottlePolicy(2, ThrottleConfig(maxd=5)).decode_quota(100, 256) == 5
    assert TokenThrottlePolicy(2).decode_quota(100, 7) == 7


def test_prefill_budget_follows_free_cache_and_waiting_work():
    p = TokenThrottlePolicy(pp_size=2)
    # Empty cache, one waiting sequence: the whole maxp (8192), bounded by the step's budget.
    assert p.prefill_budget(state(waiting=1, waiting_tokens=5000), 100_000) == 8192
    assert p.prefill_budget(state(waiting=1, waiting_tokens=5000), 2048) == 2048
    # Half the cache free, no reserve: half of maxp.
    assert p.prefill_budget(state(free=500, waiting=1), 100_000) == 4096
    # Reserve 0.7 * 16000 / 16 = 700 blocks of 1000 free: prefill_ratio = (1 - 0.7) / (1 - 0.7) = 1 but only
    # 300 blocks (4800 tokens) fit.
    assert p.prefill_budget(state(remaining_out=16000, waiting=1), 100_000) == 4800
    # Several waiting: about 1/iterp of the waiting tokens per micro-batch, at least minp.
    assert p.prefill_budget(state(waiting=5, waiting_tokens=4000), 100_000) == 500
    assert p.prefill_budget(state(waiting=5, waiting_tokens=100), 100_000) == 32
    # Pipeline depth 1: plain chunked prefill, min(maxp, what fits).
    assert TokenThrottlePolicy(1).prefill_budget(state(free=100, waiting=5, waiting_tokens=4000), 100_000) == 1600


def test_reserve_ratio_rises_on_preemption_and_decays():
    p = TokenThrottlePolicy(pp_size=2)
    p.on_step(preempted=True)
    assert abs(p.new_token_ratio - 0.75) < 1e-9
    for _ in range(1000):
        p.on_step(preempted=False)
    assert abs(p.new_token_ratio - 0.1) < 1e-9


def test_simulated_pipeline_is_more_balanced_with_throttling():
    trace = sharegpt_like_trace(150, rate=50.0, seed=1)
    greedy = simulate(trace, pp=4, throttle=False)
    throttled = simulate(trace, pp=4, throttle=True)
    # Same work done either way.
    assert greedy.output_tokens == throttled.output_tokens == sum(r.output_len for r in trace)
    # Stage idle share within each round of 4 micro-batches: much smaller with throttling.
    assert throttled.bubble < 0.5 * greedy.bubble, (throttled.bubble, greedy.bubble)
    assert throttled.bubble < 0.2
