"""Continuous batching with chunked prefill and recompute preemption.

There is no prefill or decode phase: every sequence has tokens computed and tokens known, and one
token budget per step covers decodes (first), unfinished prefill chunks, then new sequences; the
policy (`core.throttling`) decides how many of each a batch takes, and the waiting queue
(`core.waiting_queue`) in which order new sequences come and how many may run.
When blocks run out, the most recently admitted running sequence is preempted: its blocks are
freed and it waits, first in line, to be recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gllm_engine.config import SchedulerConfig
from gllm_engine.core.kv_cache import KVCacheManager
from gllm_engine.core.request import SeqStatus, Sequence
from gllm_engine.core.throttling import CacheState, ChunkedPrefillPolicy, TokenThrottlePolicy
from gllm_engine.core.waiting_queue import WaitingQueue


@dataclass
class ScheduledSeq:
    """One sequence's share of a step: compute `num_new_tokens` tokens from `start`."""

    seq: Sequence
    num_new_tokens: int
    start: int = field(init=False)  # tokens computed before this step
    # True when the chunk reaches the end of the tokens (known or pending), so its last logits are sampled.
    samples: bool = field(init=False)
    named_blocks: list[int] = field(default_factory=list)  # blocks this step completes and names

    def __post_init__(self) -> None:
        seq = self.seq
        self.start = seq.num_computed_tokens
        self.samples = self.start + self.num_new_tokens == len(seq.token_ids) + seq.num_pending


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

    A planned step is credited at once: its tokens count as computed, and a chunk that samples
    leaves its sequence a pending token. So the next step can be planned while this one runs:
    a later prefill chunk right away, and a decode of a pending token only when
    `decode_pending` says the runner takes that token from the device (one rank); otherwise it
    waits for the engine to collect the token. `decode_batch_sizes` are the sizes the runner pads
    decode-only steps to (its CUDA graphs), which `longest_first` admits up to (`core.waiting_queue`).
    Everything else about batch sizes is the policy's call (`core.throttling`).
    """

    def __init__(self, config: SchedulerConfig, kv_cache: KVCacheManager,
                 policy: ChunkedPrefillPolicy | TokenThrottlePolicy | None = None, *,
                 decode_pending: bool = False, decode_batch_sizes: tuple[int, ...] = ()):
        self.config = config
        self.kv_cache = kv_cache
        self.policy = policy or ChunkedPrefillPolicy()
        self.decode_pending = decode_pending
        self.running: list[Sequence] = []
        # A sequence must fit in the whole cache, or preempting everything else would not let it grow.
        self.max_seq_len = min(config.max_model_len, kv_cache.pool.num_blocks * kv_cache.block_size)
        self.waiting = WaitingQueue(config, self.max_seq_len, decode_batch_sizes)
        self.num_preemptions = 0

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.add(seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        decodes, prefills = [], []
        max_len = self.max_seq_len
        decode_pending = self.decode_pending
        for s in self.running:
            pending = s.num_pending
            # A pending token feeds a decode only from the device, and not where penalties must read
            # the whole output on the host.
            if pending and (not decode_pending or pending > 1 or s.params.has_penalties):
                continue
            # A sequence at a length limit is about to be finished by the engine: computing it further
            # would be wasted.
            if s.at_length_limit(max_len, pending):
                continue
            (decodes if len(s.token_ids) + pending - s.num_computed_tokens == 1 else prefills).append(s)
        uses_state = self.policy.uses_state
        num_running_decodes = (sum(1 for s in self.running if s.num_output_tokens + s.num_pending > 0)
                               if uses_state else 0)
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

        # Waiting sequences, in the queue's order, while budget, rows and blocks last.
        max_running = self.waiting.max_running(self.running) if prefill_budget > 0 else 0
        while (self.waiting and prefill_budget > 0 and len(self.running) < max_running
               and not out.preempted):
            seq = self.waiting[0]
            if seq.num_pending:  # preempted while its last step runs: wait for that step's token
                break
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
            self._add(out, seq, num_new)
            prefill_budget -= num_new

        # Decodes (one query token) first: the attention kernels split the batch there.
        out.scheduled.sort(key=lambda s: s.num_new_tokens > 1)
        out.num_decodes = sum(1 for s in out.scheduled if s.num_new_tokens == 1)
        for s in out.scheduled:  # credit the step: its tokens computed, its samples pending
            s.seq.num_computed_tokens += s.num_new_tokens
            s.seq.num_pending += s.samples
        self.policy.on_step(bool(out.preempted))
        return out

    def _add(self, out: SchedulerOutput, seq: Sequence, num_new: int) -> None:
        s = ScheduledSeq(seq, num_new)
        bs = self.kv_cache.block_size
        if seq.num_named_blocks * bs > s.start:  # remembered so that a rollback can unname them
            s.named_blocks = seq.block_ids[s.start // bs:seq.num_named_blocks]
        out.scheduled.append(s)

    def _grow(self, seq: Sequence, num_new: int, out: SchedulerOutput) -> bool:
        """Schedule `num_new` tokens of running `seq`, preempting later sequences for blocks if needed."""
        if seq.status is not SeqStatus.RUNNING:  # preempted earlier in this step
            return False
        while not self.kv_cache.allocate_slots(seq, num_new):
            scheduled = {id(s.seq) for s in out.scheduled}
            victim = next((v for v in reversed(self.running) if v is not seq and id(v) not in scheduled), seq)
            self._preempt(victim, out)
            if victim is seq:
                return False
        self._add(out, seq, num_new)
        return True

    def _cache_state(self) -> CacheState:
        max_len = self.config.max_model_len
        remaining_out = sum(s.output_tokens_left(max_len) for s in self.running)
        waiting_tokens = sum(s.num_tokens - s.num_computed_tokens for s in self.waiting)
        waiting_tokens += sum(s.num_tokens - s.num_computed_tokens for s in self.running
                              if not s.num_pending and s.num_tokens - s.num_computed_tokens > 1)
        return CacheState(num_free_blocks=self.kv_cache.num_free_blocks,
                          num_total_blocks=self.kv_cache.pool.num_blocks,
                          block_size=self.kv_cache.block_size, remaining_output_tokens=remaining_out,
                          num_waiting=len(self.waiting), waiting_prefill_tokens=waiting_tokens)

    def rollback(self, out: SchedulerOutput) -> None:
        """Undo a batch that was planned but never ran (interrupted): its sequences start over, their
        pending tokens are dropped, and the blocks it named lose their names (their KV was not written)."""
        for s in out.scheduled:
            for b in s.named_blocks:
                self.kv_cache.pool.unname(b)
            s.seq.num_pending = 0
            if s.seq.status is SeqStatus.RUNNING:
                self._preempt(s.seq, None)

    def _preempt(self, seq: Sequence, out: SchedulerOutput | None) -> None:
        self.running.remove(seq)
        self.kv_cache.free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SeqStatus.WAITING
        self.waiting.requeue(seq)
        self.num_preemptions += 1
        if out is not None:
            out.preempted.append(seq)

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
