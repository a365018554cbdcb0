"""`x @ weight.T (+ bias)` for the few-row batches of decode steps, in Triton. Reference: `F.linear`.

With at most `SKINNY_MAX_ROWS` rows a projection only streams its weight, and cuBLAS leaves bandwidth
unused on some shapes and adds a split-K reduce kernel on others. Here every program streams
`block_n` whole weight rows and multiplies them by all the (padded) input rows at once, so one kernel
reads the weight exactly once. Other shapes and dtypes go to `F.linear`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from gllm_engine.kernels.dot import dot_args

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


@triton.jit(do_not_specialize=["M"])
def _skinny_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                   HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST_DOT: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, BLOCK_M)
    k = tl.arange(0, BLOCK_K)
    n_mask = n < N
    m_mask = m < M
    x_rows = x_ptr + m[:, None] * stride_xm
    w_rows = w_ptr + tl.where(n_mask, n, 0).to(tl.int64)[:, None] * stride_wn  # rows past N re-read row 0
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_rows + (k0 + k)[None, :], mask=m_mask[:, None], other=0.0)
            w = tl.load(w_rows + (k0 + k)[None, :])
        else:
            k_mask = (k0 + k) < K
            x = tl.load(x_rows + (k0 + k)[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_rows + (k0 + k)[None, :], mask=k_mask[None, :], other=0.0)
        if UPCAST_DOT:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc += tl.dot(x, tl.trans(w), input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + m[:, None] * stride_om + n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


def uses_skinny_kernel(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear` takes the Triton path for this input and weight."""
    return (x.dim() == 2 and 0 < x.shape[0] <= SKINNY_MAX_ROWS and weight.shape[0] >= SKINNY_MIN_FEATURES
            and x.dtype == weight.dtype and x.dtype in (torch.float16, torch.bfloat16)
            and x.stride(-1) == 1 and weight.stride(-1) == 1)


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ weight.T (+ bias)` by the skinny kernel: `x` `[M, K]` with M <= `SKINNY_MAX_ROWS`, `weight` `[N, K]`."""
    rows, in_features = x.shape
    assert rows <= SKINNY_MAX_ROWS and weight.shape[1] == in_features
    assert x.stride(-1) == weight.stride(-1) == 1
    out_features = weight.shape[0]
    out = torch.empty((rows, out_features), dtype=x.dtype, device=x.device)
    if rows == 0:
        return out
    tiles = skinny_config(out_features)
    _skinny_kernel[(triton.cdiv(out_features, tiles.block_n),)](
        x, weight, bias if bias is not None else weight, out, rows, out_features, in_features,
        x.stride(0), weight.stride(0), out.stride(0), HAS_BIAS=bias is not None,
        EVEN_K=in_features % tiles.block_k == 0, BLOCK_M=SKINNY_MAX_ROWS, BLOCK_N=tiles.block_n,
        BLOCK_K=tiles.block_k, num_warps=tiles.num_warps, num_stages=tiles.num_stages, **dot_args(x.dtype))
    return out


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, by `skinny_linear` where `uses_skinny_kernel` says so."""
    if uses_skinny_kernel(x, weight):
        return skinny_linear(x, weight, bias)
    return F.linear(x, weight, bias)
