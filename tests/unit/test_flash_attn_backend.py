"""The flash-attn attention backend: its adapters against the torch references, and how it is chosen.

flash-attn itself cannot run here (no CUDA), so a stand-in module implements the two functions the
adapters call, as flash-attn 2 documents them: bottom-right-aligned causal masks, GQA by head groups,
paged K/V read through `block_table` in blocks of a multiple of 256 tokens, zeros for empty rows.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch

from gllm_engine.config import ConfigError, EngineConfig, _resolve_block_size, resolve_attention_backend
from gllm_engine.kernels import flash, reference
from gllm_engine.layers.attention import prefill_tile_map
from gllm_engine.layers.ops import select_ops

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 8, 2, 32, flash.FLASH_ATTN_BLOCK_SIZE


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of queries `[Q, H, D]` that end the context `k`/`v` `[K, Hkv, D]` (bottom right)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1).float(), v.repeat_interleave(group, 1).float()
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    offset = k.shape[0] - q.shape[0]
    visible = torch.arange(k.shape[0])[None, :] <= torch.arange(q.shape[0])[:, None] + offset
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", probs, v).to(q.dtype)


def _paged(cache: torch.Tensor, table: torch.Tensor, length: int) -> torch.Tensor:
    assert cache.shape[1] % 256 == 0, "Paged KV cache block size must be divisible by 256"
    return cache[table[:-(-length // cache.shape[1])].long()].flatten(0, 1)[:length]


def _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None,
            causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
            return_attn_probs=False, block_table=None):
    assert causal and block_table is not None and dropout_p == 0.0
    assert cu_seqlens_q.dtype == cu_seqlens_k.dtype == block_table.dtype == torch.int32
    cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    assert len(cu_q) == len(cu_k) == block_table.shape[0] + 1
    out = torch.zeros_like(q)
    for b in range(len(cu_q) - 1):
        num_q, num_k = cu_q[b + 1] - cu_q[b], cu_k[b + 1] - cu_k[b]
        assert 0 <= num_q <= max_seqlen_q and 0 <= num_k <= max_seqlen_k
        if num_q and num_k:
            out[cu_q[b]:cu_q[b + 1]] = _attend(q[cu_q[b]:cu_q[b + 1]], _paged(k, block_table[b], num_k),
                                               _paged(v, block_table[b], num_k), softmax_scale)
    return out


def _with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None, cache_seqlens=None,
                  cache_batch_idx=None, cache_leftpad=None, block_table=None, softmax_scale=None, causal=False,
                  **unused):
    assert k is None and v is None and rotary_cos is None and block_table is not None
    assert cache_seqlens.dtype == torch.int32 and q.dim() == 4
    out = torch.zeros_like(q)
    for b, length in enumerate(cache_seqlens.tolist()):
        if length:
            out[b] = _attend(q[b], _paged(k_cache, block_table[b], length), _paged(v_cache, block_table[b], length),
                             softmax_scale)
    return out


@pytest.fixture
def fake_flash_attn(monkeypatch: pytest.MonkeyPatch) -> None:
    module = types.ModuleType("flash_attn")
    module.flash_attn_varlen_func = _varlen
    module.flash_attn_with_kvcache = _with_kvcache
    monkeypatch.setitem(sys.modules, "flash_attn", module)


def _cache(seq_lens: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """K/V caches in blocks of 256 with each request's blocks scattered, and the `[B, W]` block table."""
    gen = torch.Generator().manual_seed(seed)
    width = max(-(-s // BLOCK) for s in seq_lens) + 1
    num_blocks = len(seq_lens) * width
    k, v = (torch.randn(num_blocks, BLOCK, KV_HEADS, HEAD_DIM, generator=gen) for _ in range(2))
    table = torch.randperm(num_blocks, generator=gen).to(torch.int32).view(len(seq_lens), width)
    return k, v, table


def test_prefill_matches_the_reference(fake_flash_attn):
    # two decodes, then a fresh prompt, a chunk continuing 300 cached tokens, a prefix hit past a block
    q_lens, seq_lens = [1, 1, 9, 40, 3], [5, 300, 9, 340, 260]
    num_decodes = 2
    k_cache, v_cache, table = _cache(seq_lens, seed=0)
    q = torch.randn(sum(q_lens), HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(1))
    qsl = torch.tensor(np.concatenate([[0], np.cumsum(q_lens)]), dtype=torch.int32)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    tiles = torch.from_numpy(prefill_tile_map(np.array(q_lens[num_decodes:]), np.array(seq_lens[num_decodes:]),
                                              16, num_decodes))
    args = (q, k_cache, v_cache, table, qsl, lens, tiles, HEAD_DIM**-0.5)
    out = torch.full_like(q, float("nan"))
    flash.paged_prefill_attention(*args, out=out, num_decodes=num_decodes)
    expected = reference.paged_prefill_attention(*args)
    torch.testing.assert_close(out[num_decodes:], expected[num_decodes:], atol=1e-5, rtol=1e-5)
    assert out[:num_decodes].isnan().all()  # the decode rows are the decode path's


def test_decode_matches_the_reference_and_padding_gives_zeros(fake_flash_attn):
    seq_lens = [1, 256, 300, 700, 0]  # the last row: CUDA-graph padding
    k_cache, v_cache, table = _cache(seq_lens, seed=2)
    q = torch.randn(len(seq_lens), HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(3))
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    out = flash.paged_decode_attention(q, k_cache, v_cache, table, lens, 0.2)
    torch.testing.assert_close(out, reference.paged_decode_attention(q, k_cache, v_cache, table, lens, 0.2),
                               atol=1e-5, rtol=1e-5)
    assert torch.equal(out[-1], torch.zeros_like(out[-1]))


def test_auto_picks_flash_attn_only_where_it_runs():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_attention_backend("auto", cuda, torch.bfloat16, False, True) == "flash-attn"
    assert resolve_attention_backend("auto", cuda, torch.bfloat16, False, False) == "triton"
    assert resolve_attention_backend("auto", cuda, torch.float32, False, True) == "triton"
    assert resolve_attention_backend("auto", cuda, torch.float16, True, True) == "triton"
    assert resolve_attention_backend("auto", cpu, torch.bfloat16, False, True) == "triton"
    assert resolve_attention_backend("triton", cuda, torch.bfloat16, False, True) == "triton"
    assert resolve_attention_backend("flash-attn", cuda, torch.float16, False, True) == "flash-attn"
    with pytest.raises(ConfigError, match="needs the flash-attn package"):
        resolve_attention_backend("flash-attn", cuda, torch.bfloat16, False, False)
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        resolve_attention_backend("flash-attn", cpu, torch.bfloat16, False, True)
    # flash-attn 2 reads a KV cache of q's dtype only: an fp8 or int8 cache keeps the Triton kernels
    for cache_dtype, name in ((torch.float8_e4m3fn, "float8_e4m3fn"), (torch.int8, "int8")):
        assert resolve_attention_backend("auto", cuda, torch.bfloat16, False, True, cache_dtype) == "triton"
        with pytest.raises(ConfigError, match=f"a {name} KV cache"):
            resolve_attention_backend("flash-attn", cuda, torch.bfloat16, False, True, cache_dtype)


def test_block_size_follows_the_backend():
    assert _resolve_block_size(None, "triton") == 16
    assert _resolve_block_size(32, "triton") == 32
    assert _resolve_block_size(None, "flash-attn") == 256
    assert _resolve_block_size(512, "flash-attn") == 512
    with pytest.raises(ConfigError, match="multiple of 256"):
        _resolve_block_size(16, "flash-attn")


def test_config_rejects_flash_attn_on_the_cpu_and_unknown_backends(tiny_model_dir):
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        EngineConfig.create(str(tiny_model_dir()), device="cpu", attention_backend="flash-attn")
    with pytest.raises(ConfigError, match="attention_backend must be one of"):
        EngineConfig.create(str(tiny_model_dir()), device="cpu", attention_backend="xformers")
    config = EngineConfig.create(str(tiny_model_dir()), device="cpu")
    assert config.device.attention_backend == "triton" and config.cache.block_size == 16


def test_ops_take_attention_from_flash_attn():
    ops = select_ops(torch.device("cuda"), attention_backend="flash-attn")
    assert ops.name == "flash-attn"
    assert ops.paged_prefill_attention is flash.paged_prefill_attention
    assert ops.paged_decode_attention is flash.paged_decode_attention
    assert select_ops(torch.device("cuda")).paged_decode_attention is not flash.paged_decode_attention
