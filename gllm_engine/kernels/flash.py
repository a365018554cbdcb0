"""Paged attention through the flash-attn package (the optional `flash-attn` extra), with the signatures
of the Triton kernels in `attention`, so `layers.ops` can put one in place of the other.

flash-attn 2 reads a paged KV cache of the engine's layout, `[NB, BS, Hkv, D]`, in blocks of a multiple
of 256 tokens only (`FLASH_ATTN_BLOCK_SIZE`): the engine's config picks that block size for this
backend. Neither function reads a device tensor on the host. The prefill takes its requests from
`num_decodes` (a host int) rather than from a tile map, so only decode-only steps run in CUDA graphs
with this backend; the Triton kernels stay the default and the reference.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

FLASH_ATTN_BLOCK_SIZE = 256


def is_available() -> bool:
    """Whether the flash-attn package can be imported (it is not imported here)."""
    return importlib.util.find_spec("flash_attn") is not None


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                            seq_lens: torch.Tensor, tiles: torch.Tensor, scale: float,
                            out: torch.Tensor | None = None, *, num_decodes: int = 0) -> torch.Tensor:
    """`attention.paged_prefill_attention` by `flash_attn_varlen_func`, for requests `num_decodes` on.

    Requests before `num_decodes` are decodes, one query each (the batch is ordered decodes first);
    `tiles` is not read. The longest query is bounded by the step's prefill tokens and the longest
    context by the block-table width, so nothing waits for the device.
    """
    from flash_attn import flash_attn_varlen_func

    out = torch.empty_like(q) if out is None else out
    queries = q[num_decodes:]
    if queries.shape[0] == 0:
        return out
    attended = flash_attn_varlen_func(
        queries, k_cache, v_cache, query_start_loc[num_decodes:] - num_decodes,
        F.pad(seq_lens[num_decodes:].cumsum(0, dtype=torch.int32), (1, 0)),
        max_seqlen_q=queries.shape[0], max_seqlen_k=block_tables.shape[1] * k_cache.shape[1],
        softmax_scale=scale, causal=True, block_table=block_tables[num_decodes:seq_lens.shape[0]])
    out[num_decodes:].copy_(attended)
    return out


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           out: torch.Tensor | None = None) -> torch.Tensor:
    """`attention.paged_decode_attention` by `flash_attn_with_kvcache` (rows of length 0 give zeros)."""
    from flash_attn import flash_attn_with_kvcache

    out = torch.empty_like(q) if out is None else out
    if q.shape[0] == 0:
        return out
    attended = flash_attn_with_kvcache(q.unsqueeze(1), k_cache, v_cache, cache_seqlens=seq_lens,
                                       block_table=block_tables, softmax_scale=scale, causal=True)
    out.copy_(attended.squeeze(1))
    return out
