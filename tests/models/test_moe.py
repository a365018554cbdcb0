"""Tiny random MoE models (Qwen2-MoE, Qwen3-MoE, Mixtral) against transformers, on the CPU in float32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

from gllm_engine import LLM, SamplingParams
from gllm_engine.layers.attention import AttentionMetadata, prefill_tile_map
from gllm_engine.layers.moe import FusedMoE, select_experts
from gllm_engine.layers.ops import REFERENCE_OPS
from gllm_engine.layers.parallel import ALL_EXPERTS, EPLayout, TPLayout
from gllm_engine.models.mixtral import MixtralForCausalLM
from gllm_engine.models.qwen_moe import QwenMoeForCausalLM

SHAPE = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=300,
             max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
# architecture -> (config class, our class, config values): a shared expert and q/k/v bias (Qwen2-MoE),
# a dense layer amid sparse ones and renormalised top-k with qk-norm (Qwen3-MoE), Mixtral's names.
TINY = {
    "Qwen2MoeForCausalLM": (Qwen2MoeConfig, QwenMoeForCausalLM, dict(
        num_hidden_layers=2, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=48, intermediate_size=96, norm_topk_prob=False)),
    "Qwen3MoeForCausalLM": (Qwen3MoeConfig, QwenMoeForCausalLM, dict(
        num_hidden_layers=3, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48,
        intermediate_size=96, norm_topk_prob=True, mlp_only_layers=[1])),
    "MixtralForCausalLM": (MixtralConfig, MixtralForCausalLM, dict(
        num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2, intermediate_size=64)),
}
GREEDY_32 = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
BLOCK_SIZE, MAX_BLOCKS = 4, 16  # per sequence, in the hand-built caches
# With `sharpen`: router logits of std ~4 and LM-head logits of std ~6 (instead of ~0.16 each), so the
# experts a token picks and its greedy token win by wide margins.
SHARPEN = {"mlp.gate.weight": 25.0, "lm_head.weight": 40.0}


def make_moe_dir(arch: str, path: Path, seed: int = 0, *, sharpen: bool = False, **overrides) -> Path:
    """A tiny random `arch` checkpoint in `path`; `sharpen` scales the router and LM head up (see SHARPEN).

    Random tiny models have near-tied router and LM-head logits; a parallel layout sums in another
    order, and a tie flipped by 1e-7 changes the expert or the token. Sharpened models compare strictly.
    """
    config_cls, _, values = TINY[arch]
    config = config_cls(**{**SHAPE, **values, "architectures": [arch], **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if sharpen:
        with torch.no_grad():
            for name, param in model.named_parameters():
                for suffix, factor in SHARPEN.items():
                    if name.endswith(suffix):
                        param.mul_(factor)
    model.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module", params=list(TINY))
def tiny(request, tmp_path_factory):
    """(architecture, model dir, transformers model) for one architecture."""
    arch = request.param
    path = make_moe_dir(arch, tmp_path_factory.mktemp(arch))
    return arch, path, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def load_ours(arch: str, path: Path, num_seqs: int):
    """Our model built directly, loaded from the checkpoint, with caches for `num_seqs` sequences."""
    hf_config = AutoConfig.from_pretrained(path)
    model = TINY[arch][1](hf_config, max_positions=hf_config.max_position_embeddings, architecture=arch).eval()
    loaded = model.load_weights(load_file(str(path / "model.safetensors")).items())
    assert loaded == {name for name, _ in model.named_parameters()}
    for attn in model.attention_layers():
        shape = (num_seqs * MAX_BLOCKS, BLOCK_SIZE, attn.num_kv_heads, attn.head_dim)
        attn.bind_kv_cache(torch.zeros(shape), torch.zeros(shape))
    return model


def step_inputs(seqs: list[list[int]], chunks: list[tuple[int, int, int]]):
    """Input ids, positions and metadata of one step; chunks are (sequence, first position, tokens), decodes first.

    Sequence s owns cache blocks `[s * MAX_BLOCKS, (s + 1) * MAX_BLOCKS)`.
    """
    ids, positions, slots, q_lens, seq_lens, tables = [], [], [], [], [], []
    for s, start, n in chunks:
        ids += seqs[s][start:start + n]
        positions += range(start, start + n)
        slots += [s * MAX_BLOCKS * BLOCK_SIZE + p for p in range(start, start + n)]
        q_lens.append(n)
        seq_lens.append(start + n)
        tables.append(list(range(s * MAX_BLOCKS, (s + 1) * MAX_BLOCKS)))
    num_decodes = next((i for i, n in enumerate(q_lens) if n != 1), len(q_lens))
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    tiles = None
    if num_decodes < len(q_lens):
        tiles = torch.from_numpy(prefill_tile_map(np.array(q_lens[num_decodes:]), np.array(seq_lens[num_decodes:]),
                                                  REFERENCE_OPS.prefill_block_m(0, torch.float32), num_decodes))
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots), query_start_loc=cu, seq_lens=lens,
        block_tables=torch.tensor(tables, dtype=torch.int32), decode_seq_lens=lens[:num_decodes],
        prefill_tiles=tiles, num_decodes=num_decodes)
    return torch.tensor(ids), torch.tensor(positions), meta


def random_prompts(n: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (4 + (11 * i) % 23,), generator=g).tolist() for i in range(n)]


def test_logits_match_transformers_through_chunked_and_mixed_steps(tiny):
    arch, path, hf = tiny
    model = load_ours(arch, path, num_seqs=3)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (22, 11, 31)]
    # Two prefills; a decode beside a prefill chunk continuing a cached one and a fresh prompt; three decodes.
    steps = [[(0, 0, 12), (1, 0, 9)], [(1, 9, 1), (0, 12, 9), (2, 0, 30)], [(0, 21, 1), (1, 10, 1), (2, 30, 1)]]
    ours: dict[int, list[torch.Tensor]] = {0: [], 1: [], 2: []}
    with torch.no_grad():
        for chunks in steps:
            logits = model.compute_logits(model(*step_inputs(seqs, chunks)))
            start = 0
            for s, _, n in chunks:
                ours[s].append(logits[start:start + n])
                start += n
        for s, seq in enumerate(seqs):
            ref = hf(torch.tensor([seq])).logits[0]
            got = torch.cat(ours[s])
            rel = ((got - ref).abs().max() / ref.abs().max()).item()
            assert rel < 1e-4, f"{arch} sequence {s}: relative logit error {rel}"


def test_stacked_expert_tensors_load_like_per_expert_ones(tiny):
    """transformers' in-memory layout (all experts of a layer in one tensor) loads to the same parameters."""
    arch, path, hf = tiny
    from_file = load_ours(arch, path, num_seqs=1)
    hf_config = hf.config
    from_memory = TINY[arch][1](hf_config, max_positions=hf_config.max_position_embeddings, architecture=arch)
    state = hf.state_dict()
    assert any(name.endswith("experts.gate_up_proj") for name in state)
    assert from_memory.load_weights(state.items()) == {name for name, _ in from_memory.named_parameters()}
    expected = dict(from_file.named_parameters())
    for name, param in from_memory.named_parameters():
        assert torch.equal(param, expected[name]), name


def test_sparse_layers_follow_decoder_sparse_step_and_mlp_only_layers(tmp_path):
    path = make_moe_dir("Qwen3MoeForCausalLM", tmp_path, num_hidden_layers=6, decoder_sparse_step=2,
                        mlp_only_layers=[3])
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ours = load_ours("Qwen3MoeForCausalLM", path, num_seqs=1)
    hf_sparse = [hasattr(layer.mlp, "experts") for layer in hf.model.layers]
    assert [hasattr(layer.mlp, "experts") for layer in ours.model.layers] == hf_sparse
    assert hf_sparse == [False, True, False, False, False, True]


@pytest.mark.parametrize("renormalize", [False, True])
def test_select_experts_is_softmax_top_k(renormalize):
    logits = torch.randn(9, 6, generator=torch.Generator().manual_seed(2))
    weights, ids = select_experts(logits, 2, renormalize)
    probs = logits.softmax(-1)
    assert torch.equal(ids, probs.argsort(-1, descending=True)[:, :2])
    expected = probs.gather(1, ids)
    if renormalize:
        expected = expected / expected.sum(-1, keepdim=True)
    torch.testing.assert_close(weights, expected)


@pytest.mark.parametrize("tp_size,ep_size", [(2, 1), (2, 2), (4, 2), (4, 4)])
def test_expert_and_tensor_parallel_shares_sum_to_the_full_layer(tp_size, ep_size):
    """Each rank loads only its experts (its slice of each under tp > ep); the all-reduce's sum is the whole layer."""
    g = torch.Generator().manual_seed(3)
    num_experts, hidden, inter, num_tokens = 4, 16, 12, 16
    gate = torch.randn(num_experts, inter, hidden, generator=g)
    up = torch.randn(num_experts, inter, hidden, generator=g)
    down = torch.randn(num_experts, hidden, inter, generator=g)
    x, router_logits = torch.randn(num_tokens, hidden, generator=g), torch.randn(num_tokens, num_experts, generator=g)

    def layer(tp: TPLayout, ep: EPLayout) -> FusedMoE:
        moe = FusedMoE(num_experts, 2, hidden, inter, renormalize=True, tp=tp, ep=ep)
        for e in range(num_experts):
            for param, shard, tensor in ((moe.w13, "w1", gate), (moe.w13, "w3", up), (moe.w2, "w2", down)):
                param.weight_loader(param, tensor[e], (e, shard))
        return moe

    full = layer(TPLayout(), ALL_EXPERTS)
    per_rank_experts, width = num_experts // ep_size, inter * ep_size // tp_size
    shares = []
    for rank in range(tp_size):
        tp = TPLayout(rank, tp_size)
        moe = layer(tp, EPLayout.over(tp, ep_size))
        first_expert, first_col = rank // (tp_size // ep_size) * per_rank_experts, rank % (tp_size // ep_size) * width
        experts, cols = slice(first_expert, first_expert + per_rank_experts), slice(first_col, first_col + width)
        assert moe.w13.shape == (per_rank_experts, 2 * width, hidden)
        assert torch.equal(moe.w13[:, :width], gate[experts, cols])
        assert torch.equal(moe.w13[:, width:], up[experts, cols])
        assert torch.equal(moe.w2, down[experts, :, cols])
        shares.append(moe.partial_forward(x, router_logits))
    assert all(share.abs().sum() > 0 for share in shares)
    torch.testing.assert_close(sum(shares), full(x, router_logits))


# ---- through the engine ------------------------------------------------------------------------------


def engine(path: Path, **kw) -> LLM:
    return LLM(str(path), device="cpu", dtype="float32", skip_tokenizer_init=True, show_progress=False, **kw)


def hf_greedy(hf, prompt: list[int], steps: int) -> list[int]:
    """Argmax continuation by full recomputation (no EOS handling: the engine runs with ignore_eos)."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, hf(ids).logits[0, -1].argmax().view(1, 1)], dim=1)
    return ids[0, len(prompt):].tolist()


def token_ids(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY_32)]


def test_greedy_tokens_match_transformers_alone_and_in_a_mixed_batch(tiny):
    arch, path, hf = tiny
    prompts = random_prompts(4, hf.config.vocab_size, seed=4)
    expected = [hf_greedy(hf, p, 32) for p in prompts]
    assert token_ids(engine(path), prompts[:1]) == expected[:1], arch
    # 12-token budget: prompts arrive in chunks beside other requests' decodes.
    mixed = engine(path, max_num_batched_tokens=12, max_num_seqs=4)
    assert token_ids(mixed, prompts) == expected, arch
    assert mixed.engine.kv_cache.num_free_blocks == mixed.engine.kv_cache.pool.num_blocks
