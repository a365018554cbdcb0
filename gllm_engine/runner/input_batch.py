"""The step plan every rank receives, as deltas, and the per-rank mirror of sequence state.

The engine sends a sequence's prompt and sampling parameters once, then per step only what
changed: tokens appended since last time, and the block table when it changed. Each rank keeps
a `SeqState` mirror per sequence and rebuilds the model inputs from it, so ranks in other
processes never see the scheduler's objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

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


class HostUploader:
    """Copies a step's index arrays to the device: one pinned staging buffer and one copy per dtype.

    Two buffer sets alternate, each reused only after its previous copy finished (a CUDA event),
    so a copy still queued behind the last step's kernels is never overwritten.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._sets: list[dict[torch.dtype, torch.Tensor]] = [{}, {}]
        self._events: list[torch.cuda.Event | None] = [None, None]
        self._turn = 0

    def upload(self, int64_arrays: list[np.ndarray], int32_arrays: list[np.ndarray],
               into: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Device tensors with the arrays' shapes: int64 ones, then int32 ones.

        With `into` (a flat int64 and a flat int32 device tensor, e.g. a CUDA graph's static inputs), the
        arrays are copied to their starts, packed in order, and the views are of those tensors.
        """
        if self.device.type != "cuda":
            if into is not None:
                return (_copy_into(into[0], np.int64, int64_arrays), _copy_into(into[1], np.int32, int32_arrays))
            return ([torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)) for a in int64_arrays],
                    [torch.from_numpy(np.ascontiguousarray(a, dtype=np.int32)) for a in int32_arrays])
        turn, self._turn = self._turn, 1 - self._turn
        if self._events[turn] is not None:
            self._events[turn].synchronize()
        out = (self._copy(turn, torch.int64, int64_arrays, into[0] if into else None),
               self._copy(turn, torch.int32, int32_arrays, into[1] if into else None))
        self._events[turn] = torch.cuda.Event()
        self._events[turn].record()
        return out

    def _copy(self, turn: int, dtype: torch.dtype, arrays: list[np.ndarray],
              into: torch.Tensor | None) -> list[torch.Tensor]:
        total = sum(a.size for a in arrays)
        buf = self._sets[turn].get(dtype)
        if buf is None or buf.numel() < total:
            buf = self._sets[turn][dtype] = torch.empty(max(total, 2 * (buf.numel() if buf is not None else 4096)),
                                                        dtype=dtype, pin_memory=True)
        host = buf.numpy()
        offset = 0
        for a in arrays:
            host[offset:offset + a.size] = a.reshape(-1)
            offset += a.size
        if into is None:
            device_buf = buf[:total].to(self.device, non_blocking=True)
        else:
            device_buf = into
            device_buf[:total].copy_(buf[:total], non_blocking=True)
        return _views(device_buf, arrays)


def _copy_into(dest: torch.Tensor, np_dtype: type, arrays: list[np.ndarray]) -> list[torch.Tensor]:
    """CPU: `arrays` packed at the start of `dest`, as views of it."""
    packed = np.concatenate([np.asarray(a, dtype=np_dtype).reshape(-1) for a in arrays])
    dest[:packed.size].copy_(torch.from_numpy(packed))
    return _views(dest, arrays)


def _views(flat: torch.Tensor, arrays: list[np.ndarray]) -> list[torch.Tensor]:
    """Views of `flat` with the arrays' shapes, packed in order from its start."""
    views, offset = [], 0
    for a in arrays:
        views.append(flat[offset:offset + a.size].view(a.shape))
        offset += a.size
    return views


@dataclass
class StepArrays:
    """A step's model inputs on the host, unpadded: tokens, then requests (decodes first)."""

    input_ids: np.ndarray  # [T] int64
    positions: np.ndarray  # [T] int64
    slot_mapping: np.ndarray  # [T] int64
    logits_indices: np.ndarray  # [S] int64: token rows whose logits are sampled
    query_start_loc: np.ndarray  # [B+1] int32
    query_lens: np.ndarray  # [B] int32
    seq_lens: np.ndarray  # [B] int32
    block_tables: np.ndarray  # [B, W] int32
    num_decodes: int

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def num_requests(self) -> int:
        return len(self.seq_lens)
