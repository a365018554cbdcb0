"""CUDA graphs for the steps that launch-bound eager mode would slow down most.

Two sets of graphs capture the whole forward pass over static input buffers: decode-only steps by
padded batch size, and mixed steps (decodes plus at most `MAX_GRAPH_PREFILLS` prefill chunks) by
padded token count. A step's inputs are packed on the host, padded to the graph's size, and copied
into the static buffers in one transfer per dtype; then the graph replays. Padded tokens write
their KV to slot -1 (skipped), padded decode rows have an empty context (zeros out), and padded
prefill tile-map entries are -1 (no work). Larger steps run eagerly.

A larger graph can be the faster one: the library matmuls are not monotone in their rows (on an H100,
cuBLASLt's pick at 288, 352 and 448 rows is 10-40% slower than at the next captured size up). So
each graph is timed once captured, and a size that a larger graph beats by more than `DROP_MARGIN`
is dropped (`kept_sizes`): its steps pad on to the next size kept.
"""

from __future__ import annotations

import logging
import time
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from gllm_engine.layers.attention import AttentionMetadata, prefill_tile_map
from gllm_engine.layers.parallel import SINGLE, TPLayout
from gllm_engine.runner.input_batch import HostUploader, ModelInputs, StepArrays, pack_layout

logger = logging.getLogger(__name__)

MAX_GRAPH_PREFILLS = 16  # prefill chunks a mixed-step graph has tile-map room for
MAX_GRAPH_TOKENS = 1024  # mixed steps up to this many tokens replay a graph (if the step budget allows)
DROP_MARGIN = 0.03  # a size is dropped for a larger graph only when that is this much faster (timing noise)
TIMED_REPLAYS = 3  # replays timed per graph after a warm one; the fastest counts


def capture_sizes(max_size: int, min_size: int = 1) -> list[int]:
    """Sizes to capture up to `max_size`: 1, 2, 4, 8, every 16 to 256, every 32 to 512, then every 64."""
    sizes = [1, 2, 4, 8, *range(16, 257, 16), *range(288, 513, 32), *range(576, max_size + 1, 64)]
    sizes = [s for s in sizes if min_size <= s <= max_size]
    if not sizes or sizes[-1] != max_size:
        sizes.append(max_size)
    return sizes


def kept_sizes(times: dict[int, float], margin: float = DROP_MARGIN) -> list[int]:
    """The sizes worth a graph, ascending, from a replay's time per captured size: each one unless the
    next larger size kept is more than `margin` faster (its steps then pad on to that one)."""
    kept: list[int] = []
    for size in sorted(times, reverse=True):
        if not kept or times[size] <= times[kept[-1]] * (1 + margin):
            kept.append(size)
    return kept[::-1]


class GraphKey(NamedTuple):
    size: int  # padded tokens (= padded requests for decode-only graphs)
    mixed: bool  # has prefill chunks


class StepGraphs:
    """Captured forward passes for decode-only batches up to `max_num_seqs` and mixed steps up to `max_tokens`."""

    def __init__(self, model: nn.Module, max_num_seqs: int, max_tokens: int, max_blocks_per_seq: int,
                 prefill_block_m: int, device: torch.device, tp: TPLayout = SINGLE):
        self.model = model
        self.tp = tp  # its ranks replay graphs together: they must pick the same ones
        self.block_m = prefill_block_m
        self.decode_sizes = capture_sizes(max_num_seqs)
        self.mixed_sizes = capture_sizes(max_tokens, min_size=16) if max_tokens >= 16 else []
        m = self.max_rows = max(self.decode_sizes[-1], self.mixed_sizes[-1] if self.mixed_sizes else 0)
        self.max_tiles = self._num_tiles(m)
        # Flat static inputs, packed as HostUploader packs a step's arrays: int64 [ids | positions | slots],
        # then room for what is read outside the graph (logits indices, the pending-token feed); int32
        # [query_start_loc | seq_lens | decode_seq_lens | tile map], then room for the step's block tables.
        # A graph of size S views the first S (S+1, 2 x tiles) of each region.
        self._at64, size64 = pack_layout([m] * 6, torch.int64.itemsize)
        self._at32, size32 = pack_layout([m + 1, m, m, 2 * self.max_tiles, max_num_seqs * max_blocks_per_seq],
                                         torch.int32.itemsize)
        self.int64 = torch.zeros(size64, dtype=torch.int64, device=device)
        self.int32 = torch.zeros(size32, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros((m, max_blocks_per_seq), dtype=torch.int32, device=device)
        self.graphs: dict[GraphKey, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[GraphKey, torch.Tensor] = {}

    def _num_tiles(self, size: int) -> int:
        return -(-size // self.block_m) + MAX_GRAPH_PREFILLS

    def _inputs(self, key: GraphKey) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        s = key.size
        ids_at, positions_at, slots_at = self._at64[:3]
        cu_at, lens_at, decode_lens_at, tiles_at = self._at32[:4]
        tiles = None
        if key.mixed:
            n = self._num_tiles(s)
            tiles = self.int32[tiles_at:tiles_at + 2 * n].view(2, n)
        meta = AttentionMetadata(
            slot_mapping=self.int64[slots_at:slots_at + s], query_start_loc=self.int32[cu_at:cu_at + s + 1],
            seq_lens=self.int32[lens_at:lens_at + s], block_tables=self.block_tables[:s],
            decode_seq_lens=self.int32[decode_lens_at:decode_lens_at + s], prefill_tiles=tiles, num_decodes=s)
        return self.int64[ids_at:ids_at + s], self.int64[positions_at:positions_at + s], meta

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.perf_counter()
        free_before = torch.cuda.mem_get_info()[0]
        self._reset_padding()
        pool = None
        keys = [GraphKey(s, True) for s in self.mixed_sizes] + [GraphKey(s, False) for s in self.decode_sizes]
        for key in sorted(keys, key=lambda k: -k.size):  # largest first, so smaller graphs reuse its memory pool
            ids, positions, meta = self._inputs(key)
            self.model(ids, positions, meta)  # warm-up: compiles kernels, settles allocations
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[key] = self.model(ids, positions, meta)
            pool = graph.pool() if pool is None else pool
            self.graphs[key] = graph
        torch.cuda.synchronize()
        used = (free_before - torch.cuda.mem_get_info()[0]) / 2**20
        logger.info("captured %d CUDA graphs (decode batches 1..%d, mixed steps 16..%d tokens) in %.1f s, %.0f MiB",
                    len(self.graphs), self.decode_sizes[-1], self.mixed_sizes[-1] if self.mixed_sizes else 0,
                    time.perf_counter() - start, used)
        start = time.perf_counter()
        dropped = self._drop_slower_graphs()
        logger.info("timed the graphs in %.1f s; dropped for a faster larger one: %s", time.perf_counter() - start,
                    ", ".join(f"{'mixed ' if k.mixed else ''}{k.size}" for k in dropped) or "none")

    def _replay_ms(self, key: GraphKey) -> float:
        """The fastest of `TIMED_REPLAYS` replays of graph `key` on the padding inputs, after a warm one."""
        graph = self.graphs[key]
        graph.replay()
        fastest = float("inf")
        for _ in range(TIMED_REPLAYS):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            graph.replay()
            end.record()
            end.synchronize()
            fastest = min(fastest, begin.elapsed_time(end))
        return fastest

    def _drop_slower_graphs(self) -> list[GraphKey]:
        """Time every graph (summed over the tensor-parallel ranks, so all decide alike) and drop the sizes
        `kept_sizes` leaves out; the keys dropped."""
        keys = sorted(self.graphs)
        times = self.tp.all_reduce(torch.tensor([self._replay_ms(k) for k in keys], device=self.int64.device))
        by_key = dict(zip(keys, times.tolist()))
        self.decode_sizes = kept_sizes({k.size: t for k, t in by_key.items() if not k.mixed})
        self.mixed_sizes = kept_sizes({k.size: t for k, t in by_key.items() if k.mixed})
        dropped = [k for k in keys if k.size not in (self.mixed_sizes if k.mixed else self.decode_sizes)]
        for key in dropped:
            del self.graphs[key], self.outputs[key]
        return dropped

    def _reset_padding(self) -> None:
        """Inputs that make every row padding: no KV written, no context read, no prefill tile."""
        slots_at, tiles_at = self._at64[2], self._at32[3]
        self.int64.zero_()
        self.int64[slots_at:slots_at + self.max_rows] = -1
        self.int32.zero_()
        self.int32[tiles_at:tiles_at + 2 * self.max_tiles] = -1

    def pick(self, step: StepArrays) -> GraphKey | None:
        """The graph that can run `step`, or None (eager)."""
        if step.block_tables.shape[1] > self.block_tables.shape[1]:
            return None
        if step.num_decodes == step.num_requests:
            size = next((s for s in self.decode_sizes if s >= step.num_requests), None)
            return GraphKey(size, False) if size is not None else None
        if step.num_requests - step.num_decodes > MAX_GRAPH_PREFILLS:
            return None
        size = next((s for s in self.mixed_sizes if s >= step.num_tokens), None)
        return GraphKey(size, True) if size is not None else None

    def load(self, key: GraphKey, step: StepArrays, uploader: HostUploader) -> ModelInputs:
        """Copy `step` into the static inputs of graph `key`; the inputs as views of them."""
        m, t, b, nd = self.max_rows, step.num_tokens, step.num_requests, step.num_decodes
        slots = np.full(m, -1, dtype=np.int64)
        slots[:t] = step.slot_mapping
        decode_lens = np.zeros(m, dtype=np.int32)
        decode_lens[:nd] = step.seq_lens[:nd]
        tiles = np.full(2 * self.max_tiles, -1, dtype=np.int32)
        if key.mixed:
            tiles[:2 * self._num_tiles(key.size)] = prefill_tile_map(
                step.query_lens[nd:], step.seq_lens[nd:], self.block_m, nd, self._num_tiles(key.size)).reshape(-1)
        int64 = [_pad(step.input_ids, m), _pad(step.positions, m), slots, step.logits_indices, *step.feed_arrays()]
        (_, _, _, logits, *feed), (_, _, _, _, tables) = uploader.upload(
            int64, [_pad(step.query_start_loc, m + 1), _pad(step.seq_lens, m), decode_lens, tiles, step.block_tables],
            into=(self.int64, self.int32))
        self.block_tables[:b, :tables.shape[1]].copy_(tables)
        ids, positions, meta = self._inputs(key)
        meta.num_decodes = nd
        return ModelInputs(ids, positions, meta, logits, tuple(feed) if feed else None)

    def replay(self, key: GraphKey, num_tokens: int) -> torch.Tensor:
        """Hidden states `[T, H]` of the step last loaded for graph `key`."""
        self.graphs[key].replay()
        return self.outputs[key][:num_tokens]


def _pad(a: np.ndarray, size: int) -> np.ndarray:
    out = np.zeros(size, dtype=a.dtype)
    out[:len(a)] = a
    return out
