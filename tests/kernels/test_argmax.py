"""The two-pass argmax kernel vs torch's argmax: ragged vocabularies, ties across chunks, NaN, -inf rows."""

from __future__ import annotations

import pytest
import torch

from gllm_engine.kernels import reference, sampling


@pytest.mark.parametrize("vocab", [100, 3 * sampling.ARGMAX_CHUNK + 17])
@pytest.mark.parametrize("rows", [1, 6])
@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # Triton's interpreter on the NaN row
def test_argmax_matches_torch(rows, vocab, device):
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(rows + vocab))
    if rows > 1:
        top = logits.max()
        logits[1, [vocab - 1, vocab // 2, 3]] = top + 1  # a tie across chunks: the first index wins
        logits[2, [vocab - 2, 7]] = float("nan")  # NaN counts as the largest value
        logits[3] = float("-inf")
        logits[4, vocab - 1] = float("inf")
    expected = reference.argmax(logits)
    actual = sampling.argmax(logits.to(device))
    assert actual.dtype == torch.int64 and torch.equal(actual.cpu(), expected)
