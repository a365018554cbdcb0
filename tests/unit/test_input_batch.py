"""The rank side of the step plan: mirrors with pending tokens, and aligned uploads of a step's arrays."""

from __future__ import annotations

import numpy as np
import torch

from gllm_engine.runner.input_batch import (
    ALIGN_BYTES,
    PENDING_TOKEN,
    HostUploader,
    InputBatch,
    SeqDelta,
    StepPlan,
    pack_layout,
)
from gllm_engine.sampling_params import SamplingParams


def test_pack_layout_starts_every_array_aligned():
    offsets, total = pack_layout([3, 1, 4, 0, 2], torch.int32.itemsize)
    assert offsets == [0, 4, 8, 12, 12] and total == 16
    offsets, total = pack_layout([5, 2], torch.int64.itemsize)
    assert offsets == [0, 6] and total == 8


def test_uploaded_views_are_aligned_and_hold_the_arrays():
    arrays64 = [np.arange(n, dtype=np.int64) for n in (3, 5, 1)]
    arrays32 = [np.arange(7, dtype=np.int32), np.arange(6, dtype=np.int32).reshape(2, 3)]
    for into in (None, (torch.zeros(64, dtype=torch.int64), torch.zeros(64, dtype=torch.int32))):
        views64, views32 = HostUploader(torch.device("cpu")).upload(arrays64, arrays32, into=into)
        for a, v in zip(arrays64 + arrays32, views64 + views32):
            assert v.data_ptr() % ALIGN_BYTES == 0 and v.shape == a.shape and (v.numpy() == a).all()


def test_a_pending_input_token_is_a_placeholder_until_its_step_reports():
    batch = InputBatch()
    params = SamplingParams()
    batch.apply(StepPlan([SeqDelta(7, 0, 3, True, [5, 6, 7], [0], 3, params)], 0))
    (state,) = batch.apply(StepPlan([SeqDelta(7, 3, 1, True, [], None)], 1))  # decode of the token being sampled
    assert state.token_ids == [5, 6, 7, PENDING_TOKEN]
    state.fill_sampled(3, 42)  # the first step's sample arrives
    state.fill_sampled(4, 43)  # not in the mirror yet: a later plan sends it
    assert state.token_ids == [5, 6, 7, 42]
