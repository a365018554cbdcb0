"""SamplingParams validation and the sampler's filters, penalties, seeds and logprobs."""

from __future__ import annotations

import pytest
import torch

from gllm_engine.runner.input_batch import SeqState
from gllm_engine.runner.sampler import SamplingBatch, _apply_penalties, sample
from gllm_engine.sampling_params import SamplingParams


@pytest.mark.parametrize("field,value", [
    ("n", 0), ("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2), ("min_p", 1.5),
    ("max_tokens", 0), ("min_tokens", -1), ("presence_penalty", 3.0), ("frequency_penalty", -2.5),
    ("repetition_penalty", 0.0), ("logprobs", 21), ("stop", [""]), ("stop_token_ids", [-1]),
])
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_min_tokens_above_max_tokens_is_rejected():
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=5, max_tokens=4)


def seqs_for(*params: SamplingParams, output=(5, 5, 6)):
    return [SeqState(seq_id=i, token_ids=[1, 2, 3, *output], num_prompt_tokens=3, params=p, block_ids=[])
            for i, p in enumerate(params)]


def run(logits, *params, generators=None, output=(5, 5, 6)):
    """Sample `logits` for sequences with the given params (prompt 1 2 3, outputs `output`)."""
    seqs = seqs_for(*params, output=output)
    batch = SamplingBatch.build(seqs, torch.device("cpu"), logits.shape[-1], generators or {})
    return sample(logits.clone(), batch).to_host()


def test_greedy_takes_the_argmax():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 1.0, 2.0]])
    assert run(logits, SamplingParams(temperature=0), SamplingParams(temperature=0)).token_ids == [1, 0]


def test_bfloat16_logits_are_sampled_as_their_float32_values():
    """Greedy rows take the argmax of the logits as they come; the rest widen them first."""
    logits = torch.randn(3, 300, generator=torch.Generator().manual_seed(0)).bfloat16()
    logits[1, 7] = logits[1, 200] = 9.0  # a tie: the first index wins, as in float32
    best = logits.float().argmax(dim=-1).tolist()
    greedy = SamplingParams(temperature=0)
    assert run(logits, greedy, greedy, greedy).token_ids == best and best[1] == 7
    out = run(logits, greedy, SamplingParams(temperature=0, logprobs=1), SamplingParams(top_k=1))
    assert out.token_ids == best
    assert out.logprobs[1][0] == pytest.approx(torch.log_softmax(logits.float(), -1)[1, 7].item())


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = torch.randn(2, 50)
    best = logits.argmax(dim=-1).tolist()
    for _ in range(5):
        assert run(logits, SamplingParams(top_k=1), SamplingParams(top_p=1e-6)).token_ids == best


def test_min_p_keeps_only_tokens_near_the_top():
    logits = torch.tensor([[10.0, 9.9, 0.0, 0.0, 0.0]])
    seen = {run(logits, SamplingParams(min_p=0.5)).token_ids[0] for _ in range(40)}
    assert seen <= {0, 1} and len(seen) == 2


def test_seeded_rows_repeat_regardless_of_batch():
    logits = torch.randn(3, 100)
    p = SamplingParams(temperature=1.0, seed=42)
    alone = [run(logits[:1], p).token_ids[0] for _ in range(3)]
    # The same logits row with the same seed, placed second in a batch: the same first draw.
    batched = run(torch.stack([logits[1], logits[0], logits[2]]), SamplingParams(), p, SamplingParams())
    assert alone == [alone[0]] * 3 and batched.token_ids[1] == alone[0]


def test_penalties_follow_vllm_semantics():
    logits = torch.tensor([[2.0, 2.0, -2.0, 0.0, 0.0, 1.0, 1.0]])
    # output tokens: 5, 5, 6; prompt 1, 2, 3
    seqs = seqs_for(SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25))
    batch = SamplingBatch.build(seqs, torch.device("cpu"), 7, {})
    x = logits.clone()
    _apply_penalties(x, batch)
    expected = torch.tensor([[2.0, 1.0, -4.0, 0.0, 0.0, 0.5 - 1.0 - 0.25, 0.5 - 0.5 - 0.25]])
    assert torch.allclose(x, expected)


def test_min_tokens_bans_eos_and_stop_ids():
    logits = torch.tensor([[0.0, 0.0, 9.0, 8.0]])
    p = SamplingParams(temperature=0, min_tokens=10, stop_token_ids=[3])
    p.eos_token_ids = (2,)
    assert run(logits, p).token_ids == [0]


def test_logprobs_hold_the_sampled_token_and_top_n():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    out = run(logits, SamplingParams(temperature=0, logprobs=2))
    lp, rank, ids, vals = out.logprobs[0]
    expected = torch.log_softmax(logits, -1)[0]
    assert out.token_ids == [1] and rank == 1 and ids == [1, 2]
    assert lp == pytest.approx(expected[1].item()) and vals[1] == pytest.approx(expected[2].item())
