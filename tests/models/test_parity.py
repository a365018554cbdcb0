"""Tiny random models of every supported dense architecture against transformers, on the CPU in float32."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from gllm_engine import LLM, SamplingParams
from gllm_engine.core.plan_encoder import PlanEncoder
from gllm_engine.core.request import Request
from gllm_engine.core.scheduler import ScheduledSeq, SchedulerOutput
from tests.helpers import make_tiny_model_dir

ARCHS = ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"]
GREEDY_32 = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request, tmp_path_factory):
    """(architecture, model dir, transformers model) for one architecture."""
    arch = request.param
    overrides = {}
    if arch == "LlamaForCausalLM":  # exercise llama3 rope scaling and tied embeddings
        overrides = dict(tie_word_embeddings=True, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    path = make_tiny_model_dir(arch, tmp_path_factory.mktemp(arch), with_tokenizer=False, **overrides)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return arch, path, hf


def prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = [3 + (7 * i) % 29 for i in range(n)]
    return [torch.randint(0, vocab, (n_tok,), generator=g).tolist() for n_tok in lengths]


def hf_greedy(hf, prompt: list[int], steps: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(steps):
            nxt = hf(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return ids[0, len(prompt):].tolist()


def engine(path, **kw) -> LLM:
    return LLM(str(path), device="cpu", dtype="float32", skip_tokenizer_init=True, show_progress=False, **kw)


def token_prompts(ps):
    return [{"prompt_token_ids": p} for p in ps]


def test_logits_match_transformers(tiny):
    arch, path, hf = tiny
    llm = engine(path)
    runner = llm.engine.executor.runner
    prompt = prompts(1, hf.config.vocab_size, seed=1)[0] + list(range(1, 20))
    seq = Request.create("x", prompt, SamplingParams()).seqs[0]
    assert llm.engine.kv_cache.allocate_slots(seq, len(prompt))
    encoder = PlanEncoder()
    # Two chunks: the second attends to the first through the paged cache.
    logits = []
    for chunk in (10, len(prompt) - 10):
        plan = encoder.encode(SchedulerOutput([ScheduledSeq(seq, chunk)], num_decodes=0))
        step = runner.step_arrays(plan, runner.input_batch.apply(plan))
        inputs = runner.prepare_inputs(step)
        with torch.no_grad():
            logits.append(runner.model.compute_logits(runner.model(inputs.input_ids, inputs.positions, inputs.meta)))
        seq.num_computed_tokens += chunk
    ours = torch.cat(logits)
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0]
    rel = ((ours - ref).abs().max() / ref.abs().max()).item()
    assert rel < 1e-4, f"{arch}: relative logit error {rel}"


def test_greedy_tokens_match_transformers(tiny):
    arch, path, hf = tiny
    llm = engine(path)
    ps = prompts(3, hf.config.vocab_size, seed=2)
    outs = llm.generate(token_prompts(ps), GREEDY_32)
    for p, out in zip(ps, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, p, 32), arch
        assert out.outputs[0].finish_reason == "length"


def test_batching_chunking_and_preemption_do_not_change_greedy_outputs(tiny):
    arch, path, hf = tiny
    ps = prompts(9, hf.config.vocab_size, seed=3)
    alone = [engine(path).generate(token_prompts([p]), GREEDY_32)[0].outputs[0].token_ids for p in ps[:1]]
    batched = engine(path)
    outs = [o.outputs[0].token_ids for o in batched.generate(token_prompts(ps), GREEDY_32)]
    single = [o.outputs[0].token_ids for o in (batched.generate(token_prompts([p]), GREEDY_32)[0] for p in ps)]
    assert outs == single and outs[0] == alone[0]
    chunked = engine(path, max_num_batched_tokens=8, max_num_seqs=4)
    assert [o.outputs[0].token_ids for o in chunked.generate(token_prompts(ps), GREEDY_32)] == outs
    # 20 blocks of 4 tokens cannot hold 9 sequences of up to 63 tokens: preemption must kick in.
    tight = engine(path, block_size=4, num_gpu_blocks_override=20)
    assert [o.outputs[0].token_ids for o in tight.generate(token_prompts(ps), GREEDY_32)] == outs
    assert tight.engine.stats().num_preemptions > 0
    # Longest first, admissions leveled: sequences start in another order and later; each output is the
    # prefix of its 32-token one.
    lengths = [4 + 3 * i for i in range(len(ps))]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lengths]
    leveled = engine(path, scheduling_policy="longest_first", longest_first_min_running=2)
    leveled_tight = engine(path, scheduling_policy="longest_first", longest_first_min_running=2, block_size=4,
                           num_gpu_blocks_override=20)
    for llm in (leveled, leveled_tight):
        assert [o.outputs[0].token_ids for o in llm.generate(token_prompts(ps), params)] == \
            [out[:n] for out, n in zip(outs, lengths)]
    assert leveled_tight.engine.stats().num_preemptions > 0
    for llm in (batched, chunked, tight, leveled, leveled_tight):
        assert llm.engine.kv_cache.num_free_blocks == llm.engine.kv_cache.pool.num_blocks
        llm.engine.kv_cache.pool.check_integrity()


def test_seeded_sampling_is_reproducible_and_n_gives_n_outputs(tmp_path):
    llm = engine(make_tiny_model_dir("LlamaForCausalLM", tmp_path, with_tokenizer=False))
    ps = token_prompts(prompts(2, llm.config.model.hf_config.vocab_size, seed=4))
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=123, max_tokens=16, ignore_eos=True)
    first = [o.outputs[0].token_ids for o in llm.generate(ps, params)]
    again = [o.outputs[0].token_ids for o in llm.generate(ps[::-1], params)][::-1]
    assert first == again
    many = llm.generate(ps[:1], SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=16, ignore_eos=True))[0]
    assert [o.index for o in many.outputs] == [0, 1, 2, 3]
    assert len({tuple(o.token_ids) for o in many.outputs}) > 1
    assert all(len(o.token_ids) == 16 for o in many.outputs)


@pytest.mark.parametrize("kv_cache_dtype, cache_dtype", [("fp8", torch.float8_e4m3fn), ("int8", torch.int8)])
def test_8bit_kv_cache_quarters_a_float32_cache_and_keeps_greedy_outputs_invariant(kv_cache_dtype, cache_dtype,
                                                                                   tmp_path):
    """`kv_cache_dtype="fp8"` / `"int8"`: caches of one byte a value (int8 with a float32 scale per token
    and head); batching, chunking and preemption still leave every greedy output as it is alone, and the
    outputs stay close to the model dtype's (the first token of every prompt is the same)."""
    path = make_tiny_model_dir("LlamaForCausalLM", tmp_path, with_tokenizer=False)
    full = engine(path)
    small = engine(path, kv_cache_dtype=kv_cache_dtype)
    runner = small.engine.executor.runner
    layers = runner.model.attention_layers()
    assert all(a.k_cache.dtype == a.v_cache.dtype == cache_dtype for a in layers)
    scaled = cache_dtype == torch.int8
    assert all((a.k_scales is not None and a.k_scales.shape == a.k_cache.shape[:-1]) == scaled for a in layers)
    head_dim, scale_bytes = layers[0].head_dim, 4 if scaled else 0
    assert (runner.kv_block_bytes() * torch.float32.itemsize * head_dim
            == full.engine.executor.runner.kv_block_bytes() * (head_dim + scale_bytes))
    ps = prompts(6, small.config.model.hf_config.vocab_size, seed=5)
    outs = [o.outputs[0].token_ids for o in small.generate(token_prompts(ps), GREEDY_32)]
    single = [small.generate(token_prompts([p]), GREEDY_32)[0].outputs[0].token_ids for p in ps]
    tight = engine(path, kv_cache_dtype=kv_cache_dtype, block_size=4, num_gpu_blocks_override=16,
                   max_num_batched_tokens=8, max_num_seqs=4)
    assert [o.outputs[0].token_ids for o in tight.generate(token_prompts(ps), GREEDY_32)] == outs == single
    assert tight.engine.stats().num_preemptions > 0
    reference_outs = [o.outputs[0].token_ids for o in full.generate(token_prompts(ps), GREEDY_32)]
    assert [o[0] for o in outs] == [o[0] for o in reference_outs]
