"""RMSNorm, SiLU-and-mul and rotary kernels vs the torch references in gllm_engine.kernels.reference."""

from __future__ import annotations

import pytest
import torch

from gllm_engine.kernels import activation, norm, reference, rotary

DTYPES = [torch.float32, torch.bfloat16]


def _ids(value: object) -> str:
    return str(value).replace("torch.", "")


def _randn(*shape: int, dtype: torch.dtype, device: torch.device, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(device)


@pytest.mark.parametrize("shape", [(5, 64), (3, 4, 80)], ids=_ids)  # a hidden row; per-head (qk-norm), non-pow2
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_rms_norm_matches_reference(dtype, with_residual, shape, device, assert_matches):
    x = _randn(*shape, dtype=dtype, device=device, seed=0) * 3
    weight = _randn(shape[-1], dtype=dtype, device=device, seed=1)
    residual = _randn(*shape, dtype=dtype, device=device, seed=2) if with_residual else None
    x_before = x.clone()
    out, new_residual = norm.rms_norm(x, weight, 1e-6, residual)
    ref_out, ref_residual = reference.rms_norm(x, weight, 1e-6, residual)
    assert_matches(out, ref_out)
    if with_residual:
        assert_matches(new_residual, ref_residual)
    else:
        assert new_residual is None
    assert torch.equal(x, x_before)  # inputs are never modified


def test_rms_norm_promotes_like_the_reference(device):
    """A float32 weight on bfloat16 activations yields float32, as `weight * normed` does in torch."""
    x = _randn(6, 48, dtype=torch.bfloat16, device=device, seed=3)
    weight = _randn(48, dtype=torch.float32, device=device, seed=4)
    out, _ = norm.rms_norm(x, weight, 1e-5)
    expected = reference.rms_norm(x, weight, 1e-5)[0]
    assert out.dtype == expected.dtype == torch.float32
    # the normalized row is rounded to bfloat16 before the weight: bfloat16 tolerance
    torch.testing.assert_close(out, expected, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("shape", [(4, 128), (2, 3, 160), (3, 2 * 1100)], ids=_ids)  # the last spans 2 blocks
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_silu_and_mul_matches_reference(dtype, shape, device, assert_matches):
    x = _randn(*shape, dtype=dtype, device=device, seed=5) * 4
    assert_matches(activation.silu_and_mul(x), reference.silu_and_mul(x))


def _cos_sin_cache(max_pos: int, head_dim: int, device: torch.device) -> torch.Tensor:
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.arange(max_pos).float()[:, None] * inv_freq[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(device)  # [max_pos, D]


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("heads", [(4, 2), (10, 1), (3, 9)], ids=_ids)  # more than one head step of q, then of k
@pytest.mark.parametrize("head_dim", [64, 80, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_rotary_write_kv_matches_reference(dtype, head_dim, heads, qk_norm, device, assert_matches):
    num_heads, num_kv_heads = heads
    num_tokens, num_blocks, block_size = 7, 3, 4
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    qkv = _randn(num_tokens, q_size + 2 * kv_size, dtype=dtype, device=device, seed=6) * 2
    ref_qkv = qkv.clone()

    def views(t: torch.Tensor) -> tuple[torch.Tensor, ...]:  # strided views into the fused buffer, as in a model
        return reference.qkv_heads(t, num_heads, num_kv_heads, head_dim)

    positions = torch.tensor([0, 5, 3, 40, 41, 2, 63], device=device)
    slots = torch.tensor([3, -1, 0, 11, 7, -1, 8], device=device)  # two padded tokens: not stored
    cache = _cos_sin_cache(64, head_dim, device)
    weights = (_randn(head_dim, dtype=dtype, device=device, seed=7),
               _randn(head_dim, dtype=dtype, device=device, seed=8)) if qk_norm else None
    caches = [_randn(num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device, seed=9 + i)
              for i in range(2)]
    ref_caches = [c.clone() for c in caches]
    v_before = views(qkv)[2].clone()
    out = rotary.rotary_write_kv(*views(qkv), positions, cache, *caches, slots, weights, 1e-6)
    expected = reference.rotary_write_kv(*views(ref_qkv), positions, cache, *ref_caches, slots, weights, 1e-6)
    assert out.data_ptr() == views(qkv)[0].data_ptr()  # q rotated in place
    assert_matches(out, expected)
    assert_matches(qkv, ref_qkv)  # k rotated in place too, v untouched
    assert torch.equal(views(qkv)[2], v_before)
    for got, want in zip(caches, ref_caches):
        assert_matches(got, want)


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_rotary_write_kv_into_an_fp8_cache_rounds_as_the_reference(dtype, device):
    """The cache holds `reference.to_cache_dtype` of the k and v the kernel leaves in its buffer, bit for
    bit: rounded to nearest even, saturated at +-448 (the values span many binades and pass 448)."""
    num_tokens, num_heads, num_kv_heads, head_dim = 6, 4, 2, 64
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    qkv = _randn(num_tokens, q_size + 2 * kv_size, dtype=dtype, device=device, seed=11) * 150
    q, k, v = reference.qkv_heads(qkv, num_heads, num_kv_heads, head_dim)
    positions = torch.tensor([0, 5, 3, 40, 41, 2], device=device)
    slots = torch.tensor([3, -1, 0, 11, 7, 8], device=device)
    caches = [torch.zeros(3, 4, num_kv_heads, head_dim, dtype=torch.float8_e4m3fn, device=device) for _ in range(2)]
    rotary.rotary_write_kv(q, k, v, positions, _cos_sin_cache(64, head_dim, device), *caches, slots)
    stored = slots >= 0
    for cache, x in zip(caches, (k, v)):
        want = reference.to_cache_dtype(x[stored], torch.float8_e4m3fn)
        assert torch.equal(cache.view(-1, num_kv_heads, head_dim)[slots[stored]].view(torch.uint8),
                           want.view(torch.uint8))
    assert bool((v.abs() > reference.FP8_MAX).any())  # saturation was exercised


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_rotary_write_kv_into_an_int8_cache_quantizes_as_the_reference(dtype, device):
    """An int8 cache holds `reference.quantize_int8` of the k and v the kernel leaves in its buffer: the
    same integers and the same scales, bit for bit, an all-zero row included."""
    num_tokens, num_heads, num_kv_heads, head_dim = 6, 4, 2, 64
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    qkv = _randn(num_tokens, q_size + 2 * kv_size, dtype=dtype, device=device, seed=12) * 3
    q, k, v = reference.qkv_heads(qkv, num_heads, num_kv_heads, head_dim)
    v[2, 1] = 0.0
    positions = torch.tensor([0, 5, 3, 40, 41, 2], device=device)
    slots = torch.tensor([3, -1, 0, 11, 7, 8], device=device)
    caches = [torch.zeros(3, 4, num_kv_heads, head_dim, dtype=torch.int8, device=device) for _ in range(2)]
    scales = [torch.zeros(3, 4, num_kv_heads, device=device) for _ in range(2)]
    rotary.rotary_write_kv(q, k, v, positions, _cos_sin_cache(64, head_dim, device), *caches, slots,
                           k_scales=scales[0], v_scales=scales[1])
    stored = slots >= 0
    for cache, scale, x in zip(caches, scales, (k, v)):
        want, want_scale = reference.quantize_int8(x[stored])
        assert torch.equal(cache.view(-1, num_kv_heads, head_dim)[slots[stored]], want)
        assert torch.equal(scale.view(-1, num_kv_heads)[slots[stored]], want_scale)
        assert set(want.abs().amax(-1).unique().tolist()) <= {0, 127}  # rows reach +-127; the zero row stays 0
