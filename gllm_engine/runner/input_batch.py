"""The step plan every rank receives, as deltas, and the per-rank mirror of sequence state.

The engine sends a sequence's prompt and sampling parameters once, then per step only what
changed: tokens appended since last time, and the block table when it changed. Each rank keeps
a `SeqState` mirror per sequence and rebuilds the model inputs from it, so ranks in other
processes never see the scheduler's objects. With async scheduling a decode's input token may
still be pending (sampled by the step before, not yet on the host): the mirror holds
`PENDING_TOKEN` there until that step's samples arrive, and the runner feeds the token on the device.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from gllm_engine.layers.attention import AttentionMetadata
from gllm_engine.sampling_params import SamplingParams

PENDING_TOKEN = -1  # a mirror's placeholder for a token the previous step is sampling


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


class PromptThenOutput:
    """`token_ids` holds the prompt (its first `num_prompt_tokens`) then the generated tokens."""

    token_ids: list[int]
    num_prompt_tokens: int

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]


@dataclass
class SeqState(PromptThenOutput):
    """A rank's mirror of one sequence."""

    seq_id: int
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    block_ids: list[int]
    block_array: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))  # block_ids, for numpy

    def fill_sampled(self, pos: int, token: int) -> None:
        """Put a sampled token in at `pos` if the mirror already reaches it (holding `PENDING_TOKEN`);
        a token past its end arrives with a later plan."""
        if pos < len(self.token_ids):
            self.token_ids[pos] = token


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
            missing = d.num_computed_tokens + d.num_new_tokens - len(state.token_ids)
            if missing > 0:
                state.token_ids.extend([PENDING_TOKEN] * missing)
            if d.block_ids is not None:
                state.block_ids = d.block_ids
                state.block_array = np.asarray(d.block_ids, dtype=np.int32)
            states.append(state)
        return states


ALIGN_BYTES = 16  # Triton compiles a kernel variant per pointer alignment: every packed array starts aligned


def pack_layout(sizes: list[int], itemsize: int) -> tuple[list[int], int]:
    """Element offsets of arrays of `sizes` packed in order, each starting `ALIGN_BYTES`-aligned, and the
    total length; so a step's index arrays never give a kernel a pointer of a new alignment."""
    unit = ALIGN_BYTES // itemsize
    offsets, end = [], 0
    for n in sizes:
        offsets.append(end)
        end += -(-n // unit) * unit
    return offsets, end


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
        arrays are copied into them as `pack_layout` places them, and the views are of those tensors.
        """
        if self.device.type != "cuda":
            return (_pack_on_cpu(int64_arrays, torch.int64, into[0] if into else None),
                    _pack_on_cpu(int32_arrays, torch.int32, into[1] if into else None))
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
        offsets, total = pack_layout([a.size for a in arrays], dtype.itemsize)
        buf = self._sets[turn].get(dtype)
        if buf is None or buf.numel() < total:
            buf = self._sets[turn][dtype] = torch.empty(max(total, 2 * (buf.numel() if buf is not None else 4096)),
                                                        dtype=dtype, pin_memory=True)
        _pack(buf.numpy(), arrays, offsets)
        if into is None:
            device_buf = buf[:total].to(self.device, non_blocking=True)
        else:
            device_buf = into
            device_buf[:total].copy_(buf[:total], non_blocking=True)
        return _views(device_buf, arrays, offsets)


def _pack_on_cpu(arrays: list[np.ndarray], dtype: torch.dtype, into: torch.Tensor | None) -> list[torch.Tensor]:
    """CPU: `arrays` as `pack_layout` places them, in `into` or a new tensor, as views of it."""
    offsets, total = pack_layout([a.size for a in arrays], dtype.itemsize)
    flat = into if into is not None else torch.empty(total, dtype=dtype)
    _pack(flat.numpy(), arrays, offsets)
    return _views(flat, arrays, offsets)


def _pack(host: np.ndarray, arrays: list[np.ndarray], offsets: list[int]) -> None:
    for a, offset in zip(arrays, offsets):
        host[offset:offset + a.size] = a.reshape(-1)


def _views(flat: torch.Tensor, arrays: list[np.ndarray], offsets: list[int]) -> list[torch.Tensor]:
    """Views of `flat` with the arrays' shapes, at `offsets`."""
    return [flat[offset:offset + a.size].view(a.shape) for a, offset in zip(arrays, offsets)]


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
    # Decode rows whose input token is pending, and each one's row in the previous step's samples.
    feed_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    feed_sources: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def num_requests(self) -> int:
        return len(self.seq_lens)

    def feed_arrays(self) -> list[np.ndarray]:
        """`[feed_rows, feed_sources]`, uploaded after a step's other int64 arrays; [] when nothing is fed."""
        return [self.feed_rows, self.feed_sources] if self.feed_rows.size else []


class ModelInputs(NamedTuple):
    """A step's inputs on the device."""

    input_ids: torch.Tensor  # [T] int64 (pending tokens still to be fed)
    positions: torch.Tensor  # [T] int64
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # [S] int64
    feed: tuple[torch.Tensor, torch.Tensor] | None  # StepArrays.feed_rows, feed_sources; None without any
