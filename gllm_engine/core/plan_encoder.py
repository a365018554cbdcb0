"""Engine side of the step-plan contract: scheduler outputs become delta plans for the ranks."""

from __future__ import annotations

from gllm_engine.core.scheduler import SchedulerOutput
from gllm_engine.runner.input_batch import SeqDelta, StepPlan


class PlanEncoder:
    """Engine side: turns scheduler outputs into delta plans, remembering what ranks already know."""

    def __init__(self) -> None:
        self._sent_tokens: dict[int, int] = {}
        # Per sequence, its block list and length when last sent: the KV-cache manager only appends to
        # a sequence's list or replaces it, so an unchanged (list, length) pair means an unchanged table.
        self._sent_blocks: dict[int, tuple[list[int], int]] = {}
        self._finished: list[int] = []

    def forget(self, seq_id: int) -> None:
        """The sequence ended, or starts over after a rollback; ranks drop their mirror of it with the next plan."""
        if self._sent_tokens.pop(seq_id, None) is not None:
            self._sent_blocks.pop(seq_id, None)
            self._finished.append(seq_id)

    def encode(self, out: SchedulerOutput) -> StepPlan:
        deltas = []
        for s in out.scheduled:
            seq = s.seq
            known = self._sent_tokens.get(seq.seq_id)
            first = known is None
            upto = s.start + s.num_new_tokens
            # Up to `upto`; a pending token is not known yet, and the rank takes it from its last samples.
            new_tokens = seq.token_ids[0 if first else known:upto]
            blocks = None
            sent = self._sent_blocks.get(seq.seq_id)
            if sent is None or sent[0] is not seq.block_ids or sent[1] != len(seq.block_ids):
                blocks = list(seq.block_ids)
                self._sent_blocks[seq.seq_id] = (seq.block_ids, len(blocks))
            self._sent_tokens[seq.seq_id] = max(upto, known or 0)
            deltas.append(SeqDelta(seq.seq_id, s.start, s.num_new_tokens, s.samples, new_tokens,
                                   blocks, seq.num_prompt_tokens if first else 0, seq.params if first else None))
        plan = StepPlan(deltas, out.num_decodes, self._finished)
        self._finished = []
        return plan
