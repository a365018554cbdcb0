"""The skinny (few-row) matmul kernel vs `F.linear` (plain, and with the SiLU-and-mul of a gate-up
projection fused), and when `linear` picks it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gllm_engine.kernels import linear, reference


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
