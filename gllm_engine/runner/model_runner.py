"""Turns a step plan into tensors, runs this rank's part of the model and samples.

Owns the model (or its pipeline stage / tensor shard), the KV-cache tensors, the mirror of
sequence state and the sampling generators of one rank.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.profiler import record_function

from gllm_engine.config import EngineConfig
from gllm_engine.layers.attention import AttentionMetadata, prefill_tile_map
from gllm_engine.layers.ops import select_ops
from gllm_engine.layers.parallel import ALL_EXPERTS, SINGLE, WHOLE_MODEL, EPLayout, PPStage, TPLayout
from gllm_engine.loader.weights import load_model_weights
from gllm_engine.models.registry import get_model_class
from gllm_engine.runner.cuda_graph import MAX_GRAPH_TOKENS, StepGraphs
from gllm_engine.runner.input_batch import (
    PENDING_TOKEN,
    HostUploader,
    InputBatch,
    ModelInputs,
    SeqState,
    StepArrays,
    StepPlan,
)
from gllm_engine.runner.sampler import PendingSample, SamplerOutput, SamplingBatch, sample

logger = logging.getLogger(__name__)

Intermediate = tuple[torch.Tensor, torch.Tensor]  # (hidden, residual), each [T, H], between pipeline stages


@dataclass(frozen=True)
class RankLayout:
    """Where this rank sits: its device, tensor-parallel group, pipeline stage and share of the experts."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    tp: TPLayout = SINGLE
    stage: PPStage = WHOLE_MODEL
    ep: EPLayout = ALL_EXPERTS

    @property
    def samples(self) -> bool:
        """Only the first tensor-parallel rank of the last stage samples tokens."""
        return self.stage.is_last and self.tp.rank == 0


class ModelRunner:
    """One rank's model, KV cache and CUDA graphs: turns each step plan into a forward pass and samples."""

    def __init__(self, config: EngineConfig, layout: RankLayout | None = None, *, show_progress: bool = True):
        self.config = config
        self.layout = layout or RankLayout(device=config.device.device)
        self.device = self.layout.device
        self.dtype = config.model.dtype
        self.cache_dtype = config.cache.dtype_for(self.dtype)
        self.block_size = config.cache.block_size
        hf = config.model.hf_config
        self.ops = select_ops(self.device, config.device.use_reference_kernels, config.device.attention_backend)
        model_cls = get_model_class(config.model.architecture)
        parallel = {"tp": self.layout.tp, "stage": self.layout.stage}
        if self.layout.ep.size > 1:  # MoE models only: the config rejects expert parallelism for the others
            parallel["ep"] = self.layout.ep
        torch.manual_seed(config.model.seed)
        with torch.device(self.device), _default_dtype(self.dtype):
            self.model = model_cls(hf, max_positions=config.model.max_model_len, ops=self.ops,
                                   architecture=config.model.architecture, **parallel)
        self.model.eval()
        start = time.perf_counter()
        load_model_weights(self.model, config.model.files, dummy_seed=config.model.seed,
                           show_progress=show_progress)
        logger.info("loaded %s in %.1f s", config.model.name, time.perf_counter() - start)
        self.vocab_size = hf.vocab_size
        self.hidden_size = hf.hidden_size
        self.prefill_block_m = self.ops.prefill_block_m(self.model.attention_layers()[0].head_dim, self.dtype)
        self.input_batch = InputBatch()
        self.uploader = HostUploader(self.device)
        self.generators: dict[int, torch.Generator] = {}
        self.graphs: StepGraphs | None = None
        # Set by an executor whose scheduler plans decodes of pending tokens (async scheduling): the
        # runner then keeps the last step's sampled tokens (on the device) and each sequence's row in
        # them, the next step's pending input tokens, and fills its mirrors in when they reach the host.
        self.feeds_pending_tokens = False
        self.last_samples: tuple[torch.Tensor, dict[int, int]] | None = None

    def initialize_cache(self, num_blocks: int) -> None:
        """Allocate `num_blocks` KV blocks for every local layer, then capture CUDA graphs if enabled."""
        self._allocate_kv_cache(num_blocks)
        use_graphs = (self.device.type == "cuda" and not self.config.device.enforce_eager
                      and self.layout.stage.size == 1)
        if use_graphs:
            max_blocks = -(-self.config.model.max_model_len // self.block_size)
            sched = self.config.scheduler
            # flash-attn's prefill is sized by the step's decode count on the host: no mixed-step graphs
            mixed_tokens = 0 if self.ops.name == "flash-attn" else min(MAX_GRAPH_TOKENS, sched.max_num_batched_tokens)
            self.graphs = StepGraphs(self.model, sched.max_num_seqs, mixed_tokens, max_blocks,
                                     self.prefill_block_m, self.device, self.layout.tp)
            self.graphs.capture()

    @property
    def decode_graph_sizes(self) -> tuple[int, ...]:
        """The batch sizes decode-only steps are padded to (their CUDA graphs, ascending); empty when eager."""
        return tuple(self.graphs.decode_sizes) if self.graphs is not None else ()

    # ---- KV cache -------------------------------------------------------------------------------
    def kv_block_bytes(self) -> int:
        """Bytes one KV block takes over all of this rank's layers, K and V, in the cache dtype (with an
        int8 cache's float32 scales)."""
        layers = self.model.attention_layers()
        attn = layers[0]
        scale_bytes = torch.float32.itemsize if self.cache_dtype == torch.int8 else 0
        per_head = attn.head_dim * self.cache_dtype.itemsize + scale_bytes
        return 2 * attn.num_kv_heads * per_head * self.block_size * len(layers)

    def _bind_kv_cache(self, num_blocks: int) -> None:
        """Give every attention layer zeroed caches of `num_blocks` blocks (and scales for an int8 cache)."""
        for attn in self.model.attention_layers():
            shape = (num_blocks, self.block_size, attn.num_kv_heads, attn.head_dim)  # [NB, BS, Hkv, D]
            caches = [torch.zeros(shape, dtype=self.cache_dtype, device=self.device) for _ in range(2)]
            if self.cache_dtype == torch.int8:
                caches += [torch.zeros(shape[:-1], dtype=torch.float32, device=self.device) for _ in range(2)]
            attn.bind_kv_cache(*caches)

    def available_num_blocks(self) -> int:
        """How many KV blocks this rank can hold: the override, the GPU's profiled room, or the CPU budget."""
        cache = self.config.cache
        if cache.num_gpu_blocks_override is not None:
            return cache.num_gpu_blocks_override
        if self.device.type == "cuda":
            return self._profile_num_gpu_blocks()
        num_blocks = int(cache.cpu_kv_cache_gib * 2**30) // self.kv_block_bytes()
        # No need for more than every running sequence at full length.
        sched = self.config.scheduler
        per_seq = -(-sched.max_model_len // self.block_size)
        return min(num_blocks, per_seq * sched.max_num_seqs)

    def _allocate_kv_cache(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise RuntimeError("no memory is left for the KV cache; lower max_num_batched_tokens or raise "
                               "gpu_memory_utilization")
        self._bind_kv_cache(num_blocks)
        logger.info("KV cache: %d blocks of %d tokens (%.2f GiB, %s)", num_blocks, self.block_size,
                    num_blocks * self.kv_block_bytes() / 2**30, str(self.cache_dtype).removeprefix("torch."))

    @torch.inference_mode()
    def _profile_num_gpu_blocks(self) -> int:
        """Run the largest step once without a cache and give what memory is left to KV blocks."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        num_tokens = self.config.scheduler.max_num_batched_tokens
        num_seqs = min(self.config.scheduler.max_num_seqs, num_tokens)
        num_blocks = -(-num_tokens // self.block_size)
        self._bind_kv_cache(num_blocks)
        ids = torch.zeros(num_tokens, dtype=torch.long, device=self.device)
        positions = torch.arange(num_tokens, device=self.device) % self.config.model.max_model_len
        intermediate = None
        if not self.layout.stage.is_first:
            zeros = torch.zeros(num_tokens, self.hidden_size, dtype=self.dtype, device=self.device)
            intermediate = (zeros, zeros.clone())
        meta = _single_sequence_metadata(num_tokens, num_blocks, self.prefill_block_m, self.device)
        hidden = self.model(ids, positions, meta, intermediate)
        if self.layout.stage.is_last:  # and the float32 copy of the logits a sampled (not greedy) step makes
            self.model.compute_logits(hidden[:num_seqs]).float()
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        total = torch.cuda.get_device_properties(self.device).total_memory
        free_now, _ = torch.cuda.mem_get_info(self.device)
        # Memory others hold on this device (other processes, the CUDA context) counts against us too.
        used_outside = total - free_now - torch.cuda.memory_reserved(self.device)
        util = self.config.cache.gpu_memory_utilization
        budget = total * util - peak - used_outside
        for attn in self.model.attention_layers():
            attn.bind_kv_cache(torch.empty(0), torch.empty(0))
        torch.cuda.empty_cache()
        if budget < self.kv_block_bytes():
            raise RuntimeError(
                f"no GPU memory is left for the KV cache: gpu_memory_utilization {util} allows "
                f"{total * util / 2**30:.2f} GiB, the model and its largest step ({num_tokens} tokens) take "
                f"{peak / 2**30:.2f} GiB and other allocations on the device {used_outside / 2**30:.2f} GiB; "
                "raise gpu_memory_utilization or lower max_num_batched_tokens")
        return int(budget // self.kv_block_bytes())

    # ---- one step -------------------------------------------------------------------------------
    def step_arrays(self, plan: StepPlan, states: list[SeqState]) -> StepArrays:
        """The step's model inputs on the host: token ids, positions, cache slots and per-request lengths."""
        bs = self.block_size
        n = len(states)
        starts = np.fromiter((d.num_computed_tokens for d in plan.seqs), dtype=np.int64, count=n)
        q_lens = np.fromiter((d.num_new_tokens for d in plan.seqs), dtype=np.int64, count=n)
        # Block tables: every row's blocks in one flat array, scattered into a zero-padded [n, W] table.
        widths = np.fromiter((len(st.block_array) for st in states), dtype=np.int64, count=n)
        tables = np.zeros((n, int(widths.max())), dtype=np.int32)
        table_rows = np.repeat(np.arange(n), widths)
        tables[table_rows, np.arange(len(table_rows)) - np.repeat(np.cumsum(widths) - widths, widths)] = \
            np.concatenate([st.block_array for st in states])
        ids: list[int] = []
        for d, st in zip(plan.seqs, states):
            if d.num_new_tokens == 1:
                ids.append(st.token_ids[d.num_computed_tokens])
            else:
                ids.extend(st.token_ids[d.num_computed_tokens:d.num_computed_tokens + d.num_new_tokens])
        ends = np.cumsum(q_lens)
        # Per token: its row, then its position in the sequence and its cache slot.
        rows = np.repeat(np.arange(n), q_lens)
        pos = np.arange(int(ends[-1])) - np.repeat(ends - q_lens - starts, q_lens)
        slots = tables[rows, pos // bs].astype(np.int64) * bs + pos % bs
        cu = np.zeros(n + 1, dtype=np.int32)
        cu[1:] = ends
        input_ids = np.asarray(ids, dtype=np.int64)
        step = StepArrays(
            input_ids=input_ids, positions=pos, slot_mapping=slots,
            logits_indices=ends[np.fromiter((d.samples for d in plan.seqs), dtype=bool, count=n)] - 1,
            query_start_loc=cu, query_lens=q_lens.astype(np.int32), seq_lens=(starts + q_lens).astype(np.int32),
            block_tables=tables, num_decodes=plan.num_decodes)
        feed = np.flatnonzero(input_ids[:plan.num_decodes] == PENDING_TOKEN)  # only a decode's input can be pending
        if feed.size:
            step.feed_rows, step.feed_sources = feed, self._feed_sources(plan, feed)
            input_ids[feed] = 0
        return step

    def _feed_sources(self, plan: StepPlan, rows: np.ndarray) -> np.ndarray:
        """Rows in the last step's samples of the sequences at `rows`, whose input tokens are pending."""
        sample_rows = self.last_samples[1] if self.last_samples is not None else {}
        try:
            return np.fromiter((sample_rows[plan.seqs[r].seq_id] for r in rows), dtype=np.int64, count=len(rows))
        except KeyError as e:
            raise RuntimeError(f"sequence {e.args[0]} has a pending input token the last step did not sample") from None

    def prepare_inputs(self, step: StepArrays) -> ModelInputs:
        """The step's inputs on the device (eager)."""
        nd, n = step.num_decodes, step.num_requests
        int32 = [step.query_start_loc, step.seq_lens, step.block_tables]
        if nd < n:
            int32.append(prefill_tile_map(step.query_lens[nd:], step.seq_lens[nd:], self.prefill_block_m, nd))
        (input_ids, positions, slots, logits, *feed), (cu, seq_lens, tables, *tiles) = self.uploader.upload(
            [step.input_ids, step.positions, step.slot_mapping, step.logits_indices, *step.feed_arrays()], int32)
        meta = AttentionMetadata(
            slot_mapping=slots, query_start_loc=cu, seq_lens=seq_lens, block_tables=tables,
            decode_seq_lens=seq_lens[:nd], prefill_tiles=tiles[0] if tiles else None, num_decodes=nd)
        return ModelInputs(input_ids, positions, meta, logits, tuple(feed) if feed else None)

    @torch.inference_mode()
    def execute(self, plan: StepPlan, intermediate: Intermediate | None = None
                ) -> PendingSample | Intermediate | None:
        """Launch this rank's part of one step.

        Returns what the next pipeline stage needs on a non-last stage; on the last stage the
        sampled tokens (one per sequence whose chunk `samples`, still on the device) on the sampling
        rank, None elsewhere.
        """
        with record_function("prepare_inputs"):
            for seq_id in plan.finished_seq_ids:
                self.generators.pop(seq_id, None)
            states = self.input_batch.apply(plan)
            step = self.step_arrays(plan, states)
            graph = self.graphs.pick(step) if self.graphs is not None else None
            inputs = (self.graphs.load(graph, step, self.uploader) if graph is not None
                      else self.prepare_inputs(step))
            if inputs.feed is not None:
                rows, sources = inputs.feed
                inputs.input_ids.index_copy_(0, rows, self.last_samples[0].index_select(0, sources))
        with record_function("forward"):
            if graph is not None:
                hidden = self.graphs.replay(graph, step.num_tokens)
            else:
                hidden = self.model(inputs.input_ids, inputs.positions, inputs.meta, intermediate)
            if not self.layout.stage.is_last:
                return hidden
            if step.logits_indices.size == 0:
                self.last_samples = None
                return PendingSample(torch.empty(0, dtype=torch.int64)) if self.layout.samples else None
            logits = self.model.compute_logits(hidden[inputs.logits_indices])  # every TP rank joins the gather
        if not self.layout.samples:
            return None
        with record_function("sample"):
            sampled = [(d, st) for d, st in zip(plan.seqs, states) if d.samples]
            batch = SamplingBatch.build([st for _, st in sampled], self.device, self.vocab_size, self.generators)
            result = sample(logits, batch, self.ops.argmax)
            result.start_copy()
            if self.feeds_pending_tokens:
                result.positions = [(st, d.num_computed_tokens + d.num_new_tokens) for d, st in sampled]
                self.last_samples = (result.tokens, {d.seq_id: row for row, (d, _) in enumerate(sampled)})
            return result

    def collect(self, pending: PendingSample) -> SamplerOutput:
        """Wait for one step's samples, and write each token into this rank's mirror of its sequence
        where a later step already holds its placeholder."""
        out = pending.to_host()
        for (state, pos), token in zip(pending.positions, out.token_ids):
            state.fill_sampled(pos, token)
        return out

    def reset(self) -> None:
        """Forget the last step's samples: the steps after it were rolled back."""
        self.last_samples = None


def _single_sequence_metadata(num_tokens: int, num_blocks: int, block_m: int, device: torch.device
                              ) -> AttentionMetadata:
    """One sequence of `num_tokens` new tokens in blocks 0..num_blocks-1 (memory profiling)."""
    cu = torch.tensor([0, num_tokens], dtype=torch.int32, device=device)
    tiles = prefill_tile_map(np.array([num_tokens]), np.array([num_tokens]), block_m)
    return AttentionMetadata(
        slot_mapping=torch.arange(num_tokens, dtype=torch.int64, device=device),
        query_start_loc=cu, seq_lens=cu[1:].clone(),
        block_tables=torch.arange(num_blocks, dtype=torch.int32, device=device)[None, :],
        decode_seq_lens=cu[:0], prefill_tiles=torch.from_numpy(tiles).to(device), num_decodes=0,
    )


class _default_dtype:
    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def __enter__(self) -> None:
        self.previous = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)

    def __exit__(self, *exc) -> None:
        torch.set_default_dtype(self.previous)
