"""Paged attention: per-step metadata and the layer that writes and reads the KV cache."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from gllm_engine.layers.linear import QKVParallelLinear
from gllm_engine.layers.norm import RMSNorm
from gllm_engine.layers.ops import REFERENCE_OPS, KernelOps
from gllm_engine.layers.rotary import RotaryEmbedding


@dataclass
class AttentionMetadata:
    """Where every token of a step lives in the paged cache; built once per step by the runner.

    The batch is ordered decodes first: requests `[0, num_decodes)` have exactly one query token,
    which is token row b of request b. In a CUDA graph the tensors are padded to the graph's size:
    decode rows past `num_decodes` have `decode_seq_lens` 0 (their output is zeros), the tile map
    ends in -1 entries and padded tokens have slot -1.
    """

    slot_mapping: torch.Tensor  # [T] int64: flat cache slot of each new token (-1: padding, not stored)
    query_start_loc: torch.Tensor  # [B+1] int32: cu_seqlens of the queries
    seq_lens: torch.Tensor  # [B] int32: context length after this step (cached + new)
    block_tables: torch.Tensor  # [>= B, max_blocks] int32
    decode_seq_lens: torch.Tensor  # [Bd] int32: seq_lens of the decode rows, 0 past num_decodes
    prefill_tiles: torch.Tensor | None  # [2, N] int32: (request, query tile) per prefill program, or None
    num_decodes: int


def prefill_tile_map(query_lens: np.ndarray, seq_lens: np.ndarray, block_m: int, first_request: int = 0,
                     size: int | None = None) -> np.ndarray:
    """The prefill kernel's work list `[2, N]` int32: (request index, query tile) per program.

    Request `first_request + i` has `query_lens[i]` new queries and `seq_lens[i]` context tokens. Tiles
    that attend to the most context come first, so the longest programs start first. With `size`,
    the map is padded with request -1 to that length (a CUDA graph's fixed grid).
    """
    per_request = -(-query_lens // block_m)
    reqs = np.repeat(np.arange(len(query_lens)), per_request)
    tiles = np.arange(len(reqs)) - np.repeat(np.cumsum(per_request) - per_request, per_request)
    ends = np.minimum((tiles + 1) * block_m, query_lens[reqs]) + (seq_lens - query_lens)[reqs]
    order = np.argsort(-ends, kind="stable")
    n = len(reqs) if size is None else size
    out = np.full((2, n), -1, dtype=np.int32)
    out[0, :len(reqs)] = reqs[order] + first_request
    out[1, :len(reqs)] = tiles[order]
    return out


class Attention(nn.Module):
    """Projects this step's tokens to q, k and v, rotates q and k, stores k/v in the layer's cache blocks, then
    attends over each request's context."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, rotary: RotaryEmbedding,
                 ops: KernelOps = REFERENCE_OPS):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.rotary = rotary
        self.ops = ops
        self.bind_kv_cache(torch.empty(0), torch.empty(0))

    def bind_kv_cache(self, k_cache: torch.Tensor, v_cache: torch.Tensor, k_scales: torch.Tensor | None = None,
                      v_scales: torch.Tensor | None = None) -> None:
        """Give the layer its cache (the model runner does, once allocated): two `[NB, BS, Hkv, D]` tensors,
        and for an int8 cache their `[NB, BS, Hkv]` float32 scales."""
        self.k_cache, self.v_cache, self.k_scales, self.v_scales = k_cache, v_cache, k_scales, v_scales
        # the kernels' keyword arguments for the scales, built here rather than in every forward
        self._scale_kwargs = {} if k_scales is None else dict(k_scales=k_scales, v_scales=v_scales)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, qkv_proj: QKVParallelLinear,
                meta: AttentionMetadata, qk_norm: tuple[RMSNorm, RMSNorm] | None = None) -> torch.Tensor:
        """Projects `x` `[T, H]` to q, k and v by `qkv_proj`; with `qk_norm` (Qwen3) q and k are first
        normalized per head. Returns `[T, Hq * D]`."""
        norm_weights, eps = ((qk_norm[0].weight, qk_norm[1].weight), qk_norm[0].eps) if qk_norm else (None, 0.0)
        scales = self._scale_kwargs
        qkv = self.ops.qkv_rotary_write_kv(x, qkv_proj.weight, qkv_proj.bias, self.num_heads, self.num_kv_heads,
                                           positions, self.rotary.cos_sin_cache, self.k_cache, self.v_cache,
                                           meta.slot_mapping, norm_weights, eps, **scales)
        q = qkv[:, :self.num_heads * self.head_dim].view(-1, self.num_heads, self.head_dim)
        out = torch.empty_like(q)
        rows = meta.decode_seq_lens.shape[0]
        if rows:
            self.ops.paged_decode_attention(q[:rows], self.k_cache, self.v_cache, meta.block_tables[:rows],
                                            meta.decode_seq_lens, self.scale, out=out[:rows], **scales)
        if meta.prefill_tiles is not None:
            self.ops.paged_prefill_attention(q, self.k_cache, self.v_cache, meta.block_tables,
                                             meta.query_start_loc, meta.seq_lens, meta.prefill_tiles,
                                             self.scale, out=out, num_decodes=meta.num_decodes, **scales)
        return out.view(-1, self.num_heads * self.head_dim)
