"""The waiting queue: the order in which waiting sequences are admitted, and how many may run at once.

`fcfs` admits in arrival order while fewer than `max_num_seqs` run. `longest_first` is for offline
batches whose max_tokens bound the outputs (as in throughput benchmarks): it admits the sequences with
the most tokens left to generate first, and only as many as it takes to finish all the work by the time
the longest one ends. Admitting everything at once instead runs a few hundred compute-bound steps of
~1,000 decodes, then a tail of steps so small that they cost little more than streaming the weights;
leveled, the same tokens fill that tail, where more rows cost little (ShareGPT on an H100:
benchmarks/RESULTS.md). Where the runner pads decode steps to CUDA-graph sizes, the leveled count is
rounded up to the size it would be padded to: those rows are computed anyway, and filled with
sequences they finish the work in fewer steps.

Under a steady stream of arrivals `longest_first` can keep a short sequence waiting behind later,
longer ones, which is why it is not the default. Sequences that were preempted go back to the front
under either order, to be recomputed first.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterator

from gllm_engine.config import SCHEDULING_POLICIES, SchedulerConfig
from gllm_engine.core.request import Sequence


class WaitingQueue:
    """Waiting sequences in admission order, preempted ones first."""

    def __init__(self, config: SchedulerConfig, max_len: int, decode_batch_sizes: tuple[int, ...] = ()):
        if config.scheduling_policy not in SCHEDULING_POLICIES:
            raise ValueError(f"unknown scheduling policy {config.scheduling_policy!r}")
        self.longest_first = config.scheduling_policy == "longest_first"
        self.max_num_seqs = config.max_num_seqs
        self.min_running = config.longest_first_min_running
        self.max_len = max_len
        self.decode_batch_sizes = sorted(decode_batch_sizes)
        self._queue: deque[Sequence] = deque()
        self._left: dict[int, int] = {}  # seq_id -> output tokens left; constant while a sequence waits
        self._left_total = 0

    def __len__(self) -> int:
        return len(self._queue)

    def __iter__(self) -> Iterator[Sequence]:
        return iter(self._queue)

    def __getitem__(self, i: int) -> Sequence:
        return self._queue[i]

    def __contains__(self, seq: Sequence) -> bool:
        return seq.seq_id in self._left

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence: last, or under `longest_first` after every one with as many tokens left."""
        left = self._track(seq)
        if not self.longest_first:
            self._queue.append(seq)
            return
        # Preempted sequences sort before every new one; new ones by tokens left, most first.
        i = bisect.bisect_right(self._queue, (1, -left),
                                key=lambda s: (0, 0) if s.num_preemptions else (1, -self._left[s.seq_id]))
        self._queue.insert(i, seq)

    def requeue(self, seq: Sequence) -> None:
        """Put a preempted sequence first in line."""
        self._track(seq)
        self._queue.appendleft(seq)

    def popleft(self) -> Sequence:
        seq = self._queue.popleft()
        self._left_total -= self._left.pop(seq.seq_id)
        return seq

    def remove(self, seq: Sequence) -> None:
        self._queue.remove(seq)
        self._left_total -= self._left.pop(seq.seq_id)

    def max_running(self, running: list[Sequence]) -> int:
        """How many sequences may run once this step admits: `max_num_seqs`, or under `longest_first` no
        more than the tokens left to generate, running and waiting, over the most any one sequence has
        left (the fewest steps that can finish them), and never fewer than `min_running`; then rounded up
        to the decode batch size a step of that many would be padded to.
        """
        if not self.longest_first or not self._queue:
            return self.max_num_seqs
        total, longest = self._left_total, 0
        for seq in self._queue:  # preempted first, then new ones, most tokens left first
            longest = max(longest, self._left[seq.seq_id])
            if not seq.num_preemptions:
                break
        max_len = self.max_len
        for seq in running:
            left = seq.output_tokens_left(max_len)
            total += left
            longest = max(longest, left)
        leveled = max(self.min_running, -(-total // max(longest, 1)))
        sizes = self.decode_batch_sizes
        i = bisect.bisect_left(sizes, leveled)
        return min(self.max_num_seqs, sizes[i] if i < len(sizes) else leveled)

    def _track(self, seq: Sequence) -> int:
        left = seq.output_tokens_left(self.max_len)
        self._left[seq.seq_id] = left
        self._left_total += left
        return left
