"""Neox-style rotary embedding in Triton. Reference: `reference.apply_rotary`.

Rotates q and k IN PLACE and returns the same tensors, so views into a fused qkv buffer are
updated where they lie. One program handles every head of one token, `ROPE_BLOCK_H` heads at a time.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ROPE_BLOCK_H = 8  # heads per inner step
ROPE_NUM_WARPS = 4


@triton.jit
def _rotate_heads(x_ptr, stride_h, num_heads, cos, sin,
                  HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Rotate `num_heads` heads of one token at `x_ptr` by (cos, sin) `[1, BLOCK_HALF]`."""
    j = tl.arange(0, BLOCK_HALF)
    for h0 in range(0, num_heads, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        mask = (h < num_heads)[:, None] & (j < HALF)[None, :]
        ptr = x_ptr + h[:, None] * stride_h + j[None, :]  # [BLOCK_H, BLOCK_HALF] first halves
        x1 = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(ptr + HALF, mask=mask, other=0.0).to(tl.float32)
        dtype = x_ptr.dtype.element_ty
        tl.store(ptr, (x1 * cos - x2 * sin).to(dtype), mask=mask)
        tl.store(ptr + HALF, (x2 * cos + x1 * sin).to(dtype), mask=mask)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, pos_ptr, cache_ptr, stride_qt, stride_qh, stride_kt, stride_kh, stride_cache,
                   num_q_heads, num_k_heads, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                   BLOCK_HALF: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    j = tl.arange(0, BLOCK_HALF)
    cs_mask = j < HALF
    cos = tl.load(cache_ptr + pos * stride_cache + j, mask=cs_mask, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(cache_ptr + pos * stride_cache + HALF + j, mask=cs_mask, other=0.0).to(tl.float32)[None, :]
    _rotate_heads(q_ptr + t * stride_qt, stride_qh, num_q_heads, cos, sin, HALF, BLOCK_H, BLOCK_HALF)
    _rotate_heads(k_ptr + t * stride_kt, stride_kh, num_k_heads, cos, sin, HALF, BLOCK_H, BLOCK_HALF)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                 cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q `[T, Hq, D]` and k `[T, Hkv, D]` in place at `positions` `[T]`; returns `(q, k)`.

    `cos_sin_cache` is `[max_pos, D]`: cos in the first D/2 columns, sin in the last D/2.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    if num_tokens == 0:
        return q, k
    assert q.stride(-1) == k.stride(-1) == cos_sin_cache.stride(-1) == 1
    assert cos_sin_cache.shape[-1] == head_dim == k.shape[-1]
    half = head_dim // 2
    _rotary_kernel[(num_tokens,)](
        q, k, positions, cos_sin_cache, q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin_cache.stride(0),
        num_q_heads, k.shape[1], HALF=half, BLOCK_H=ROPE_BLOCK_H, BLOCK_HALF=triton.next_power_of_2(half),
        num_warps=ROPE_NUM_WARPS)
    return q, k
