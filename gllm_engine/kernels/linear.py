"""`x @ weight.T (+ bias)` for the few-row batches of decode steps, in Triton. Reference: `F.linear`.

With at most `SKINNY_MAX_ROWS` rows a projection only streams its weight, and cuBLAS leaves bandwidth
unused on some shapes and adds a split-K reduce kernel on others. Here every program streams
`block_n` whole weight rows and multiplies them by all the (padded) input rows at once, so one kernel
reads the weight exactly once. Other shapes and dtypes go to `F.linear`.

A gate-up projection can take the MLP's SiLU-and-mul in the same kernel (`linear_silu_and_mul`):
each program then streams matching gate and up rows and writes only `silu(gate) * up`. Likewise a
qkv projection can take the rotary embedding and the KV-cache store (`qkv_rotary_write_kv`): each
program streams the weight rows of matching columns of both halves of one head, rotates them as
`rotary.rotary_write_kv` does and stores k and v in the paged cache.
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
from gllm_engine.kernels.reference import qkv_heads
from gllm_engine.kernels.rotary import cache_value, norm_and_rotate, rotary_write_kv

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


@triton.jit
def _stream_rows(x_rows, w_rows, w2_rows, m_mask, K, TWO: tl.constexpr, EVEN_K: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST_DOT: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    """The input rows times the weight rows at `w_rows` `[BLOCK_N]` (and, with TWO, at `w2_rows`):
    float32 `[BLOCK_M, BLOCK_N]` each (the second is zeros without TWO)."""
    k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = _load_x(x_rows, k0, k, m_mask, K, EVEN_K, UPCAST_DOT)
        acc += tl.dot(x, tl.trans(_load_w(w_rows[:, None], k0, k, K, EVEN_K, UPCAST_DOT)),
                      input_precision=DOT_PRECISION)
        if TWO:
            acc2 += tl.dot(x, tl.trans(_load_w(w2_rows[:, None], k0, k, K, EVEN_K, UPCAST_DOT)),
                           input_precision=DOT_PRECISION)
    return acc, acc2


@triton.jit(do_not_specialize=["M"])
def _skinny_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                   HAS_BIAS: tl.constexpr, GATED: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST_DOT: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, PDL: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, BLOCK_M)
    n_mask = n < N
    m_mask = m < M
    w_row = w_ptr + tl.where(n_mask, n, 0).to(tl.int64) * stride_wn  # [BLOCK_N]; rows past N re-read row 0
    pdl_wait(PDL)
    # GATED: rows N.. of the weight are the up projection
    acc, up = _stream_rows(x_ptr + m[:, None] * stride_xm, w_row, w_row + N * stride_wn, m_mask, K, GATED, EVEN_K,
                           BLOCK_M, BLOCK_N, BLOCK_K, UPCAST_DOT, DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        if GATED:
            up += tl.load(bias_ptr + N + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    dtype = out_ptr.dtype.element_ty
    if GATED:  # silu(gate) * up, rounded as the unfused projection and `silu_and_mul` round
        gate = acc.to(dtype).to(tl.float32)
        acc = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32) * up.to(dtype).to(tl.float32)
    tl.store(out_ptr + m[:, None] * stride_om + n[None, :], acc.to(dtype), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit(do_not_specialize=["M"])
def _qkv_rotary_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, pos_ptr, cos_sin_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                       M, K, stride_xm, stride_wn, stride_om, stride_cos, stride_cb, stride_ct, stride_ch,
                       stride_vcb, stride_vct, stride_vch, NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
                       HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
                       EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
                       UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, PDL: tl.constexpr):
    # program: columns j of the first half of one head (q heads, then k, then v) and the same of the second
    HALF: tl.constexpr = HEAD_DIM // 2
    head = tl.program_id(0) // (HALF // BLOCK_P)
    j = (tl.program_id(0) % (HALF // BLOCK_P)) * BLOCK_P + tl.arange(0, BLOCK_P)
    n1 = head * HEAD_DIM + j
    n2 = n1 + HALF
    m = tl.arange(0, BLOCK_M)
    m_mask = m < M
    pdl_wait(PDL)
    x1, x2 = _stream_rows(x_ptr + m[:, None] * stride_xm, w_ptr + n1.to(tl.int64) * stride_wn,
                          w_ptr + n2.to(tl.int64) * stride_wn, m_mask, K, True, EVEN_K, BLOCK_M, BLOCK_P, BLOCK_K,
                          UPCAST_DOT, DOT_PRECISION)
    if HAS_BIAS:
        x1 += tl.load(bias_ptr + n1).to(tl.float32)[None, :]
        x2 += tl.load(bias_ptr + n2).to(tl.float32)[None, :]
    dtype = out_ptr.dtype.element_ty
    y1, y2 = x1.to(dtype), x2.to(dtype)  # the projection's output, rounded as the unfused kernels round it
    if head < NUM_Q_HEADS + NUM_KV_HEADS:  # q and k: rotated at each row's position
        pos = tl.load(pos_ptr + m, mask=m_mask, other=0).to(tl.int64)
        cos_ptr = cos_sin_ptr + pos[:, None] * stride_cos + j[None, :]
        cos = tl.load(cos_ptr, mask=m_mask[:, None], other=0.0).to(tl.float32)
        sin = tl.load(cos_ptr + HALF, mask=m_mask[:, None], other=0.0).to(tl.float32)
        y1, y2 = norm_and_rotate(y1.to(tl.float32), y2.to(tl.float32), cos_sin_ptr, cos, sin, 0.0, HALF, BLOCK_P,
                                 False, dtype)  # no norm: its weight pointer and eps go unread
    out = out_ptr + m[:, None] * stride_om
    tl.store(out + n1[None, :], y1, mask=m_mask[:, None])
    tl.store(out + n2[None, :], y2, mask=m_mask[:, None])
    if head >= NUM_Q_HEADS:  # k and v: into the paged cache at each row's slot (negative: padding)
        slot = tl.load(slot_ptr + m, mask=m_mask, other=-1).to(tl.int64)
        page, row = tl.maximum(slot, 0) // PAGE_SIZE, tl.maximum(slot, 0) % PAGE_SIZE
        kv_head = head - NUM_Q_HEADS
        if kv_head < NUM_KV_HEADS:
            cache = k_cache_ptr + page * stride_cb + row * stride_ct + kv_head * stride_ch
        else:
            cache = v_cache_ptr + page * stride_vcb + row * stride_vct + (kv_head - NUM_KV_HEADS) * stride_vch
        cache_mask = (slot >= 0)[:, None]
        cache_rows = cache[:, None] + j[None, :]
        tl.store(cache_rows, cache_value(y1, cache_rows), mask=cache_mask)
        tl.store(cache_rows + HALF, cache_value(y2, cache_rows), mask=cache_mask)


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


def qkv_rotary_config(out_features: int, head_dim: int) -> SkinnyTiles:
    """Tiles of the fused qkv kernel: `skinny_config`'s, with `block_n` (rows of both halves of a head)
    narrowed until half of it divides head_dim / 2."""
    tiles = skinny_config(out_features)
    block_n = tiles.block_n
    while (head_dim // 2) % (block_n // 2):
        block_n //= 2
    return tiles._replace(block_n=block_n)


def qkv_rotary_write_kv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, num_q_heads: int,
                        num_kv_heads: int, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                        k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                        qk_norm_weights: tuple[torch.Tensor, torch.Tensor] | None = None,
                        eps: float = 0.0, *, k_scales: torch.Tensor | None = None,
                        v_scales: torch.Tensor | None = None) -> torch.Tensor:
    """`reference.qkv_rotary_write_kv`: the projection, rotary and cache store in one skinny kernel where
    `uses_skinny_kernel` says so, no per-head norm comes first and the cache is not int8 (a program holds
    part of a head, not the whole row a scale is taken over); else `linear`, then `rotary_write_kv`."""
    head_dim = k_cache.shape[-1]
    if (qk_norm_weights is None and uses_skinny_kernel(x, weight) and head_dim % 32 == 0
            and k_cache.dtype == v_cache.dtype in (x.dtype, torch.float8_e4m3fn)
            and k_cache.stride(-1) == v_cache.stride(-1) == 1
            and cos_sin_cache.stride(-1) == 1):
        return _skinny_qkv_rotary(x, weight, bias, num_q_heads, num_kv_heads, positions, cos_sin_cache, k_cache,
                                  v_cache, slot_mapping)
    qkv = linear(x, weight, bias)
    rotary_write_kv(*qkv_heads(qkv, num_q_heads, num_kv_heads, head_dim), positions, cos_sin_cache, k_cache,
                    v_cache, slot_mapping, qk_norm_weights, eps, k_scales=k_scales, v_scales=v_scales)
    return qkv


def _skinny_qkv_rotary(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, num_q_heads: int,
                       num_kv_heads: int, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                       k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
    rows, in_features = x.shape
    head_dim = k_cache.shape[-1]
    heads = num_q_heads + 2 * num_kv_heads
    assert weight.shape == (heads * head_dim, in_features) and cos_sin_cache.shape[-1] == head_dim
    out = torch.empty((rows, weight.shape[0]), dtype=x.dtype, device=x.device)
    tiles = qkv_rotary_config(weight.shape[0], head_dim)
    block_p = tiles.block_n // 2  # a program streams block_p rows of each half of a head
    _qkv_rotary_kernel[(heads * (head_dim // 2 // block_p),)](
        x, weight, bias if bias is not None else weight, out, positions, cos_sin_cache, k_cache, v_cache,
        slot_mapping, rows, in_features, x.stride(0), weight.stride(0), out.stride(0), cos_sin_cache.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), NUM_Q_HEADS=num_q_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        PAGE_SIZE=k_cache.shape[1], HAS_BIAS=bias is not None, EVEN_K=in_features % tiles.block_k == 0,
        BLOCK_M=SKINNY_MAX_ROWS, BLOCK_P=block_p, BLOCK_K=tiles.block_k, num_warps=tiles.num_warps,
        num_stages=tiles.num_stages, **dot_args(x.dtype), **pdl_args(x.device))
    return out
