"""Tensor and pipeline parallelism on the CPU (gloo): same greedy tokens as one process, dead ranks reported.

Multi-node runs are in test_multinode.py."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from gllm_engine import LLM, SamplingParams
from gllm_engine.executor.comm import RankDiedError
from tests.helpers import make_tiny_model_dir

pytestmark = pytest.mark.distributed

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
PROMPTS = [{"prompt_token_ids": [(7 * i + 3 * j) % 250 + 1 for j in range(4 + 5 * i)]} for i in range(6)]


def engine(path, **kw) -> LLM:
    return LLM(str(path), device="cpu", dtype="float32", skip_tokenizer_init=True, show_progress=False, **kw)


def greedy_tokens(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]


def hf_greedy(path, prompt: list[int], steps: int) -> list[int]:
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen3ForCausalLM"])
def test_parallel_layouts_match_single_process_and_transformers(arch, tmp_path):
    # 4 layers (pp splits them), 4 heads / 2 KV heads (tp=2 splits both), tied embeddings across stages.
    path = make_tiny_model_dir(arch, tmp_path, with_tokenizer=False, num_hidden_layers=4, tie_word_embeddings=True)
    single = greedy_tokens(engine(path))
    assert single[0] == hf_greedy(path, PROMPTS[0]["prompt_token_ids"], 16)
    for tp, pp in [(2, 1), (1, 2), (2, 2)]:
        llm = engine(path, tensor_parallel_size=tp, pipeline_parallel_size=pp)
        try:
            assert greedy_tokens(llm) == single, f"tp={tp} pp={pp}"
            kv = llm.engine.kv_cache
            assert kv.num_free_blocks == kv.pool.num_blocks
        finally:
            llm.engine.shutdown()


def test_an_int8_kv_cache_splits_with_its_heads(tmp_path):
    """tp=2 x pp=2 with an int8 cache: each rank scales the KV heads it holds, so the greedy tokens are
    one process's with the same cache."""
    path = make_tiny_model_dir("LlamaForCausalLM", tmp_path, with_tokenizer=False, num_hidden_layers=4)
    single = greedy_tokens(engine(path, kv_cache_dtype="int8"))
    llm = engine(path, tensor_parallel_size=2, pipeline_parallel_size=2, kv_cache_dtype="int8")
    try:
        assert greedy_tokens(llm) == single
    finally:
        llm.engine.shutdown()


def test_uneven_layer_split(tmp_path):
    path = make_tiny_model_dir("LlamaForCausalLM", tmp_path, with_tokenizer=False, num_hidden_layers=4)
    single = greedy_tokens(engine(path))
    llm = engine(path, pipeline_parallel_size=2, pp_layer_split=[1, 3])
    try:
        assert greedy_tokens(llm) == single
    finally:
        llm.engine.shutdown()


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_a_killed_rank_is_reported_and_everything_stops(tmp_path, tp, pp):
    path = make_tiny_model_dir("LlamaForCausalLM", tmp_path, with_tokenizer=False, num_hidden_layers=4)
    llm = engine(path, tensor_parallel_size=tp, pipeline_parallel_size=pp)
    victim = llm.engine.executor.procs.procs[1]
    threading.Timer(0.5, lambda: os.kill(victim.pid, signal.SIGKILL)).start()
    start = time.monotonic()
    with pytest.raises(RankDiedError, match="rank 1 died"):
        llm.generate(PROMPTS * 4, SamplingParams(max_tokens=400, ignore_eos=True))
    assert time.monotonic() - start < 30
    assert not any(p.is_alive() for p in llm.engine.executor.procs.procs.values())
    kv = llm.engine.kv_cache
    assert kv.num_free_blocks == kv.pool.num_blocks and not llm.engine.has_unfinished_requests()


def test_one_rank_builds_none_of_the_parallel_machinery(tmp_path, monkeypatch):
    """tp=1, pp=1: no process group, no spawned rank, no collective, no micro-batch pipelining (only the
    async-scheduling step ahead)."""
    path = make_tiny_model_dir("LlamaForCausalLM", tmp_path, with_tokenizer=False)
    calls = []
    for name in ("init_process_group", "all_reduce", "all_gather", "isend", "recv"):
        monkeypatch.setattr(torch.distributed, name, lambda *a, _name=name, **k: calls.append(_name))
    llm = engine(path, tensor_parallel_size=1, pipeline_parallel_size=1)
    greedy_tokens(llm)
    assert type(llm.engine.executor).__name__ == "UniprocExecutor"
    assert llm.engine.max_in_flight == 2 and llm.engine.config.scheduler.schedule_method == "chunked_prefill"
    assert calls == [] and not torch.distributed.is_initialized()
