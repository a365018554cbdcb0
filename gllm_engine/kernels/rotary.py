"""What a layer does to this step's q, k and v before attending, in one Triton kernel per step.

Optional per-head RMSNorm of q and k (Qwen3), neox-style rotary embedding of both, in place (so views
into a fused qkv buffer are updated where they lie), and the store of k and v into the paged cache.
Reference: `reference.rotary_write_kv`. One program handles `ROPE_BLOCK_H` q heads or KV heads of one
token, so even a batch-1 step spreads over several SMs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gllm_engine.kernels.launch import pdl_args, pdl_wait
from gllm_engine.kernels.reference import INT8_AMAX_FLOOR, INT8_MAX

_INT8_MAX = tl.constexpr(INT8_MAX)
_INT8_AMAX_FLOOR = tl.constexpr(INT8_AMAX_FLOOR)

ROPE_BLOCK_H = 8  # heads per program
ROPE_NUM_WARPS = 4


@triton.jit
def _round_to_e4m3(x):
    """float32 `x` (|x| <= 448) rounded to the nearest float8 e4m3 value, ties to even, in float32
    arithmetic: adding 1.5 * 2^(e + 20) leaves x's binade an ulp of 2^(e - 3), e4m3's spacing there
    (2^-9 below 2^-6, its subnormals). Triton's interpreter converts some values to float8 wrongly
    (a mantissa that rounds up does not carry); converting an exact value is right everywhere."""
    exponent = tl.maximum(((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)
    magic = (((exponent + 147) << 23) | 0x400000).to(tl.float32, bitcast=True)
    rounded = (tl.abs(x) + magic) - magic
    return tl.where(x < 0, -rounded, rounded)


@triton.jit
def cache_value(x, cache_ptr):
    """`x` as the cache at `cache_ptr` stores it (`reference.to_cache_dtype`): float8 e4m3 saturates
    at +-448, the largest value it holds (the cache has no scale)."""
    if cache_ptr.dtype.element_ty == tl.float8e4nv:
        x = _round_to_e4m3(tl.clamp(x.to(tl.float32), -448.0, 448.0))
    return x.to(cache_ptr.dtype.element_ty)


@triton.jit
def _store_int8_rows(cache, scale_ptrs, x1, x2, mask, row_mask, HALF: tl.constexpr):
    """Store rows given as halves `[R, C]` (float32) in an int8 cache, as `reference.quantize_int8` does:
    the row's largest |value| becomes 127 and that over 127 is stored at `scale_ptrs` `[R]`."""
    amax = tl.maximum(tl.max(tl.abs(x1), 1), tl.max(tl.abs(x2), 1))
    inv = _INT8_MAX / tl.maximum(amax, _INT8_AMAX_FLOOR)
    y1, y2 = x1 * inv[:, None], x2 * inv[:, None]
    # half away from zero, then truncated by the conversion
    tl.store(cache, tl.clamp(y1 + tl.where(y1 >= 0, 0.5, -0.5), -_INT8_MAX, _INT8_MAX).to(tl.int8), mask=mask)
    tl.store(cache + HALF, tl.clamp(y2 + tl.where(y2 >= 0, 0.5, -0.5), -_INT8_MAX, _INT8_MAX).to(tl.int8),
             mask=mask)
    tl.store(scale_ptrs, amax / _INT8_MAX, mask=row_mask)


@triton.jit
def norm_and_rotate(x1, x2, w_ptr, cos, sin, eps, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
                     HAS_NORM: tl.constexpr, dtype: tl.constexpr):
    """Both halves `[R, C]` (float32) of head rows, with their `cos` and `sin`: RMSNorm'd if HAS_NORM (then
    each row is a whole head, C = BLOCK_HALF), rotated, and rounded to `dtype`."""
    if HAS_NORM:
        j = tl.arange(0, BLOCK_HALF)
        w1 = tl.load(w_ptr + j, mask=j < HALF, other=0.0).to(tl.float32)[None, :]
        w2 = tl.load(w_ptr + HALF + j, mask=j < HALF, other=0.0).to(tl.float32)[None, :]
        rstd = tl.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * HALF) + eps)[:, None]
        # as transformers: the normalized head is rounded before the weight, the product after it
        x1 = ((x1 * rstd).to(dtype).to(tl.float32) * w1).to(dtype).to(tl.float32)
        x2 = ((x2 * rstd).to(dtype).to(tl.float32) * w2).to(dtype).to(tl.float32)
    return (x1 * cos - x2 * sin).to(dtype), (x2 * cos + x1 * sin).to(dtype)


@triton.jit
def _rotary_write_kv_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, cos_sin_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                            q_norm_ptr, k_norm_ptr, k_scale_ptr, v_scale_ptr, eps,
                            stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cos,
                            stride_cb, stride_ct, stride_ch, stride_vcb, stride_vct, stride_vch, stride_sb, stride_st,
                            NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr,
                            BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, PAGE_SIZE: tl.constexpr,
                            HAS_NORM: tl.constexpr, QUANT: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)
    t = tl.program_id(0).to(tl.int64)
    # grid axis 1: the blocks of BLOCK_H q heads, then those of KV heads; a program's other range is empty
    hb = tl.program_id(1)
    q_blocks = tl.cdiv(NUM_Q_HEADS, BLOCK_H)
    q_begin = tl.minimum(hb * BLOCK_H, NUM_Q_HEADS)
    q_end = tl.minimum(q_begin + BLOCK_H, NUM_Q_HEADS)
    kv_begin = tl.minimum(tl.maximum(hb - q_blocks, 0) * BLOCK_H, NUM_KV_HEADS)
    kv_end = tl.where(hb >= q_blocks, tl.minimum(kv_begin + BLOCK_H, NUM_KV_HEADS), kv_begin)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    j = tl.arange(0, BLOCK_HALF)
    j_mask = j < HALF
    cos = tl.load(cos_sin_ptr + pos * stride_cos + j, mask=j_mask, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(cos_sin_ptr + pos * stride_cos + HALF + j, mask=j_mask, other=0.0).to(tl.float32)[None, :]
    dtype = q_ptr.dtype.element_ty

    for h0 in range(q_begin, q_end, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        mask = (h < q_end)[:, None] & j_mask[None, :]
        ptr = q_ptr + t * stride_qt + h[:, None] * stride_qh + j[None, :]  # [BLOCK_H, BLOCK_HALF] first halves
        y1, y2 = norm_and_rotate(tl.load(ptr, mask=mask, other=0.0).to(tl.float32),
                                  tl.load(ptr + HALF, mask=mask, other=0.0).to(tl.float32),
                                  q_norm_ptr, cos, sin, eps, HALF, BLOCK_HALF, HAS_NORM, dtype)
        tl.store(ptr, y1, mask=mask)
        tl.store(ptr + HALF, y2, mask=mask)

    slot = tl.load(slot_ptr + t).to(tl.int64)  # negative: a padded token, nothing stored
    page, row = tl.maximum(slot, 0) // PAGE_SIZE, tl.maximum(slot, 0) % PAGE_SIZE
    stored_heads = tl.where(slot >= 0, kv_end, 0)
    for h0 in range(kv_begin, kv_end, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        mask = (h < kv_end)[:, None] & j_mask[None, :]
        cache_mask = (h < stored_heads)[:, None] & j_mask[None, :]
        ptr = k_ptr + t * stride_kt + h[:, None] * stride_kh + j[None, :]
        y1, y2 = norm_and_rotate(tl.load(ptr, mask=mask, other=0.0).to(tl.float32),
                                  tl.load(ptr + HALF, mask=mask, other=0.0).to(tl.float32),
                                  k_norm_ptr, cos, sin, eps, HALF, BLOCK_HALF, HAS_NORM, dtype)
        tl.store(ptr, y1, mask=mask)
        tl.store(ptr + HALF, y2, mask=mask)
        cache = k_cache_ptr + page * stride_cb + row * stride_ct + h[:, None] * stride_ch + j[None, :]
        src = v_ptr + t * stride_vt + h[:, None] * stride_vh + j[None, :]
        dst = v_cache_ptr + page * stride_vcb + row * stride_vct + h[:, None] * stride_vch + j[None, :]
        if QUANT:
            scale_off = page * stride_sb + row * stride_st + h
            row_mask = h < stored_heads
            _store_int8_rows(cache, k_scale_ptr + scale_off, y1.to(tl.float32), y2.to(tl.float32), cache_mask,
                            row_mask, HALF)
            _store_int8_rows(dst, v_scale_ptr + scale_off, tl.load(src, mask=cache_mask, other=0.0).to(tl.float32),
                            tl.load(src + HALF, mask=cache_mask, other=0.0).to(tl.float32), cache_mask, row_mask,
                            HALF)
        else:
            tl.store(cache, cache_value(y1, cache), mask=cache_mask)
            tl.store(cache + HALF, cache_value(y2, cache), mask=cache_mask)
            tl.store(dst, cache_value(tl.load(src, mask=cache_mask), dst), mask=cache_mask)
            tl.store(dst + HALF, cache_value(tl.load(src + HALF, mask=cache_mask), dst), mask=cache_mask)


def rotary_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                    cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slot_mapping: torch.Tensor, qk_norm_weights: tuple[torch.Tensor, torch.Tensor] | None = None,
                    eps: float = 0.0, *, k_scales: torch.Tensor | None = None,
                    v_scales: torch.Tensor | None = None) -> torch.Tensor:
    """Normalize (with `qk_norm_weights`) and rotate q `[T, Hq, D]` and k `[T, Hkv, D]` in place at
    `positions`, and store k and v in `[NB, BS, Hkv, D]` caches (q's dtype, float8 e4m3, or int8 with
    its `[NB, BS, Hkv]` float32 scales `k_scales` / `v_scales`) at `slot_mapping` (negative: skipped).

    `cos_sin_cache` is `[max_pos, D]`: cos in the first D/2 columns, sin in the last D/2. Returns q.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    if num_tokens == 0:
        return q
    assert q.stride(-1) == k.stride(-1) == v.stride(-1) == cos_sin_cache.stride(-1) == 1
    assert k_cache.stride(-1) == v_cache.stride(-1) == 1
    assert k_cache.dtype == v_cache.dtype in (q.dtype, torch.float8_e4m3fn, torch.int8)
    assert cos_sin_cache.shape[-1] == head_dim == k.shape[-1] and head_dim % 2 == 0
    quant = k_cache.dtype == torch.int8
    if quant:
        assert k_scales is not None and v_scales is not None and k_scales.stride() == v_scales.stride()
        assert k_scales.stride(-1) == 1 and k_scales.dtype == v_scales.dtype == torch.float32
    else:
        k_scales = v_scales = k_cache  # unused
    q_weight, k_weight = qk_norm_weights if qk_norm_weights is not None else (q, q)  # unused without the norm
    half = head_dim // 2
    head_blocks = triton.cdiv(num_q_heads, ROPE_BLOCK_H) + triton.cdiv(k.shape[1], ROPE_BLOCK_H)
    _rotary_write_kv_kernel[(num_tokens, head_blocks)](
        q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping, q_weight, k_weight, k_scales, v_scales,
        eps, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos_sin_cache.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), k_scales.stride(0) if quant else 0, k_scales.stride(1) if quant else 0,
        NUM_Q_HEADS=num_q_heads, NUM_KV_HEADS=k.shape[1], HALF=half, BLOCK_H=ROPE_BLOCK_H,
        BLOCK_HALF=triton.next_power_of_2(half), PAGE_SIZE=k_cache.shape[1], HAS_NORM=qk_norm_weights is not None,
        QUANT=quant, num_warps=ROPE_NUM_WARPS, **pdl_args(q.device))
    return q
