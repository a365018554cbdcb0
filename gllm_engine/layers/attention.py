"""Paged attention: per-step metadata and the layer that writes and reads the KV cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gllm_engine.layers.ops import REFERENCE_OPS, KernelOps


@dataclass
class AttentionMetadata:
    """Where every token of a step lives in the paged cache; built once per step by the runner.

    The batch is ordered decodes first: requests `[0, num_decodes)` have exactly one query token.
    """

    slot_mapping: torch.Tensor  # [T] int64: flat cache slot of each new token
    query_start_loc: torch.Tensor  # [B+1] int32: cu_seqlens of the queries
    seq_lens: torch.Tensor  # [B] int32: context length after this step (cached + new)
    block_tables: torch.Tensor  # [B, max_blocks] int32
    num_decodes: int
    max_query_len: int
    # The prefill requests' slice of query_start_loc, rebased to start at 0.
    prefill_query_start_loc: torch.Tensor | None = None


class Attention(nn.Module):
    """Stores this step's k/v in the layer's cache blocks, then attends over each request's context."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 ops: KernelOps = REFERENCE_OPS):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.ops = ops
        # Bound by the model runner once the cache is allocated: two [NB, BS, Hkv, D] tensors.
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q = q.view(-1, self.num_heads, self.head_dim)  # [T, Hq, D]
        k = k.view(-1, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        self.ops.write_kv_cache(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        nd = meta.num_decodes
        if nd:
            self.ops.paged_decode_attention(q[:nd], self.k_cache, self.v_cache, meta.block_tables[:nd],
                                            meta.seq_lens[:nd], self.scale, out=out[:nd])
        if nd < meta.seq_lens.shape[0]:
            self.ops.paged_prefill_attention(q[nd:], self.k_cache, self.v_cache, meta.block_tables[nd:],
                                             meta.prefill_query_start_loc, meta.seq_lens[nd:],
                                             meta.max_query_len, self.scale, out=out[nd:])
        return out.view(-1, self.num_heads * self.head_dim)
