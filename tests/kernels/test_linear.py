"""The skinny (few-row) matmul kernel vs `F.linear` (plain, with the SiLU-and-mul of a gate-up
projection fused, and with a qkv projection's rotary and KV-cache store fused), and when `linear` picks it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gllm_engine.kernels import linear, reference, rotary


def _randn(*shape: int, dtype: torch.dtype, device: torch.device, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(device)


# (N, K): ragged N and K (masked tiles), and a wide even shape of the kind that takes the kernel in a model
@pytest.mark.parametrize("features", [(100, 80), (4096, 512)], ids=lambda f: f"{f[0]}x{f[1]}")
@pytest.mark.parametrize("rows", [1, 5, 16])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_skinny_linear_matches_f_linear(dtype, with_bias, rows, features, device, assert_matches):
    n, k = features
    x = _randn(rows, k, dtype=dtype, device=device, seed=0)
    weight = _randn(n, k, dtype=dtype, device=device, seed=1) * 0.1
    bias = _randn(n, dtype=dtype, device=device, seed=2) if with_bias else None
    out = linear.skinny_linear(x, weight, bias)
    expected = F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(dtype)
    assert out.dtype == dtype and out.shape == (rows, n)
    torch.testing.assert_close(out.float().cpu(), expected.float().cpu(), atol=2e-2, rtol=2e-2)


# (d, K): the weight stacks gate and up, [2d, K]
@pytest.mark.parametrize("features", [(100, 80), (2048, 512)], ids=lambda f: f"{f[0]}x{f[1]}")
@pytest.mark.parametrize("rows", [1, 16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gated_skinny_linear_matches_silu_and_mul_of_f_linear(with_bias, rows, features, device, assert_matches):
    d, k = features
    dtype = torch.bfloat16
    x = _randn(rows, k, dtype=dtype, device=device, seed=7)
    weight = _randn(2 * d, k, dtype=dtype, device=device, seed=8) * 0.1
    bias = _randn(2 * d, dtype=dtype, device=device, seed=9) if with_bias else None
    out = linear.skinny_linear(x, weight, bias, gated=True)
    assert out.dtype == dtype and out.shape == (rows, d)
    assert_matches(out, reference.silu_and_mul(linear.skinny_linear(x, weight, bias)))  # the same roundings


def test_linear_silu_and_mul_off_the_skinny_path_matches_the_reference(device, assert_matches):
    x = _randn(3, 64, dtype=torch.float32, device=device, seed=10)
    weight = _randn(16, 64, dtype=torch.float32, device=device, seed=11)
    assert not linear.uses_skinny_kernel(x, weight)
    assert_matches(linear.linear_silu_and_mul(x, weight), reference.linear_silu_and_mul(x, weight))


def test_skinny_linear_reads_strided_rows(device):
    """A row-strided view (a slice of a wider buffer) is read in place."""
    wide = _randn(3, 160, dtype=torch.bfloat16, device=device, seed=3)
    x = wide[:, :128]
    weight = _randn(64, 128, dtype=torch.bfloat16, device=device, seed=4)
    expected = F.linear(x.float(), weight.float()).to(torch.bfloat16)
    torch.testing.assert_close(linear.skinny_linear(x, weight).float(), expected.float(), atol=2e-2, rtol=2e-2)


def test_linear_takes_the_skinny_kernel_only_for_few_rows_of_wide_16_bit_outputs(device):
    wide = linear.SKINNY_MIN_FEATURES
    weight = torch.zeros(wide, 64, dtype=torch.bfloat16, device=device)
    assert linear.uses_skinny_kernel(torch.zeros(1, 64, dtype=torch.bfloat16, device=device), weight)
    assert linear.uses_skinny_kernel(torch.zeros(linear.SKINNY_MAX_ROWS, 64, dtype=torch.bfloat16, device=device),
                                     weight)
    assert not linear.uses_skinny_kernel(
        torch.zeros(linear.SKINNY_MAX_ROWS + 1, 64, dtype=torch.bfloat16, device=device), weight)
    assert not linear.uses_skinny_kernel(torch.zeros(0, 64, dtype=torch.bfloat16, device=device), weight)
    assert not linear.uses_skinny_kernel(torch.zeros(1, 64, dtype=torch.bfloat16, device=device), weight[: wide // 2])
    assert not linear.uses_skinny_kernel(torch.zeros(1, 64, device=device), weight.float())
    x = _randn(2, 64, dtype=torch.float32, device=device, seed=5)
    w = _randn(8, 64, dtype=torch.float32, device=device, seed=6)
    assert torch.equal(linear.linear(x, w), F.linear(x, w))  # everything else is F.linear itself


def _cos_sin_cache(max_pos: int, head_dim: int, device: torch.device) -> torch.Tensor:
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.arange(max_pos).float()[:, None] * inv_freq[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(device)


# (head_dim, q heads, KV heads), each (Hq + 2 Hkv) * D >= SKINNY_MIN_FEATURES: two programs per head
# (128), one (64), and three narrower ones (96: 16 columns of each half per program)
@pytest.mark.parametrize("heads", [(128, 24, 4), (64, 56, 4), (96, 40, 2)], ids=lambda h: "x".join(map(str, h)))
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("in_features", [80, 128])  # ragged and even K
def test_qkv_rotary_write_kv_fuses_projection_rotation_and_cache_store(in_features, with_bias, heads, device,
                                                                        assert_matches):
    head_dim, num_q_heads, num_kv_heads = heads
    dtype, rows, num_blocks, block_size = torch.bfloat16, 5, 3, 4
    x = _randn(rows, in_features, dtype=dtype, device=device, seed=20)
    weight = _randn((num_q_heads + 2 * num_kv_heads) * head_dim, in_features, dtype=dtype, device=device,
                    seed=21) * 0.2
    bias = _randn(weight.shape[0], dtype=dtype, device=device, seed=22) if with_bias else None
    positions = torch.tensor([0, 7, 3, 40, 63], device=device)
    slots = torch.tensor([3, -1, 0, 11, 7], device=device)  # a padded row: not stored
    cos_sin = _cos_sin_cache(64, head_dim, device)
    caches = [torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype, device=device)
              for _ in range(2)]
    ref_caches = [c.clone() for c in caches]
    assert linear.uses_skinny_kernel(x, weight)
    args = (num_q_heads, num_kv_heads, positions, cos_sin)
    out = linear.qkv_rotary_write_kv(x, weight, bias, *args, *caches, slots)
    expected = reference.qkv_rotary_write_kv(x, weight, bias, *args, *ref_caches, slots)
    assert_matches(out, expected)
    for got, want in zip(caches, ref_caches):
        torch.testing.assert_close(got.float().cpu(), want.float().cpu(), atol=3e-2, rtol=3e-2, equal_nan=True)
    # the cache holds exactly the k and v of the output, and only at the stored slots
    q_size, kv_size = num_q_heads * head_dim, num_kv_heads * head_dim
    stored = slots >= 0
    for cache, part in zip(caches, out[:, q_size:].split(kv_size, dim=-1)):
        flat = cache.view(-1, num_kv_heads, head_dim)
        assert torch.equal(flat[slots[stored]], part[stored].reshape(-1, num_kv_heads, head_dim))
        assert flat.isnan().all(-1).all(-1).sum() == flat.shape[0] - int(stored.sum())


def test_qkv_rotary_write_kv_with_qk_norm_takes_the_unfused_kernels(device):
    """A per-head norm before the rotation (Qwen3) is the projection, then `rotary_write_kv`."""
    head_dim, num_q_heads, num_kv_heads, rows = 128, 24, 4, 2
    x = _randn(rows, 64, dtype=torch.bfloat16, device=device, seed=23)
    weight = _randn((num_q_heads + 2 * num_kv_heads) * head_dim, 64, dtype=torch.bfloat16, device=device,
                    seed=24) * 0.2
    norms = tuple(_randn(head_dim, dtype=torch.bfloat16, device=device, seed=25 + i) for i in range(2))
    positions, slots = torch.tensor([1, 9], device=device), torch.tensor([0, 5], device=device)
    cos_sin = _cos_sin_cache(16, head_dim, device)
    caches = [torch.zeros(2, 4, num_kv_heads, head_dim, dtype=torch.bfloat16, device=device) for _ in range(2)]
    out = linear.qkv_rotary_write_kv(x, weight, None, num_q_heads, num_kv_heads, positions, cos_sin, *caches,
                                     slots, norms, 1e-6)
    unfused = linear.skinny_linear(x, weight)
    unfused_caches = [torch.zeros_like(c) for c in caches]
    rotary.rotary_write_kv(*reference.qkv_heads(unfused, num_q_heads, num_kv_heads, head_dim), positions, cos_sin,
                           *unfused_caches, slots, norms, 1e-6)
    assert torch.equal(out, unfused)
    for got, want in zip(caches, unfused_caches):
        assert torch.equal(got, want)


def test_qkv_rotary_write_kv_into_an_fp8_cache_stores_its_own_output_rounded(device):
    """With float8 caches the fused kernel stores `reference.to_cache_dtype` of the k and v it returns."""
    head_dim, num_q_heads, num_kv_heads, rows = 128, 24, 4, 3
    x = _randn(rows, 64, dtype=torch.bfloat16, device=device, seed=30) * 40
    weight = _randn((num_q_heads + 2 * num_kv_heads) * head_dim, 64, dtype=torch.bfloat16, device=device, seed=31)
    positions, slots = torch.tensor([1, 9, 4], device=device), torch.tensor([0, 5, 2], device=device)
    caches = [torch.zeros(2, 4, num_kv_heads, head_dim, dtype=torch.float8_e4m3fn, device=device) for _ in range(2)]
    assert linear.uses_skinny_kernel(x, weight)
    out = linear.qkv_rotary_write_kv(x, weight, None, num_q_heads, num_kv_heads, positions,
                                     _cos_sin_cache(16, head_dim, device), *caches, slots)
    q_size, kv_size = num_q_heads * head_dim, num_kv_heads * head_dim
    for cache, part in zip(caches, out[:, q_size:].split(kv_size, dim=-1)):
        want = reference.to_cache_dtype(part.reshape(rows, num_kv_heads, head_dim), torch.float8_e4m3fn)
        assert torch.equal(cache.view(-1, num_kv_heads, head_dim)[slots].view(torch.uint8), want.view(torch.uint8))
    assert bool((out[:, q_size:].abs() > reference.FP8_MAX).any())  # saturation was exercised


def test_qkv_rotary_write_kv_into_an_int8_cache_quantizes_its_own_output(device):
    """An int8 cache needs whole rows for its scales, so the fused kernel steps aside: the k and v it
    returns are stored as `reference.quantize_int8` stores them, scales included."""
    head_dim, num_q_heads, num_kv_heads, rows = 128, 24, 4, 3
    x = _randn(rows, 64, dtype=torch.bfloat16, device=device, seed=32)
    weight = _randn((num_q_heads + 2 * num_kv_heads) * head_dim, 64, dtype=torch.bfloat16, device=device, seed=33)
    positions, slots = torch.tensor([1, 9, 4], device=device), torch.tensor([0, 5, 2], device=device)
    caches = [torch.zeros(2, 4, num_kv_heads, head_dim, dtype=torch.int8, device=device) for _ in range(2)]
    scales = [torch.zeros(2, 4, num_kv_heads, device=device) for _ in range(2)]
    assert linear.uses_skinny_kernel(x, weight)
    out = linear.qkv_rotary_write_kv(x, weight, None, num_q_heads, num_kv_heads, positions,
                                     _cos_sin_cache(16, head_dim, device), *caches, slots,
                                     k_scales=scales[0], v_scales=scales[1])
    q_size, kv_size = num_q_heads * head_dim, num_kv_heads * head_dim
    for cache, scale, part in zip(caches, scales, out[:, q_size:].split(kv_size, dim=-1)):
        want, want_scale = reference.quantize_int8(part.reshape(rows, num_kv_heads, head_dim))
        assert torch.equal(cache.view(-1, num_kv_heads, head_dim)[slots], want)
        assert torch.equal(scale.view(-1, num_kv_heads)[slots], want_scale)
