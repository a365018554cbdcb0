"""CUDA-graph inputs: a step padded to a graph's size computes what the unpadded step computes.

On the CPU the padded inputs run eagerly through the reference kernels (what a graph replays, minus
the capture); on a GPU the engine with graphs gives the greedy tokens of the engine without.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from gllm_engine import LLM, SamplingParams
from gllm_engine.runner.cuda_graph import MAX_GRAPH_PREFILLS, GraphKey, StepGraphs, capture_sizes, kept_sizes
from gllm_engine.runner.input_batch import StepArrays
from tests.helpers import make_tiny_model_dir

PARAMS = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def staggered_prompts(vocab: int) -> list[dict]:
    """Prompts of many lengths: with a small token budget, prefill chunks share steps with decodes."""
    g = torch.Generator().manual_seed(0)
    return [{"prompt_token_ids": torch.randint(0, vocab, (3 + (11 * i) % 37,), generator=g).tolist()}
            for i in range(10)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir("Qwen3ForCausalLM", tmp_path_factory.mktemp("graphs"), with_tokenizer=False)


def test_capture_sizes():
    assert capture_sizes(8) == [1, 2, 4, 8]
    assert capture_sizes(40) == [1, 2, 4, 8, 16, 32, 40]
    sizes = capture_sizes(1024, min_size=16)
    assert sizes[0] == 16 and sizes[-1] == 1024 and 288 in sizes and 576 in sizes and 600 not in sizes


def test_kept_sizes_drop_graphs_a_larger_one_beats():
    # The layer's matmul microseconds cuBLASLt took on an H100 (benchmarks/measured/): 288, 352, 448 are slow.
    times = {256: 208.0, 288: 254.9, 320: 232.4, 352: 275.4, 384: 251.4, 416: 319.3, 448: 431.5, 480: 320.7,
             512: 313.4}
    assert kept_sizes(times) == [256, 320, 384, 416, 480, 512]
    assert kept_sizes({8: 1.0, 16: 1.02, 32: 1.0}) == [8, 16, 32]  # within the margin: the smaller graph stays
    assert kept_sizes({8: 2.0, 16: 3.0, 32: 1.0}) == [32]  # both pad on to the fastest
    assert kept_sizes({}) == []


def test_padded_graph_inputs_give_the_eager_hidden_states(model_dir):
    llm = LLM(str(model_dir), device="cpu", dtype="float32", skip_tokenizer_init=True, show_progress=False,
              max_num_seqs=8, max_num_batched_tokens=32)
    runner = llm.engine.executor.runner
    max_blocks = -(-llm.engine.config.model.max_model_len // runner.block_size)
    graphs = StepGraphs(runner.model, 8, 32, max_blocks, runner.prefill_block_m, runner.device)
    eager_inputs = runner.prepare_inputs
    checked: Counter = Counter()

    def fed(inputs):
        """The input ids with the pending tokens fed, as the runner does after preparing."""
        ids = inputs.input_ids.clone()
        if inputs.feed is not None:
            rows, sources = inputs.feed
            ids[rows] = runner.last_samples[0][sources]
            checked["fed"] += 1
        return ids

    def prepare_and_check(step):
        inputs = eager_inputs(step)
        key = graphs.pick(step)
        if key is not None:
            padded = graphs.load(key, step, runner.uploader)
            assert padded.input_ids.shape[0] == key.size >= step.num_tokens
            # Both runs store the same k/v in the same slots (padded tokens store nothing); the runner
            # then stores the real step's again.
            expected = runner.model(fed(inputs), inputs.positions, inputs.meta)
            got = runner.model(fed(padded), padded.positions, padded.meta)[:step.num_tokens]
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
            assert torch.equal(padded.logits_indices, inputs.logits_indices)
            checked[key.mixed] += 1
        return inputs
    runner.prepare_inputs = prepare_and_check
    outs = llm.generate(staggered_prompts(llm.engine.config.model.hf_config.vocab_size), PARAMS)
    assert all(len(o.outputs[0].token_ids) == PARAMS.max_tokens for o in outs)
    # Mixed and decode-only graphs both chosen, with pending input tokens (async scheduling).
    assert checked[True] >= 3 and checked[False] >= 3 and checked["fed"] >= 3, checked


def test_pick_falls_back_to_eager_when_a_step_does_not_fit(model_dir):
    llm = LLM(str(model_dir), device="cpu", dtype="float32", skip_tokenizer_init=True, show_progress=False)
    runner = llm.engine.executor.runner
    graphs = StepGraphs(runner.model, 4, 64, 8, runner.prefill_block_m, runner.device)

    def step(q_lens, num_decodes, width=2):
        t = sum(q_lens)
        z64 = np.zeros(t, dtype=np.int64)
        return StepArrays(z64, z64, z64, z64[:len(q_lens)], np.zeros(len(q_lens) + 1, dtype=np.int32),
                          np.array(q_lens, dtype=np.int32), np.array(q_lens, dtype=np.int32),
                          np.zeros((len(q_lens), width), dtype=np.int32), num_decodes)

    assert graphs.pick(step([1, 1, 1], 3)) == GraphKey(4, False)
    assert graphs.pick(step([1] * 5, 5)) is None  # more decodes than the largest decode graph
    assert graphs.pick(step([1, 20], 1)) == GraphKey(32, True)
    assert graphs.pick(step([1, 70], 1)) is None  # more tokens than the largest mixed graph
    assert graphs.pick(step([2] * (MAX_GRAPH_PREFILLS + 1), 0)) is None  # more prefill chunks than the tile map holds
    assert graphs.pick(step([1, 1], 2, width=9)) is None  # a wider block table than captured
    graphs.decode_sizes, graphs.mixed_sizes = [1, 4], [16, 48, 64]  # 2 and 32 dropped for slowness
    assert graphs.pick(step([1, 1], 2)) == GraphKey(4, False)  # pads on to the next size kept
    assert graphs.pick(step([1, 20], 1)) == GraphKey(48, True)


def test_timed_graphs_slower_than_a_larger_one_are_dropped(model_dir, monkeypatch):
    llm = LLM(str(model_dir), device="cpu", dtype="float32", skip_tokenizer_init=True, show_progress=False)
    runner = llm.engine.executor.runner
    graphs = StepGraphs(runner.model, 4, 64, 8, runner.prefill_block_m, runner.device)
    graphs.graphs = {GraphKey(s, False): object() for s in graphs.decode_sizes}  # no CUDA here: stand-ins
    graphs.graphs |= {GraphKey(s, True): object() for s in graphs.mixed_sizes}
    graphs.outputs = dict.fromkeys(graphs.graphs)
    slow = {GraphKey(2, False), GraphKey(32, True)}
    monkeypatch.setattr(StepGraphs, "_replay_ms", lambda self, key: 100.0 if key in slow else float(key.size))
    assert graphs._drop_slower_graphs() == sorted(slow)
    assert graphs.decode_sizes == [1, 4] and graphs.mixed_sizes == [16, 48, 64]
    assert set(graphs.graphs) == set(graphs.outputs) == {GraphKey(s, False) for s in (1, 4)} | {
        GraphKey(s, True) for s in (16, 48, 64)}


@pytest.mark.gpu
def test_graphs_keep_greedy_tokens_on_gpu(model_dir, monkeypatch):
    """float32 on the GPU: the same tokens with and without graphs, and both kinds of graph replayed."""
    replays: Counter = Counter()
    replay = StepGraphs.replay
    monkeypatch.setattr(StepGraphs, "replay", lambda self, key, n: replays.update([key.mixed]) or replay(self, key, n))

    def run(enforce_eager):
        llm = LLM(str(model_dir), device="cuda", dtype="float32", skip_tokenizer_init=True, show_progress=False,
                  max_num_seqs=8, max_num_batched_tokens=32, enforce_eager=enforce_eager, num_gpu_blocks_override=256)
        # the scheduler knows the decode sizes the runner kept (longest_first fills their rows)
        kept = () if enforce_eager else tuple(llm.engine.executor.runner.graphs.decode_sizes)
        assert tuple(llm.engine.scheduler.waiting.decode_batch_sizes) == kept
        outs = llm.generate(staggered_prompts(llm.engine.config.model.hf_config.vocab_size), PARAMS)
        return [o.outputs[0].token_ids for o in outs]

    eager = run(True)
    assert not replays
    assert run(False) == eager
    assert replays[True] >= 3 and replays[False] >= 3, replays
