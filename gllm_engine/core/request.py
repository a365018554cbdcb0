"""A request and its sequences: the state the scheduler and the engine core share."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

from gllm_engine.outputs import Logprob
from gllm_engine.runner.input_batch import PromptThenOutput
from gllm_engine.sampling_params import SamplingParams


class SeqStatus(enum.Enum):
    """Where a sequence is in its life."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_seq_counter = itertools.count()


@dataclass(eq=False)
class Sequence(PromptThenOutput):
    """One of a request's `n` samples; the unit the scheduler batches.

    `token_ids` holds the prompt then the generated tokens known so far; `num_pending` more were
    sampled by steps still in flight. KV entries of the first `num_computed_tokens` tokens (counting
    the steps in flight, which the scheduler credits when it plans them) live in `block_ids`.
    """

    request_id: str
    index: int
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    seq_id: int = field(default_factory=lambda: next(_seq_counter))
    status: SeqStatus = SeqStatus.WAITING
    num_computed_tokens: int = 0
    num_pending: int = 0  # tokens sampled by steps in flight, not yet known here
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at first admission
    block_ids: list[int] = field(default_factory=list)
    # Prefix-cache naming progress (owned by core.kv_cache): blocks named so far, the last one's key.
    num_named_blocks: int = 0
    last_block_key: tuple | None = None
    num_preemptions: int = 0
    # Whatever else shapes this sequence's KV entries; only sequences with the same salt share cached blocks.
    cache_salt: str | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[dict[int, Logprob]] | None = None
    # Incremental detokenization state (owned by core.detokenizer).
    text: str = ""
    prefix_offset: int = 0
    read_offset: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    def max_output_tokens(self, max_len: int) -> int:
        """Output tokens it may have in all: its max_tokens, and no more than `max_len` tokens with the prompt."""
        limit = max_len - self.num_prompt_tokens
        max_tokens = self.params.max_tokens
        return limit if max_tokens is None or max_tokens > limit else max_tokens

    def at_length_limit(self, max_len: int, num_pending: int = 0) -> bool:
        """Whether the sequence has all the tokens it may have, counting `num_pending` tokens still being sampled."""
        return self.num_output_tokens + num_pending >= self.max_output_tokens(max_len)

    def output_tokens_left(self, max_len: int) -> int:
        """Tokens it may still generate, less those known or pending."""
        return max(0, self.max_output_tokens(max_len) - self.num_output_tokens - self.num_pending)


@dataclass(eq=False)
class Request:
    """A user request: one prompt, `n` sequences sampled from it."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence] = field(default_factory=list)
    arrival_time: float = field(default_factory=time.monotonic)

    @classmethod
    def create(cls, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
               prompt: str | None = None, cache_salt: str | None = None) -> Request:
        req = cls(request_id, prompt, list(prompt_token_ids), params)
        for i in range(params.n):
            child = params
            if params.n > 1 and params.seed is not None:
                # Distinct but reproducible streams for the n samples of a seeded request.
                child = SamplingParams(**{**params.__dict__, "n": 1, "seed": params.seed + i})
            req.seqs.append(Sequence(request_id, i, list(prompt_token_ids), len(prompt_token_ids), child,
                                     logprobs=[] if params.logprobs is not None else None, cache_salt=cache_salt))
        return req

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)
