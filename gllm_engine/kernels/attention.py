"""Paged attention in Triton: prefill (FlashAttention-style) and decode (GQA-grouped, split-K).

Torch references with the same signatures and semantics: `gllm_engine.kernels.reference`. The cache
of one layer is two `[NB, BS, Hkv, D]` tensors; context token p of request b lives in block
`block_tables[b, p // BS]`, row `p % BS`. The kernels look up the block of every token they load, so
any block size works, and they never load a cache row at or past `seq_lens[b]`. The cache is in q's
dtype, in float8 e4m3, or in int8 with a float32 scale per token and KV head (`[NB, BS, Hkv]`
`k_scales` / `v_scales`); it is widened as it is loaded to the dtype of the products (`product_dtype`),
on NVIDIA GPUs an 8-bit cache by PTX from 32-bit words (`_load_cache_tile`).
It is written by `rotary.rotary_write_kv` (or `linear.qkv_rotary_write_kv`), together with the
rotation of q and k.

Nothing here reads a device tensor on the host: the decode path can be captured in a CUDA graph.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from gllm_engine.kernels.dot import INTERPRETED, dot_args
from gllm_engine.kernels.launch import pdl_args, pdl_wait

# ---------------------------------------------------------------------------------------------------
# Tuning. Starting points, not yet timed on a GPU (benchmarks/kernels_check.py will): usual FlashAttention
# tile shapes, checked by compiling for sm_90 with Triton 3.6 and 3.9 to use at most ~100 KiB of shared
# memory (of 227) and to spill no registers in ptxas (prefill D=256 spilled with 4 warps: 8 it is).
# float32, a testing dtype, gets smaller tiles so a K and a V tile per pipeline stage still fit.


class PrefillTiles(NamedTuple):
    block_m: int  # queries per program
    block_n: int  # context tokens per inner step
    num_warps: int
    num_stages: int


class DecodeTiles(NamedTuple):
    block_n: int  # context tokens per inner step
    num_warps: int
    num_stages: int


def prefill_config(head_dim: int, dtype: torch.dtype) -> PrefillTiles:
    """Tile sizes of the prefill kernel for one head size and dtype."""
    wide = dtype == torch.float32
    if head_dim <= 128:
        return PrefillTiles(64, 32, 4, 2) if wide else PrefillTiles(128, 64, 8, 3)
    return PrefillTiles(32, 32, 4, 1) if wide else PrefillTiles(64, 32, 8, 2)


def decode_config(head_dim: int, dtype: torch.dtype) -> DecodeTiles:
    """Tile sizes of the decode kernel for one head size and dtype."""
    wide = dtype == torch.float32
    if head_dim <= 128:
        return DecodeTiles(32, 4, 2) if wide else DecodeTiles(128, 4, 2)
    return DecodeTiles(16, 4, 2) if wide else DecodeTiles(32, 4, 2)


SPLIT_REDUCE_NUM_WARPS = 4

# Split-K decode: with fewer than `DECODE_PROGRAMS_PER_SM` (request, KV head) programs per SM, each
# request's context is cut into segments processed in parallel, then merged by a reduce kernel. Timed on
# an H200 over the decode batches of the ShareGPT and uniform runs (`benchmarks/RESULTS.md`, 2026-12-01):
# 8 programs per SM and 128-token tiles read the KV cache 5-6% faster than 1 per SM and 64-token tiles.
DECODE_PROGRAMS_PER_SM = 8
DECODE_SPLIT_MIN_TOKENS = 128  # a segment streams at least this many context tokens
DECODE_MAX_SPLITS = 16
DEFAULT_NUM_SMS = 132  # an H100 SXM; used where the device cannot be asked (the interpreter on CPU)


def decode_num_splits(batch: int, num_kv_heads: int, max_context: int, num_sms: int) -> int:
    """How many segments to split each decode context into (1: no split-K).

    Split while the `batch * num_kv_heads` programs are fewer than `DECODE_PROGRAMS_PER_SM` per SM,
    into at most enough segments to reach that, each at least `DECODE_SPLIT_MIN_TOKENS` long.
    """
    programs, target = batch * num_kv_heads, DECODE_PROGRAMS_PER_SM * num_sms
    if programs >= target:
        return 1
    return max(1, min(DECODE_MAX_SPLITS, -(-target // programs), max_context // DECODE_SPLIT_MIN_TOKENS))


@functools.cache
def _device_num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    return _device_num_sms(device.index) if device.type == "cuda" else DEFAULT_NUM_SMS


_LOG2E = 1.4426950408889634


def product_dtype(q_dtype: torch.dtype, cache_dtype: torch.dtype) -> torch.dtype:
    """The dtype both attention products take their operands in: q's, except that bfloat16 queries over an
    8-bit cache multiply in float16. Hopper widens a pair of float8 values to float16 in one instruction;
    to reach bfloat16, Triton converts each half once more, which made decode with an fp8 cache slower
    than with a bf16 one (`benchmarks/RESULTS.md`, 2026-12-01). int8 values are exact in float16 too."""
    narrow = cache_dtype in (torch.float8_e4m3fn, torch.int8) and q_dtype == torch.bfloat16
    return torch.float16 if narrow else q_dtype


@functools.cache
def _device_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _ptx_widen(dtype: torch.dtype, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether the kernels widen 8-bit cache tiles by PTX from 32-bit words (`_load_cache_tile`): on NVIDIA
    GPUs (fp8: sm_89 and newer), for float16 products (`dtype`), when every cache row starts on a 4-byte
    boundary."""
    device = k_cache.device
    if (INTERPRETED or k_cache.element_size() != 1 or dtype != torch.float16 or device.type != "cuda"
            or torch.version.hip is not None):
        return False
    if k_cache.dtype == torch.float8_e4m3fn and _device_capability(device.index) < (8, 9):
        return False
    return k_cache.shape[-1] % 4 == 0 and all(c.data_ptr() % 4 == 0 and all(s % 4 == 0 for s in c.stride()[:-1])
                                              for c in (k_cache, v_cache))


def _cache_args(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k_scales: torch.Tensor | None,
                v_scales: torch.Tensor | None) -> tuple[tuple, dict]:
    """The kernels' scale arguments (pointers, block and row strides; placeholders without scales) and
    their constexprs: QUANT, PRODUCT_DTYPE, PTX_WIDEN and `dot_args`."""
    quant = k_cache.dtype == torch.int8
    if quant:
        assert k_scales is not None and v_scales is not None and k_scales.stride() == v_scales.stride()
        assert k_scales.stride(-1) == 1 and k_scales.dtype == v_scales.dtype == torch.float32
        scale_args = (k_scales, v_scales, k_scales.stride(0), k_scales.stride(1))
    else:
        scale_args = (k_cache, k_cache, 0, 0)
    dtype = product_dtype(q.dtype, k_cache.dtype)
    return scale_args, dict(QUANT=quant, PRODUCT_DTYPE=getattr(tl, str(dtype).removeprefix("torch.")),
                            PTX_WIDEN=_ptx_widen(dtype, k_cache, v_cache), **dot_args(dtype))


@triton.jit
def _queries_as(q, PRODUCT_DTYPE: tl.constexpr):
    """The query tile in the products' dtype, saturated at float16's range when it is narrowed to it."""
    if PRODUCT_DTYPE == tl.float16:
        q = tl.clamp(q.to(tl.float32), -65504.0, 65504.0)  # float16's largest finite value
    return q.to(PRODUCT_DTYPE)


# PTX that widens the four 8-bit values of a 32-bit word to float16, in order ($4 -> $0..$3). fp8: two pair
# conversions (sm_89+). int8: each byte plus 128 becomes the low byte of float16 1024 + (x + 128), minus 1152.
_FP8_WORD_TO_F16 = tl.constexpr(
    "{ .reg .b16 l, h; .reg .b32 t; mov.b32 {l, h}, $4; cvt.rn.f16x2.e4m3x2 t, l; mov.b32 {$0, $1}, t; "
    "cvt.rn.f16x2.e4m3x2 t, h; mov.b32 {$2, $3}, t; }")
_INT8_WORD_TO_F16 = tl.constexpr(
    "{ .reg .b32 t, c, lo, hi; xor.b32 t, $4, 0x80808080; mov.b32 c, 0x64806480; "
    "prmt.b32 lo, t, 0x64646464, 0x4140; prmt.b32 hi, t, 0x64646464, 0x4342; "
    "sub.f16x2 lo, lo, c; sub.f16x2 hi, hi, c; mov.b32 {$0, $1}, lo; mov.b32 {$2, $3}, hi; }")


@triton.jit
def _load_cache_tile(ptr, row_off, row_mask, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr, MASK_ROWS: tl.constexpr, PRODUCT_DTYPE: tl.constexpr,
                     PTX_WIDEN: tl.constexpr):
    """The `[BLOCK_N, BLOCK_D]` cache tile whose rows start at element offsets `row_off` (with MASK_ROWS,
    only the rows in `row_mask`), in PRODUCT_DTYPE.

    With PTX_WIDEN (an 8-bit cache on an NVIDIA GPU, products in float16) the tile is loaded as 32-bit
    words and widened four values at a time by PTX. Loaded as bytes and widened by Triton (3.6 and 3.9),
    a V tile reaches its product's operand layout by one shared-memory load per value, and an int8 one
    takes a conversion per value; the word path gives both tiles the 16-bit path of a bf16 cache.
    """
    if PTX_WIDEN:
        w = tl.arange(0, BLOCK_D // 4)
        mask = (w < HEAD_DIM // 4)[None, :]
        if MASK_ROWS:
            mask = row_mask[:, None] & mask
        words = tl.load(ptr.to(tl.pointer_type(tl.int32)) + (row_off // 4)[:, None] + w[None, :], mask=mask,
                        other=0)
        asm: tl.constexpr = _INT8_WORD_TO_F16 if ptr.dtype.element_ty == tl.int8 else _FP8_WORD_TO_F16
        a, b, c, d = tl.inline_asm_elementwise(asm, "=h,=h,=h,=h,r", [words], dtype=(tl.float16,) * 4,
                                               is_pure=True, pack=1)
        return tl.reshape(tl.join(tl.join(a, c), tl.join(b, d)), [BLOCK_N, BLOCK_D])  # values in word order
    d = tl.arange(0, BLOCK_D)
    mask = (d < HEAD_DIM)[None, :]
    if MASK_ROWS:
        mask = row_mask[:, None] & mask
    return tl.load(ptr + row_off[:, None] + d[None, :], mask=mask, other=0.0).to(PRODUCT_DTYPE)


# ---------------------------------------------------------------------------------------------------
# Shared inner step: one tile of context tokens against a tile of queries, online softmax in base 2.


@triton.jit
def _attend_tile(q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, table_ptr, kv_head_off_k, kv_head_off_v,
                 stride_kb, stride_kt, stride_vb, stride_vt, k_scale_ptr, v_scale_ptr, stride_sb, stride_st,
                 kv_head, qk_scale, n_start, n_end, q_pos,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                 PAGE_SIZE: tl.constexpr, MASK_TOKENS: tl.constexpr, CAUSAL: tl.constexpr, QUANT: tl.constexpr,
                 UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, PRODUCT_DTYPE: tl.constexpr,
                 PTX_WIDEN: tl.constexpr):
    """Fold context tokens `[n_start, n_start + BLOCK_N)` (those `< n_end`) into (acc, m_i, l_i).

    Without MASK_TOKENS every token of the tile is known valid. With CAUSAL, query row i only sees
    tokens at positions `<= q_pos[i]`. `q` is in PRODUCT_DTYPE (`product_dtype`); a cache tile is widened
    to it, and the probabilities enter the second product in it. With QUANT (an int8 cache) the scores
    take each token's K scale, and the probabilities its V scale over the tile's largest, which keeps
    them in [0, 1] for float16; the product is scaled back by that largest.
    """
    n = n_start + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    n_mask = n < n_end
    if MASK_TOKENS:
        page = tl.load(table_ptr + n // PAGE_SIZE, mask=n_mask, other=0).to(tl.int64)
    else:
        page = tl.load(table_ptr + n // PAGE_SIZE).to(tl.int64)
    row = (n % PAGE_SIZE).to(tl.int64)
    if QUANT:
        scale_off = page * stride_sb + row * stride_st + kv_head
        if MASK_TOKENS:
            k_scale = tl.load(k_scale_ptr + scale_off, mask=n_mask, other=0.0)
            v_scale = tl.load(v_scale_ptr + scale_off, mask=n_mask, other=0.0)
        else:
            k_scale = tl.load(k_scale_ptr + scale_off)
            v_scale = tl.load(v_scale_ptr + scale_off)
    k = _load_cache_tile(k_cache_ptr, page * stride_kb + row * stride_kt + kv_head_off_k, n_mask, HEAD_DIM,
                         BLOCK_N, BLOCK_D, MASK_TOKENS, PRODUCT_DTYPE, PTX_WIDEN)  # [BLOCK_N, BLOCK_D]
    if UPCAST_DOT:
        k = k.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [M, BLOCK_N]
    if QUANT:
        s = s * k_scale[None, :]
    if MASK_TOKENS:
        visible = n_mask[None, :]
        if CAUSAL:
            visible = visible & (n[None, :] <= q_pos[:, None])
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_cache_tile(v_cache_ptr, page * stride_vb + row * stride_vt + kv_head_off_v, n_mask, HEAD_DIM,
                         BLOCK_N, BLOCK_D, MASK_TOKENS, PRODUCT_DTYPE, PTX_WIDEN)  # [BLOCK_N, BLOCK_D]
    if QUANT:
        v_max = tl.maximum(tl.max(v_scale, 0), 1e-30)
        p = p * (v_scale / v_max)[None, :]
    p = p.to(PRODUCT_DTYPE)
    if UPCAST_DOT:
        v = v.to(tl.float32)
        p = p.to(tl.float32)
    pv = tl.dot(p, v, input_precision=DOT_PRECISION)
    if QUANT:
        pv = pv * v_max
    acc = acc * alpha[:, None] + pv
    return acc, m_new, l_i


# ---------------------------------------------------------------------------------------------------
# Prefill: grid (Hq, tile map entries); every query tile reads its whole causal context from the paged
# cache, so chunked prefill and prefix-cache hits need nothing special. The tile map, not the grid,
# says which request and tile a program takes, so one grid size serves any mix of requests (CUDA graphs).


@triton.jit(do_not_specialize=["num_tiles", "stride_table"])
def _prefill_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, query_start_loc_ptr, seq_lens_ptr,
                    tiles_ptr, out_ptr, qk_scale, num_tiles,
                    stride_qt, stride_qh, stride_ot, stride_oh,
                    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_table,
                    k_scale_ptr, v_scale_ptr, stride_sb, stride_st,
                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr, QUANT: tl.constexpr,
                    UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, PRODUCT_DTYPE: tl.constexpr,
                    PTX_WIDEN: tl.constexpr):
    head = tl.program_id(0)
    req = tl.load(tiles_ptr + tl.program_id(1))
    if req < 0:  # a padded entry of the tile map
        return
    tile = tl.load(tiles_ptr + num_tiles + tl.program_id(1))
    q_start = tl.load(query_start_loc_ptr + req)
    q_len = tl.load(query_start_loc_ptr + req + 1) - q_start
    if tile * BLOCK_M >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + req)
    ctx_len = seq_len - q_len  # tokens cached before this step's queries
    kv_head = head // GROUP

    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] query index within the request
    d = tl.arange(0, BLOCK_D)
    io_mask = (rows < q_len)[:, None] & (d < HEAD_DIM)[None, :]
    q = tl.load(q_ptr + (q_start + rows)[:, None] * stride_qt + head * stride_qh + d[None, :],
                mask=io_mask, other=0.0)  # [BLOCK_M, BLOCK_D]
    q = _queries_as(q, PRODUCT_DTYPE)
    if UPCAST_DOT:
        q = q.to(tl.float32)
    q_pos = ctx_len + rows

    table_ptr = block_tables_ptr + req.to(tl.int64) * stride_table
    off_k = kv_head * stride_kh
    off_v = kv_head * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Tokens before the tile's first query position are visible to every row: no masks there.
    full_end = (ctx_len + tile * BLOCK_M) // BLOCK_N * BLOCK_N
    causal_end = tl.minimum(seq_len, ctx_len + (tile + 1) * BLOCK_M)
    for n_start in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, table_ptr, off_k, off_v,
                                     stride_kb, stride_kt, stride_vb, stride_vt, k_scale_ptr, v_scale_ptr,
                                     stride_sb, stride_st, kv_head, qk_scale, n_start, causal_end, q_pos,
                                     HEAD_DIM, BLOCK_D, BLOCK_N, PAGE_SIZE, False, False, QUANT, UPCAST_DOT,
                                     DOT_PRECISION, PRODUCT_DTYPE, PTX_WIDEN)
    for n_start in range(full_end, causal_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, table_ptr, off_k, off_v,
                                     stride_kb, stride_kt, stride_vb, stride_vt, k_scale_ptr, v_scale_ptr,
                                     stride_sb, stride_st, kv_head, qk_scale, n_start, causal_end, q_pos,
                                     HEAD_DIM, BLOCK_D, BLOCK_N, PAGE_SIZE, True, True, QUANT, UPCAST_DOT,
                                     DOT_PRECISION, PRODUCT_DTYPE, PTX_WIDEN)
    acc = acc / l_i[:, None]
    tl.store(out_ptr + (q_start + rows)[:, None] * stride_ot + head * stride_oh + d[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=io_mask)


def _check_attention_args(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor) -> None:
    assert k_cache.dtype == v_cache.dtype in (q.dtype, torch.float8_e4m3fn, torch.int8), \
        "the KV cache is in q's dtype, fp8 or int8"
    assert out.dtype == q.dtype
    assert q.shape[-1] == k_cache.shape[-1] and q.shape[1] % k_cache.shape[2] == 0
    assert out.shape == q.shape
    assert q.stride(-1) == out.stride(-1) == k_cache.stride(-1) == v_cache.stride(-1) == 1


def prefill_block_m(head_dim: int, dtype: torch.dtype) -> int:
    """Queries per tile of the prefill kernel: the unit of `layers.attention.prefill_tile_map`."""
    return prefill_config(head_dim, dtype).block_m


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                            seq_lens: torch.Tensor, tiles: torch.Tensor, scale: float,
                            out: torch.Tensor | None = None, *, num_decodes: int = 0,
                            k_scales: torch.Tensor | None = None,
                            v_scales: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of the new queries `[T, Hq, D]` of the requests named in `tiles` over their cached context.

    Request b's queries are `q[query_start_loc[b]:query_start_loc[b+1]]`; its j-th query sits at
    position `seq_lens[b] - q_b + j` and sees cache positions up to and including it. `tiles` `[2, N]`
    int32 (`layers.attention.prefill_tile_map`, with `prefill_block_m` queries per tile) lists one
    (request, query tile) per program; request -1 marks padding. Rows of other requests are not written.
    `num_decodes` (the leading one-query requests) is not needed here: the tile map leaves them out.
    """
    out = torch.empty_like(q) if out is None else out
    _check_attention_args(q, k_cache, v_cache, out)
    num_tiles = tiles.shape[1]
    if num_tiles == 0 or q.shape[0] == 0:
        return out
    assert tiles.stride(1) == 1 and tiles.stride(0) == num_tiles, "the tile map must be contiguous"
    num_heads, head_dim = q.shape[1], q.shape[2]
    config = prefill_config(head_dim, q.dtype)
    scale_args, cache_constexprs = _cache_args(q, k_cache, v_cache, k_scales, v_scales)
    _prefill_kernel[(num_heads, num_tiles)](
        q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, tiles, out, scale * _LOG2E, num_tiles,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0), *scale_args,
        GROUP=num_heads // k_cache.shape[2], HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, PAGE_SIZE=k_cache.shape[1],
        num_warps=config.num_warps, num_stages=config.num_stages, **cache_constexprs)
    return out


# ---------------------------------------------------------------------------------------------------
# Decode: grid (KV heads, requests, segments). One program holds all GROUP query heads of its KV head,
# so each KV tile is loaded once for the whole group. KV heads vary fastest, so the programs of one
# request run together and read each token's cache row (all its heads, contiguous) at once: 3-5% faster
# on an H100 than requests first (`benchmarks/RESULTS.md`, 2026-12-07). With several segments, each
# writes its partial output and log-sum-exp and `_split_reduce_kernel` merges them.


@triton.jit(do_not_specialize=["num_splits", "stride_table"])
def _decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, out_ptr,
                   part_out_ptr, part_lse_ptr, qk_scale, num_splits,
                   stride_qb, stride_qh, stride_ob, stride_oh,
                   stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_table,
                   k_scale_ptr, v_scale_ptr, stride_sb, stride_st,
                   GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr, SPLIT: tl.constexpr, QUANT: tl.constexpr,
                   UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, PRODUCT_DTYPE: tl.constexpr,
                   PTX_WIDEN: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)
    kv_head = tl.program_id(0)
    req = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + req)
    if SPLIT:
        per_split = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
        n_begin = split * per_split
        n_end = tl.minimum(n_begin + per_split, seq_len)
    else:
        n_begin = 0
        n_end = seq_len

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + g  # [BLOCK_G] query heads of this KV head
    io_mask = (g < GROUP)[:, None] & (d < HEAD_DIM)[None, :]
    q = _queries_as(tl.load(q_ptr + req * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=io_mask,
                            other=0.0), PRODUCT_DTYPE)
    if UPCAST_DOT:
        q = q.to(tl.float32)

    table_ptr = block_tables_ptr + req.to(tl.int64) * stride_table
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for n_start in range(n_begin, n_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, table_ptr,
                                     kv_head * stride_kh, kv_head * stride_vh, stride_kb, stride_kt, stride_vb,
                                     stride_vt, k_scale_ptr, v_scale_ptr, stride_sb, stride_st, kv_head, qk_scale,
                                     n_start, n_end, 0, HEAD_DIM, BLOCK_D, BLOCK_N, PAGE_SIZE, True, False, QUANT,
                                     UPCAST_DOT, DOT_PRECISION, PRODUCT_DTYPE, PTX_WIDEN)
    acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # an empty segment (or context) leaves zeros
    if SPLIT:
        part = (req * tl.num_programs(0) * GROUP + heads) * num_splits + split  # [BLOCK_G] row of [B, Hq, S]
        tl.store(part_lse_ptr + part, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), mask=g < GROUP)  # -inf if empty
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM + d[None, :], acc, mask=io_mask)
    else:
        tl.store(out_ptr + req * stride_ob + heads[:, None] * stride_oh + d[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=io_mask)


@triton.jit(do_not_specialize=["num_splits"])
def _split_reduce_kernel(part_out_ptr, part_lse_ptr, out_ptr, num_splits, stride_ob, stride_oh,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
                         PDL: tl.constexpr):
    pdl_wait(PDL)
    req = tl.program_id(0)
    head = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_mask = s < num_splits
    row = (req * tl.num_programs(1) + head) * num_splits + s  # [BLOCK_S]
    lse = tl.load(part_lse_ptr + row, mask=s_mask, other=float("-inf"))  # base-2 log-sum-exp per segment
    lse_max = tl.max(lse, 0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    w = tl.exp2(lse - lse_max)  # [BLOCK_S]; empty segments weigh 0
    part = tl.load(part_out_ptr + row[:, None] * HEAD_DIM + d[None, :],
                   mask=s_mask[:, None] & (d < HEAD_DIM)[None, :], other=0.0)  # [BLOCK_S, BLOCK_D]
    total = tl.sum(w, 0)
    o = tl.sum(part * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + req * stride_ob + head * stride_oh + d, o.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           out: torch.Tensor | None = None, *, k_scales: torch.Tensor | None = None,
                           v_scales: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of one query per request `[B, Hq, D]` over its `seq_lens[b]` cached tokens.

    Split-K is chosen by `decode_num_splits` from the batch size, the SM count and the block-table
    width (an upper bound on the context read without a device sync).
    """
    out = torch.empty_like(q) if out is None else out
    _check_attention_args(q, k_cache, v_cache, out)
    batch, num_heads, head_dim = q.shape
    if batch == 0:
        return out
    num_kv_heads, page_size = k_cache.shape[2], k_cache.shape[1]
    group = num_heads // num_kv_heads
    config = decode_config(head_dim, q.dtype)
    num_splits = decode_num_splits(batch, num_kv_heads, block_tables.shape[1] * page_size, _num_sms(q.device))
    split = num_splits > 1
    if split:
        part_out = torch.empty((batch, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((batch, num_heads, num_splits), dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out  # unused
    block_d = triton.next_power_of_2(head_dim)
    scale_args, cache_constexprs = _cache_args(q, k_cache, v_cache, k_scales, v_scales)
    _decode_kernel[(num_kv_heads, batch, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, out, part_out, part_lse, scale * _LOG2E, num_splits,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0), *scale_args,
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, BLOCK_D=block_d,
        BLOCK_N=config.block_n, PAGE_SIZE=page_size, SPLIT=split, num_warps=config.num_warps,
        num_stages=config.num_stages, **cache_constexprs, **pdl_args(q.device))
    if split:
        _split_reduce_kernel[(batch, num_heads)](
            part_out, part_lse, out, num_splits, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(num_splits),
            num_warps=SPLIT_REDUCE_NUM_WARPS, **pdl_args(q.device))
    return out

