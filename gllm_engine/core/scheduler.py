"""Continuous batching with chunked prefill and recompute preemption.

There is no prefill or decode phase: every sequence has tokens computed and tokens known, and one
token budget per step covers decodes (first), unfinished prefill chunks, then new sequences; the
policy (`core.throttling`) decides how many of each a batch takes.
When blocks run out, the most recently admitted running sequence is preempted: its blocks are
freed and it waits, first in line, to be recomputed.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from gllm_engine.config import SchedulerConfig
from gllm_engine.core.kv_cache import KVCacheManager
from gllm_engine.core.request import SeqStatus, Sequence
from gllm_engine.core.throttling import CacheState, ChunkedPrefillPolicy, TokenThrottlePolicy


@dataclass
class ScheduledSeq:
    """One sequence's share of a step: compute `num_new_tokens` tokens from `num_computed_tokens`."""

    seq: Sequence
    num_new_tokens: int
    # True when the chunk reaches the end of the known tokens, so its last logits are sampled.
    samples: bool = field(init=False)

    def __post_init__(self) -> None:
        self.samples = self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    """The plan of one step, decodes (one query token) first."""

    scheduled: list[ScheduledSeq] = field(default_factory=list)
    num_decodes: int = 0
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    """Forms each step's batch from running and waiting sequences.

    Sequences of a batch still being computed (a pipeline's micro-batches in flight) are
    skipped until `update` brings their results; everything else about batch sizes is the
    policy's call (`core.throttling`).
    """

    def __init__(self, config: SchedulerConfig, kv_cache: KVCacheManager,
                 policy: ChunkedPrefillPolicy | TokenThrottlePolicy | None = None):
        self.config = config
        self.kv_cache = kv_cache
        self.policy = policy or ChunkedPrefillPolicy()
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.in_flight: set[int] = set()  # seq_ids of scheduled batches not yet updated
        # A sequence must fit in the whole cache, or preempting everything else would not let it grow.
        self.max_seq_len = min(config.max_model_len, kv_cache.pool.num_blocks * kv_cache.block_size)
        self.num_preemptions = 0

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        in_flight = self.in_flight
        decodes, prefills = [], []
        max_len = self.max_seq_len
        for s in self.running:
            # A sequence at a length limit is about to be finished by the engine (which appends tokens
            # before it checks them): computing it further would be wasted.
            if s.seq_id in in_flight or s.at_length_limit(max_len):
                continue
            (decodes if len(s.token_ids) - s.num_computed_tokens == 1 else prefills).append(s)
        uses_state = self.policy.uses_state
        num_running_decodes = sum(1 for s in self.running if s.num_output_tokens > 0) if uses_state else 0
        quota = self.policy.decode_quota(num_running_decodes, min(budget, self.config.max_num_seqs))
        for seq in decodes[:quota]:
            if self._grow(seq, 1, out):
                budget -= 1

        prefill_budget = self.policy.prefill_budget(self._cache_state() if uses_state else None, budget)
        for seq in prefills:
            remaining = seq.num_tokens - seq.num_computed_tokens
            num_new = min(remaining, prefill_budget)
            if num_new == 0:
                continue
            if not self.config.enable_chunked_prefill and num_new < remaining:
                continue
            if self._grow(seq, num_new, out):
                prefill_budget -= num_new

        # Waiting sequences, first come first served, while budget, rows and blocks last.
        while (self.waiting and prefill_budget > 0 and len(self.running) < self.config.max_num_seqs
               and not out.preempted):
            seq = self.waiting[0]
            cached = self.kv_cache.find_cached_prefix(seq)
            num_cached = len(cached) * self.kv_cache.block_size
            remaining = seq.num_tokens - num_cached
            num_new = min(remaining, prefill_budget)
            if not self.config.enable_chunked_prefill and num_new < remaining:
                break
            if not self.kv_cache.allocate_slots(seq, num_new, cached):
                break
            self.waiting.popleft()
            self.kv_cache.record_lookup(seq.num_tokens, num_cached)
            if seq.num_preemptions == 0:
                seq.num_cached_tokens = num_cached
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, num_new))
            prefill_budget -= num_new

        # Decodes (one query token) first: the attention kernels split the batch there.
        out.scheduled.sort(key=lambda s: s.num_new_tokens > 1)
        out.num_decodes = sum(1 for s in out.scheduled if s.num_new_tokens == 1)
        self.in_flight.update(s.seq.seq_id for s in out.scheduled)
        self.policy.on_step(bool(out.preempted))
        return out

    def _grow(self, seq: Sequence, num_new: int, out: SchedulerOutput) -> bool:
        """Schedule `num_new` tokens of running `seq`, preempting later sequences for blocks if needed."""
        if seq.status is not SeqStatus.RUNNING:  # preempted earlier in this step
            return False
        while not self.kv_cache.allocate_slots(seq, num_new):
            scheduled = {id(s.seq) for s in out.scheduled}
            victim = next((v for v in reversed(self.running) if v is not seq and id(v) not in scheduled
                           and v.seq_id not in self.in_flight), seq)
            self._preempt(victim, out)
            if victim is seq:
                return False
        out.scheduled.append(ScheduledSeq(seq, num_new))
        return True

    def _cache_state(self) -> CacheState:
        max_len = self.config.max_model_len
        remaining_out = 0
        for s in self.running:
            limit = max_len - s.num_prompt_tokens
            if s.params.max_tokens is not None:
                limit = min(limit, s.params.max_tokens)
            remaining_out += max(0, limit - s.num_output_tokens)
        waiting_tokens = sum(s.num_tokens - s.num_computed_tokens for s in self.waiting)
        waiting_tokens += sum(s.num_tokens - s.num_computed_tokens for s in self.running
                              if s.num_tokens - s.num_computed_tokens > 1)
        return CacheState(num_free_blocks=self.kv_cache.num_free_blocks,
                          num_total_blocks=self.kv_cache.pool.num_blocks,
                          block_size=self.kv_cache.block_size, remaining_output_tokens=remaining_out,
                          num_waiting=len(self.waiting), waiting_prefill_tokens=waiting_tokens)

    def rollback(self, out: SchedulerOutput) -> None:
        """Undo a batch that was scheduled but never ran (interrupted): its sequences start over."""
        for s in out.scheduled:
            self.in_flight.discard(s.seq.seq_id)
            if s.seq.status is SeqStatus.RUNNING:
                self.kv_cache.unname_uncomputed(s.seq)
                self._preempt(s.seq, None)

    def _preempt(self, seq: Sequence, out: SchedulerOutput | None) -> None:
        self.running.remove(seq)
        self.kv_cache.free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        if out is not None:
            out.preempted.append(seq)

    def update(self, out: SchedulerOutput) -> None:
        """Advance computed-token counts after the batch ran (sampled tokens are appended by the caller)."""
        for s in out.scheduled:
            s.seq.num_computed_tokens += s.num_new_tokens
            self.in_flight.discard(s.seq.seq_id)

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        """End a sequence (stop, length or abort) and return its blocks."""
        if seq.finished:
            return
        seq.status = SeqStatus.FINISHED
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.kv_cache.free(seq)
