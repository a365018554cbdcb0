"""Batch-forming policies: how many decodes and prefill tokens one (micro-)batch takes.

`ChunkedPrefillPolicy` takes every ready decode and fills the step's token budget with prefill.
`TokenThrottlePolicy` is gLLM's rule for pipelines of depth P (../shared/TOKEN_THROTTLING.md):
each of the P micro-batches in flight takes about D/P of the D running decodes, and prefill
tokens are admitted in proportion to the KV cache left after reserving room for running decodes
to grow, spread over about `iterp` iterations of waiting prefill.
"""

from __future__ import annotations

from dataclasses import dataclass

from gllm_engine.config import ThrottleConfig


@dataclass
class CacheState:
    """What a policy may look at when sizing a micro-batch."""

    num_free_blocks: int
    num_total_blocks: int
    block_size: int
    remaining_output_tokens: int  # sum over running sequences of tokens they may still generate
    num_waiting: int
    waiting_prefill_tokens: int  # tokens still to prefill, over waiting and partly prefilled sequences


class ChunkedPrefillPolicy:
    """Every ready decode, then prefill chunks up to the step's token budget."""

    # Whether decode_quota and prefill_budget look at their state arguments; when they don't, the
    # scheduler skips the per-step passes over running and waiting sequences that compute them.
    uses_state = False

    def decode_quota(self, num_running_decodes: int, max_rows: int) -> int:
        return max_rows

    def prefill_budget(self, state: CacheState | None, token_budget: int) -> int:
        return token_budget

    def on_step(self, preempted: bool) -> None:
        pass


class TokenThrottlePolicy:
    """gLLM's token throttling for `pp_size` micro-batches in flight."""

    uses_state = True

    def __init__(self, pp_size: int, config: ThrottleConfig | None = None):
        self.pp_size = pp_size
        self.config = config or ThrottleConfig()
        self.new_token_ratio = self.config.init_new_token_ratio
        # Rotating rounding offset: advances identically on every rank (never random).
        self._offset = 0

    def decode_quota(self, num_running_decodes: int, max_rows: int) -> int:
        p = self.pp_size
        if num_running_decodes < p:
            quota = 1
        else:
            quota = (num_running_decodes + self._offset) // p
        self._offset = (self._offset + 1) % p
        return min(quota, self.config.maxd, max_rows)

    def prefill_budget(self, state: CacheState, token_budget: int) -> int:
        cfg = self.config
        reserve_blocks = self.new_token_ratio * state.remaining_output_tokens / state.block_size
        fit = int(max(0.0, state.num_free_blocks - reserve_blocks)) * state.block_size
        if self.pp_size == 1:
            return min(cfg.maxp, fit, token_budget)
        free_ratio = state.num_free_blocks / state.num_total_blocks
        reserve_ratio = min(reserve_blocks / state.num_total_blocks, 0.99)
        prefill_ratio = max(0.0, (free_ratio - reserve_ratio) / (1.0 - reserve_ratio))
        budget = min(round(prefill_ratio * cfg.maxp), fit)
        if state.num_waiting > 1:
            budget = min(max(state.waiting_prefill_tokens // cfg.iterp, cfg.minp), budget)
        return min(budget, token_budget)

    def on_step(self, preempted: bool) -> None:
        cfg = self.config
        if preempted:
            self.new_token_ratio = min(1.0, self.new_token_ratio + cfg.new_token_ratio_step)
        else:
            self.new_token_ratio = max(cfg.min_new_token_ratio,
                                       self.new_token_ratio - cfg.new_token_ratio_decay)
