"""CUDA graphs for decode-only steps.

One graph per padded batch size captures the whole forward pass over static input buffers; a
decode step copies its inputs into the buffers and replays the smallest graph that fits. Padded
rows write their KV to slot -1 (skipped) and attend over one cached token of block 0.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from gllm_engine.layers.attention import AttentionMetadata

logger = logging.getLogger(__name__)


def capture_sizes(max_num_seqs: int) -> list[int]:
    """Batch sizes to capture: 1, 2, 4, 8, then every 16 up to `max_num_seqs`."""
    sizes = [s for s in (1, 2, 4, 8) if s <= max_num_seqs]
    sizes += list(range(16, max_num_seqs + 1, 16))
    if sizes[-1] != max_num_seqs:
        sizes.append(max_num_seqs)
    return sizes


class DecodeGraphs:
    """Captured forward passes of the model for decode batches of `capture_sizes(max_num_seqs)`."""

    def __init__(self, model: nn.Module, max_num_seqs: int, max_blocks_per_seq: int, device: torch.device):
        self.model = model
        self.sizes = capture_sizes(max_num_seqs)
        self.max_size = self.sizes[-1]
        n = self.max_size
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros((n, max_blocks_per_seq), dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def _metadata(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:size], query_start_loc=self.query_start_loc[: size + 1],
            seq_lens=self.seq_lens[:size], block_tables=self.block_tables[:size],
            num_decodes=size, max_query_len=1)

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.perf_counter()
        free_before = torch.cuda.mem_get_info()[0]
        pool = None
        for size in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory pool
            args = (self.input_ids[:size], self.positions[:size], self._metadata(size))
            self.model(*args)  # warm-up: compiles kernels, settles allocations
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = self.model(*args)
            pool = graph.pool() if pool is None else pool
            self.graphs[size] = graph
        torch.cuda.synchronize()
        used = (free_before - torch.cuda.mem_get_info()[0]) / 2**20
        logger.info("captured %d CUDA graphs (batch 1..%d) in %.1f s, %.0f MiB", len(self.sizes),
                    self.max_size, time.perf_counter() - start, used)

    def can_run(self, num_decodes: int, num_seqs: int, max_blocks: int) -> bool:
        return num_decodes == num_seqs and num_seqs <= self.max_size and max_blocks <= self.block_tables.shape[1]

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states `[B, H]` of a decode-only batch of B sequences."""
        b = input_ids.shape[0]
        size = next(s for s in self.sizes if s >= b)
        self.input_ids[:b].copy_(input_ids, non_blocking=True)
        self.positions[:b].copy_(positions, non_blocking=True)
        self.slot_mapping[:b].copy_(meta.slot_mapping, non_blocking=True)
        self.slot_mapping[b:size].fill_(-1)
        self.seq_lens[:b].copy_(meta.seq_lens, non_blocking=True)
        self.seq_lens[b:size].fill_(1)
        width = meta.block_tables.shape[1]
        self.block_tables[:b, :width].copy_(meta.block_tables, non_blocking=True)
        self.graphs[size].replay()
        return self.outputs[size][:b]
