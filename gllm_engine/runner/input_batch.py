"""The step plan every rank receives, as deltas, and the per-rank mirror of sequence state.

The engine sends a sequence's prompt and sampling parameters once, then per step only what
changed: tokens appended since last time, and the block table when it changed. Each rank keeps
a `SeqState` mirror per sequence and rebuilds the model inputs from it, so ranks in other
processes never see the scheduler's objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from gllm_engine.sampling_params import SamplingParams


@dataclass
class SeqDelta:
    seq_id: int
    num_computed_tokens: int  # before this step
    num_new_tokens: int
    samples: bool
    new_token_ids: list[int]  # appended to the mirror's tokens (the whole prompt the first time)
    block_ids: list[int] | None  # the full table when it changed since the last step, else None
    num_prompt_tokens: int = 0  # first time only
    params: SamplingParams | None = None  # first time only


@dataclass
class StepPlan:
    """One (micro-)batch, decodes first, plus the sequences every rank may forget."""

    seqs: list[SeqDelta]
    num_decodes: int
    finished_seq_ids: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.seqs)


@dataclass
class SeqState:
    """A rank's mirror of one sequence."""

    seq_id: int
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    block_ids: list[int]
    block_array: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))  # block_ids, for numpy

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]


class InputBatch:
    """Rank side: applies plans to the mirror of every live sequence."""

    def __init__(self) -> None:
        self.seqs: dict[int, SeqState] = {}

    def apply(self, plan: StepPlan) -> list[SeqState]:
        """Update mirrors from `plan`; returns the states of its sequences, in plan order."""
        for seq_id in plan.finished_seq_ids:
            self.seqs.pop(seq_id, None)
        states = []
        for d in plan.seqs:
            state = self.seqs.get(d.seq_id)
            if state is None:
                state = self.seqs[d.seq_id] = SeqState(d.seq_id, list(d.new_token_ids), d.num_prompt_tokens,
                                                       d.params, [])
            else:  # a sequence's tokens only ever grow, preemption included
                state.token_ids.extend(d.new_token_ids)
            if d.block_ids is not None:
                state.block_ids = d.block_ids
                state.block_array = np.asarray(d.block_ids, dtype=np.int32)
            states.append(state)
        return states
