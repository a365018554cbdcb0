"""Pure-torch references for the Triton kernels in this package.

They run on any device and are the CPU path of the engine. Shapes use T = tokens in the step,
B = requests, Hq/Hkv = query/KV heads, D = head size, NB = cache blocks, BS = block size.
The KV cache of one layer is two tensors `[NB, BS, Hkv, D]`; a token at position p of a request
lives in block `block_table[p // BS]`, row `p % BS`, i.e. flat slot `block * BS + p % BS`. An int8
cache comes with two float32 scale tensors `[NB, BS, Hkv]` (`k_scales`, `v_scales`): a stored row
times its scale is the value (`quantize_int8`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FP8_MAX = 448.0  # the largest finite float8 e4m3 value
INT8_MAX = 127.0  # an int8 cache row's largest |value| is stored as this
INT8_AMAX_FLOOR = 1e-30  # the smallest largest-|value| an int8 row is scaled by (an all-zero row stays zero)


def to_cache_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x` as a KV cache of `dtype` holds it: an fp8 cache saturates at +-FP8_MAX (it has no scale)."""
    if dtype == torch.float8_e4m3fn:
        x = x.float().clamp(-FP8_MAX, FP8_MAX)
    return x.to(dtype)


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows `[..., D]` as an int8 cache stores them: values `[..., D]` and float32 scales `[...]`.

    A row's scale is its largest |value| over INT8_MAX; the values are the row times INT8_MAX over that
    largest |value|, rounded half away from zero, so the largest lands on +-127.
    """
    amax = x.float().abs().amax(-1)
    scaled = x.float() * (INT8_MAX / amax.clamp(min=INT8_AMAX_FLOOR))[..., None]
    return torch.trunc(scaled + 0.5 * scaled.sign()).clamp(-INT8_MAX, INT8_MAX).to(torch.int8), amax / INT8_MAX


def kv_caches_as(k: torch.Tensor, v: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Caches `k`, `v` `[NB, BS, Hkv, D]` of real values as caches of `dtype` hold them, and the scale keyword
    arguments the attention ops then take (`k_scales`, `v_scales` for int8; none otherwise)."""
    if dtype != torch.int8:
        return to_cache_dtype(k, dtype), to_cache_dtype(v, dtype), {}
    (k8, k_scales), (v8, v_scales) = quantize_int8(k), quantize_int8(v)
    return k8, v8, dict(k_scales=k_scales, v_scales=v_scales)


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor, *, k_scales: torch.Tensor | None = None,
                   v_scales: torch.Tensor | None = None) -> None:
    """Store `key`/`value` `[T, Hkv, D]` at flat slots `slot_mapping` `[T]` (negative slots are skipped),
    converted to the caches' dtype (`to_cache_dtype`; an int8 cache by `quantize_int8`, its scales
    stored in `k_scales` / `v_scales`)."""
    num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        key, value, slot_mapping = key[valid], value[valid], slot_mapping[valid]
    for cache, scales, x in ((k_cache, k_scales, key), (v_cache, v_scales, value)):
        if cache.dtype == torch.int8:
            x, scale = quantize_int8(x)
            scales.view(num_blocks * block_size, num_kv_heads).index_copy_(0, slot_mapping, scale)
        else:
            x = to_cache_dtype(x, cache.dtype)
        if cache.element_size() == 1:  # torch has no index_copy_ for float8: copy the bytes
            cache, x = cache.view(torch.uint8), x.view(torch.uint8)
        cache.view(num_blocks * block_size, num_kv_heads, head_dim).index_copy_(0, slot_mapping, x)


def dequantize(cache: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
    """Cache rows `[..., D]` in float32: an int8 cache's times their `scales` `[...]`, any other's widened."""
    return cache.float() if scales is None else cache.float() * scales[..., None]


def _gather_context(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The first `seq_len` cached tokens of one request, `[seq_len, Hkv, D]`."""
    block_size = cache.shape[1]
    num_blocks = (seq_len + block_size - 1) // block_size
    return cache[block_table[:num_blocks].long()].flatten(0, 1)[:seq_len]


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                            seq_lens: torch.Tensor, tiles: torch.Tensor, scale: float,
                            out: torch.Tensor | None = None, *, num_decodes: int = 0,
                            k_scales: torch.Tensor | None = None,
                            v_scales: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of the new queries of the requests named in `tiles` over their whole cached context.

    q: `[T, Hq, D]`, requests packed by `query_start_loc` `[B+1]`. Request b has q_b queries and
    `seq_lens[b]` tokens in the cache (its new tokens already written); its j-th query sits at
    position `seq_lens[b] - q_b + j` and sees cache positions up to and including it. `tiles` `[2, N]`
    is the kernel's tile map (`layers.attention.prefill_tile_map`): only its requests (row 0, -1 for
    padding) are computed, whole, whatever its tiling; rows of other requests are not written.
    `num_decodes` is not read (the tile map leaves the decodes out); `flash.paged_prefill_attention` needs it.
    Over an int8 cache (with its scales) the products are taken in float32.
    """
    out = torch.empty_like(q) if out is None else out
    num_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
    starts, lens = query_start_loc.tolist(), seq_lens.tolist()
    for b in sorted(set(tiles[0].tolist()) - {-1}):
        seq_len, q_start, q_end = lens[b], starts[b], starts[b + 1]
        q_len = q_end - q_start
        if q_len == 0:
            continue
        table = block_tables[b]
        queries = q[q_start:q_end]
        if k_scales is None:
            k = _gather_context(k_cache, table, seq_len).to(q.dtype)  # [S, Hkv, D]
            v = _gather_context(v_cache, table, seq_len).to(q.dtype)
        else:
            k = dequantize(_gather_context(k_cache, table, seq_len), _gather_context(k_scales, table, seq_len))
            v = dequantize(_gather_context(v_cache, table, seq_len), _gather_context(v_scales, table, seq_len))
            queries = queries.float()
        if num_heads != num_kv_heads:
            k = k.repeat_interleave(num_heads // num_kv_heads, dim=1)
            v = v.repeat_interleave(num_heads // num_kv_heads, dim=1)
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)[:, None]
        mask = torch.arange(seq_len, device=q.device)[None, :] <= q_pos  # [q_len, S]
        o = F.scaled_dot_product_attention(
            queries.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
            attn_mask=mask, scale=scale)  # [Hq, q_len, D]
        out[q_start:q_end] = o.transpose(0, 1).to(out.dtype)
    return out


def prefill_block_m(head_dim: int, dtype: torch.dtype) -> int:
    """Queries per tile map entry; the reference computes whole requests, so any size gives the same result."""
    del head_dim, dtype
    return 64


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           out: torch.Tensor | None = None, *, k_scales: torch.Tensor | None = None,
                           v_scales: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of one query per request `[B, Hq, D]` over its `seq_lens[b]` cached tokens (zeros where 0).

    Batched: contexts are gathered into a padded `[B, S_max, Hkv, D]` tensor and masked.
    """
    out = torch.empty_like(q) if out is None else out
    batch, num_heads, head_dim = q.shape
    if batch == 0:
        return out
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    max_len = int(seq_lens.max())
    max_blocks = (max_len + block_size - 1) // block_size
    table = block_tables[:, :max_blocks].long()
    k, v = (dequantize(cache[table].flatten(1, 2)[:, :max_len],  # [B, S, Hkv, D]
                       None if scales is None else scales[table].flatten(1, 2)[:, :max_len])
            for cache, scales in ((k_cache, k_scales), (v_cache, v_scales)))
    group = num_heads // num_kv_heads
    qg = q.view(batch, num_kv_heads, group, head_dim).float()
    scores = torch.einsum("bhgd,bshd->bhgs", qg, k) * scale
    valid = torch.arange(max_len, device=q.device)[None, :] < seq_lens[:, None].to(q.device)
    scores.masked_fill_(~valid[:, None, None, :], float("-inf"))
    probs = scores.softmax(dim=-1).nan_to_num(0.0)  # an empty context (padding) gives zeros
    # Rows past a request's seq_len are stale or never written (maybe NaN): 0 * NaN would leak in.
    v = v.masked_fill(~valid[:, :, None, None], 0.0)
    o = torch.einsum("bhgs,bshd->bhgd", probs, v)
    out.copy_(o.reshape(batch, num_heads, head_dim).to(out.dtype))
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RMSNorm in float32 as transformers computes it; with `residual`, add it first and return the sum too."""
    if residual is not None:
        x = x + residual
        residual = x
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype), residual


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """`silu(x[..., :d]) * x[..., d:]` for `x` of last dimension 2d."""
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


def argmax(x: torch.Tensor) -> torch.Tensor:
    """The index of the largest value of each row of `x` `[N, V]` (the first of ties; NaN is largest)."""
    return x.argmax(dim=-1)


def linear_silu_and_mul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`silu(gate) * up` of the stacked gate-up projection `weight` `[2d, K]`: `[..., d]`."""
    return silu_and_mul(F.linear(x, weight, bias))


def apply_rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                 cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style rotary embedding (rotate halves) on q `[T, Hq, D]` and k `[T, Hkv, D]`.

    `cos_sin_cache` is `[max_pos, D]`: cos in the first D/2 columns, sin in the last D/2.
    """
    cos, sin = cos_sin_cache[positions].chunk(2, dim=-1)  # [T, D/2] each
    cos, sin = cos[:, None, :], sin[:, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    return rotate(q), rotate(k)


def rotary_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                    cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slot_mapping: torch.Tensor, qk_norm_weights: tuple[torch.Tensor, torch.Tensor] | None = None,
                    eps: float = 0.0, *, k_scales: torch.Tensor | None = None,
                    v_scales: torch.Tensor | None = None) -> torch.Tensor:
    """What a layer does to this step's q `[T, Hq, D]`, k and v `[T, Hkv, D]` before attending.

    With `qk_norm_weights` (q weight, k weight; Qwen3's per-head RMSNorm) q and k are normalized per
    head and rounded to their dtype; then both are rotated (`apply_rotary`), in place, and k and v are
    stored at `slot_mapping` (`write_kv_cache`). Returns q.
    """
    if qk_norm_weights is not None:
        q.copy_(rms_norm(q, qk_norm_weights[0], eps)[0])
        k.copy_(rms_norm(k, qk_norm_weights[1], eps)[0])
    rotated_q, rotated_k = apply_rotary(q, k, positions, cos_sin_cache)
    q.copy_(rotated_q)
    k.copy_(rotated_k)
    write_kv_cache(k, v, k_cache, v_cache, slot_mapping, k_scales=k_scales, v_scales=v_scales)
    return q


def qkv_rotary_write_kv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, num_q_heads: int,
                        num_kv_heads: int, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                        k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                        qk_norm_weights: tuple[torch.Tensor, torch.Tensor] | None = None,
                        eps: float = 0.0, *, k_scales: torch.Tensor | None = None,
                        v_scales: torch.Tensor | None = None) -> torch.Tensor:
    """A layer's qkv projection `[T, (Hq + 2 Hkv) D]` of `x`, through `rotary_write_kv`: q and k in it
    normalized (with `qk_norm_weights`) and rotated, k and v stored in the caches."""
    qkv = F.linear(x, weight, bias)
    rotary_write_kv(*qkv_heads(qkv, num_q_heads, num_kv_heads, k_cache.shape[-1]), positions, cos_sin_cache,
                    k_cache, v_cache, slot_mapping, qk_norm_weights, eps, k_scales=k_scales, v_scales=v_scales)
    return qkv


def qkv_heads(qkv: torch.Tensor, num_q_heads: int, num_kv_heads: int,
              head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views q `[T, Hq, D]`, k and v `[T, Hkv, D]` into a fused qkv projection `[T, (Hq + 2 Hkv) D]`."""
    q, k, v = qkv.split([num_q_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    return (q.view(-1, num_q_heads, head_dim), k.view(-1, num_kv_heads, head_dim),
            v.view(-1, num_kv_heads, head_dim))


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, *, remote_pairs: bool = False) -> torch.Tensor:
    """Each token of `x` `[T, H]` through its top-k experts, summed with the routing weights: `[T, H]`.

    w13 `[E, 2I, H]` holds each expert's gate rows then up rows, w2 `[E, H, I]` its down projection;
    topk_ids `[T, k]` names the experts of each token and topk_weights `[T, k]` (float32) their weights.
    With `remote_pairs` an id may be E: the expert lives on another expert-parallel rank and the pair
    adds nothing. Expert by expert over the tokens routed to it; the weighted sum is taken in float32.
    """
    num_tokens, top_k = topk_ids.shape
    num_experts = w13.shape[0]
    flat_ids = topk_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)  # pairs t * k + j, grouped by expert; remote ones last
    counts = torch.bincount(flat_ids, minlength=num_experts + 1).tolist()
    if len(counts) > num_experts + 1 or (counts[num_experts] and not remote_pairs):
        raise ValueError(f"expert ids must be in [0, {num_experts}) (or {num_experts} for remote pairs, "
                         f"with remote_pairs=True); got up to {len(counts) - 1}")
    counts = counts[:num_experts]
    pair_weights = topk_weights.reshape(-1).float()
    out = torch.zeros(num_tokens, x.shape[1], dtype=torch.float32, device=x.device)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        pairs = order[start:start + count]
        start += count
        rows = pairs // top_k
        act = silu_and_mul(F.linear(x[rows], w13[expert]))  # [n, I]
        out.index_add_(0, rows, F.linear(act, w2[expert]).float() * pair_weights[pairs, None])
    return out.to(x.dtype)
