"""`x @ weight.T (+ bias)` for the few-row batches of decode steps, in Triton. Reference: `F.linear`.

With at most `SKINNY_MAX_ROWS` rows a projection only streams its weight, and cuBLAS leaves bandwidth
unused on some shapes and adds a split-K reduce kernel on others. Here every program streams
`block_n` whole weight rows and multiplies them by all the (padded) input rows at once, so one kernel
reads the weight exactly once. Other shapes and dtypes go to `F.linear`.

A gate-up projection can take the MLP's SiLU-and-mul in the same kernel (`linear_silu_and_mul`):
each program then streams matching gate and up rows and writes only `silu(gate) * up`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from gllm_engine.kernels.activation import silu_and_mul
from gllm_engine.kernels.dot import dot_args
from gllm_engine.kernels.launch import pdl_args, pdl_wait

SKINNY_MAX_ROWS = 16  # the row tile: the smallest `tl.dot` operand
# Fewer output features give too few programs to stream the weight at full bandwidth: cuBLAS then.
SKINNY_MIN_FEATURES = 4096


class SkinnyTiles(NamedTuple):
    block_n: int  # weight rows (output features) per program
    block_k: int  # input features per inner step
    num_warps: int
    num_stages: int


def skinny_config(out_features: int) -> SkinnyTiles:
    """Tiles for one output width. Timed on an H200 with Llama-3-8B's projections and LM head
    (`benchmarks/RESULTS.md`, 2026-12-01): narrow outputs want long K steps to keep enough bytes in
    flight per program, wide ones wider programs."""
    if out_features <= 4096:
        return SkinnyTiles(32, 512, 4, 4)
    return SkinnyTiles(64, 256, 4, 3 if out_features > 16384 else 4)


@triton.jit
def _load_x(x_rows, k0, k, m_mask, K, EVEN_K: tl.constexpr, UPCAST_DOT: tl.constexpr):
    if EVEN_K:
        x = tl.load(x_rows + (k0 + k)[None, :], mask=m_mask[:, None], other=0.0)
    else:
        x = tl.load(x_rows + (k0 + k)[None, :], mask=m_mask[:, None] & ((k0 + k) < K)[None, :], other=0.0)
    return x.to(tl.float32) if UPCAST_DOT else x


@triton.jit
def _load_w(w_rows, k0, k, K, EVEN_K: tl.constexpr, UPCAST_DOT: tl.constexpr):
    if EVEN_K:
        w = tl.load(w_rows + (k0 + k)[None, :])
    else:
        w = tl.load(w_rows + (k0 + k)[None, :], mask=((k0 + k) < K)[None, :], other=0.0)
    return w.to(tl.float32) if UPCAST_DOT else w


@triton.jit(do_not_specialize=["M"])
def _skinny_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                   HAS_BIAS: tl.constexpr, GATED: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST_DOT: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, PDL: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, BLOCK_M)
    k = tl.arange(0, BLOCK_K)
    n_mask = n < N
    m_mask = m < M
    x_rows = x_ptr + m[:, None] * stride_xm
    w_row = w_ptr + tl.where(n_mask, n, 0).to(tl.int64) * stride_wn  # [BLOCK_N]; rows past N re-read row 0
    up_row = w_row + N * stride_wn  # GATED: rows N.. of the weight are the up projection
    pdl_wait(PDL)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = _load_x(x_rows, k0, k, m_mask, K, EVEN_K, UPCAST_DOT)
        acc += tl.dot(x, tl.trans(_load_w(w_row[:, None], k0, k, K, EVEN_K, UPCAST_DOT)),
                      input_precision=DOT_PRECISION)
        if GATED:
            up += tl.dot(x, tl.trans(_load_w(up_row[:, None], k0, k, K, EVEN_K, UPCAST_DOT)),
                         input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        if GATED:
            up += tl.load(bias_ptr + N + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    dtype = out_ptr.dtype.element_ty
    if GATED:  # silu(gate) * up, rounded as the unfused projection and `silu_and_mul` round
        gate = acc.to(dtype).to(tl.float32)
        acc = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32) * up.to(dtype).to(tl.float32)
    tl.store(out_ptr + m[:, None] * stride_om + n[None, :], acc.to(dtype), mask=m_mask[:, None] & n_mask[None, :])


def uses_skinny_kernel(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear` takes the Triton path for this input and weight."""
    return (x.dim() == 2 and 0 < x.shape[0] <= SKINNY_MAX_ROWS and weight.shape[0] >= SKINNY_MIN_FEATURES
            and x.dtype == weight.dtype and x.dtype in (torch.float16, torch.bfloat16)
            and x.stride(-1) == 1 and weight.stride(-1) == 1)


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  gated: bool = False) -> torch.Tensor:
    """`x @ weight.T (+ bias)` by the skinny kernel: `x` `[M, K]` with M <= `SKINNY_MAX_ROWS`, `weight` `[N, K]`.

    `gated`: the weight stacks gate and up projections (`[2d, K]`); returns `silu(gate) * up` `[M, d]`.
    """
    rows, in_features = x.shape
    assert rows <= SKINNY_MAX_ROWS and weight.shape[1] == in_features
    assert x.stride(-1) == weight.stride(-1) == 1
    out_features = weight.shape[0] // 2 if gated else weight.shape[0]
    out = torch.empty((rows, out_features), dtype=x.dtype, device=x.device)
    if rows == 0:
        return out
    tiles = skinny_config(weight.shape[0])
    block_n = tiles.block_n // 2 if gated else tiles.block_n  # a gated program streams gate and up rows
    _skinny_kernel[(triton.cdiv(out_features, block_n),)](
        x, weight, bias if bias is not None else weight, out, rows, out_features, in_features,
        x.stride(0), weight.stride(0), out.stride(0), HAS_BIAS=bias is not None, GATED=gated,
        EVEN_K=in_features % tiles.block_k == 0, BLOCK_M=SKINNY_MAX_ROWS, BLOCK_N=block_n,
        BLOCK_K=tiles.block_k, num_warps=tiles.num_warps, num_stages=tiles.num_stages, **dot_args(x.dtype),
        **pdl_args(x.device))
    return out


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, by `skinny_linear` where `uses_skinny_kernel` says so."""
    if uses_skinny_kernel(x, weight):
        return skinny_linear(x, weight, bias)
    return F.linear(x, weight, bias)


def linear_silu_and_mul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`silu_and_mul(F.linear(x, weight, bias))` for a stacked gate-up weight `[2d, K]`, in one skinny
    kernel where `uses_skinny_kernel` says so."""
    if uses_skinny_kernel(x, weight) and weight.shape[0] % 2 == 0:
        return skinny_linear(x, weight, bias, gated=True)
    return silu_and_mul(linear(x, weight, bias))
