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


@pytest.mark.parametrize("heads", [(4, 2), (10, 1)], ids=_ids)  # 10 heads: more than one head step
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_apply_rotary_matches_reference_in_place(dtype, head_dim, heads, device, assert_matches):
    num_heads, num_kv_heads = heads
    num_tokens = 7
    qkv = _randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, dtype=dtype, device=device, seed=6)
    q = qkv[:, :num_heads * head_dim].view(num_tokens, num_heads, head_dim)  # strided views, as in a model
    k = qkv[:, num_heads * head_dim:(num_heads + num_kv_heads) * head_dim].view(num_tokens, num_kv_heads, head_dim)
    v_before = qkv[:, (num_heads + num_kv_heads) * head_dim:].clone()
    positions = torch.tensor([0, 5, 3, 40, 41, 2, 63], device=device)
    cache = _cos_sin_cache(64, head_dim, device)
    ref_q, ref_k = reference.apply_rotary(q.clone(), k.clone(), positions, cache)
    out_q, out_k = rotary.apply_rotary(q, k, positions, cache)
    assert out_q is q and out_k is k  # rotated in place
    assert_matches(q, ref_q)
    assert_matches(k, ref_k)
    assert torch.equal(qkv[:, (num_heads + num_kv_heads) * head_dim:], v_before)
