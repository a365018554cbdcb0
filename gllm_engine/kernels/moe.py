"""Fused mixture-of-experts MLP in Triton. Reference: `reference.fused_moe`.

A step routes each of its T tokens to k experts: P = T * k (token, expert) pairs, pair p = t * k + j.
1. `align_by_expert` sorts the pairs by expert and pads each expert's run to a multiple of BLOCK_M,
   so every BLOCK_M rows of the sorted list belong to one expert (one Triton program for a small
   step, torch ops for a large one).
2. The gate-up grouped GEMM: each program multiplies BLOCK_M sorted pairs' token rows by a BLOCK_N
   slice of its expert's gate rows and the matching up rows, and stores silu(gate) * up `[P, I]`.
3. The down grouped GEMM multiplies those rows by the expert's w2, scales each row by its routing
   weight and stores `[P, H]` per pair; the k rows of each token are then summed (the combine).

Weights: w13 `[E, 2I, H]` (gate rows, then up rows), w2 `[E, H, I]`, as `layers.moe.FusedMoE` holds them.
Expert parallelism: a rank holds E of the model's experts, and a pair whose expert is elsewhere carries
the id E ("remote"); the sort leaves it out, so no program computes it and it adds nothing to the sum.
Nothing reads a device tensor on the host: a decode step through here can be captured in a CUDA graph.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from gllm_engine.kernels.dot import dot_args

# ---------------------------------------------------------------------------------------------------
# Tuning: the one place that picks tiles. A table of measured configurations per device, shape and
# dtype, bucketed by the number of tokens, and a default for everything else.


class MoeTiles(NamedTuple):
    block_m: int  # sorted pairs per program (also the padding of each expert's run)
    block_n: int  # output columns per program
    block_k: int  # reduction step
    group_m: int  # row blocks that share a column slice in launch order (L2 reuse of the weights)
    num_warps: int
    num_stages: int


# (device name, experts, hidden, intermediate per rank, dtype) -> ((up to this many tokens, tiles), ...),
# ascending; the first bucket that holds the step's tokens applies, the last one beyond it.
# The Qwen3-30B-A3B entry is a starting point, not yet timed: `benchmarks/moe_kernel.py --sweep` on the
# H100 prints the fastest candidate per batch size, which should replace it together with its timings.
# Compiled for sm_90 with Triton 3.6 and 3.9: at most 144 KiB of shared memory (of 227), no register
# spills, and the weight tiles stream in through pipelined 16-byte async copies.
TUNED_TILES: dict[tuple[str, int, int, int, torch.dtype], tuple[tuple[int, MoeTiles], ...]] = {
    ("NVIDIA H100 80GB HBM3", 128, 2048, 768, torch.bfloat16): (
        (8, MoeTiles(16, 32, 128, 1, 4, 4)),  # batch 1: 8 experts x 24 column slices = 192 programs
        (64, MoeTiles(16, 128, 64, 1, 4, 4)),
        (512, MoeTiles(32, 128, 64, 8, 4, 4)),
        (2048, MoeTiles(64, 128, 64, 8, 8, 3)),
        (1 << 30, MoeTiles(128, 128, 64, 8, 8, 3)),
    ),
}


def default_tiles(num_tokens: int, top_k: int, num_experts: int, dtype: torch.dtype) -> MoeTiles:
    """Tiles for shapes the table does not know: small row blocks while experts see few pairs each."""
    if dtype == torch.float32:  # a testing dtype: tiles small enough for four-byte operands
        return MoeTiles(16, 32, 32, 1, 4, 2)
    pairs_per_expert = num_tokens * top_k / num_experts
    if pairs_per_expert <= 16:  # decode: the weights stream through once, rows are few
        return MoeTiles(16, 64, 128, 1, 4, 4)
    if pairs_per_expert <= 64:
        return MoeTiles(32, 128, 64, 8, 4, 4)
    return MoeTiles(64, 128, 64, 8, 8, 3)


def moe_config(num_tokens: int, top_k: int, w13: torch.Tensor, dtype: torch.dtype) -> MoeTiles:
    """The tiles for a step of `num_tokens` tokens over experts `w13` `[E, 2I, H]`."""
    num_experts, two_inter, hidden = w13.shape
    key = (_device_name(w13.device), num_experts, hidden, two_inter // 2, dtype)
    for max_tokens, tiles in TUNED_TILES.get(key, ()):
        if num_tokens <= max_tokens:
            return tiles
    return default_tiles(num_tokens, top_k, num_experts, dtype)


def _device_name(device: torch.device) -> str:
    return _cuda_device_name(device.index or 0) if device.type == "cuda" else device.type


@functools.cache
def _cuda_device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


# ---------------------------------------------------------------------------------------------------
# Sorting the pairs by expert


def padded_size(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Length of the sorted list: every pair plus the worst-case padding of each non-empty expert."""
    bound = num_pairs + min(num_experts, num_pairs) * (block_m - 1)
    return -(-bound // block_m) * block_m


def align_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairs grouped by expert, each expert's run padded to a multiple of `block_m`.

    topk_ids: `[T, k]` int64 in [0, E]; E marks a remote pair (expert parallelism), which is left out. Returns
      sorted_ids `[S]` int32: pair indices t * k + j, expert by expert (stable), P where padding;
      expert_ids `[S / block_m]` int64: the expert of each row block (E for blocks past the end);
      num_padded `[1]` int64: how many entries of sorted_ids are used (a multiple of block_m).
    S = `padded_size(P, E, block_m)` depends only on the shapes, so nothing is read back to the host.
    Up to ALIGN_KERNEL_MAX_PAIRS pairs one Triton program does it all; larger steps sort with torch.
    """
    if topk_ids.numel() <= ALIGN_KERNEL_MAX_PAIRS:
        return align_by_expert_kernel(topk_ids, num_experts, block_m)
    return align_by_expert_sorted(topk_ids, num_experts, block_m)


def align_by_expert_sorted(topk_ids: torch.Tensor, num_experts: int, block_m: int
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`align_by_expert` in torch ops: a stable sort, then each pair moved to its expert's padded run."""
    flat = topk_ids.reshape(-1)
    num_pairs, device = flat.numel(), flat.device
    sorted_experts, order = torch.sort(flat, stable=True)  # [P]; remote pairs (id E) last
    experts = torch.arange(num_experts + 1, dtype=flat.dtype, device=device)
    starts = torch.searchsorted(sorted_experts, experts)  # [E+1]: where each expert's run begins
    counts = starts.diff()  # [E]
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)  # [E]
    # Sorted position i of expert e moves to padded_start[e] + (i - starts[e]); remote pairs to a scratch
    # slot past the end (no host-side count, so the step stays capturable in a CUDA graph).
    shift = padded_end - padded - starts[:-1]
    local = sorted_experts < num_experts
    dest = torch.arange(num_pairs, device=device) + shift[sorted_experts.clamp(max=num_experts - 1)]
    size = padded_size(num_pairs, num_experts, block_m)
    sorted_ids = torch.full((size + 1,), num_pairs, dtype=torch.int32, device=device)
    sorted_ids.scatter_(0, torch.where(local, dest, size), order.to(torch.int32))
    block_starts = torch.arange(0, size, block_m, device=device)
    expert_ids = torch.searchsorted(padded_end, block_starts, right=True)
    return sorted_ids[:size], expert_ids, padded_end[-1:]


# One program streams the pairs in chunks; past ~a decode batch of pairs, the sort's few large
# launches beat its longer loop. `benchmarks/moe_kernel.py` times both at each batch size.
ALIGN_KERNEL_MAX_PAIRS = 1024
ALIGN_CHUNK = 128  # pairs per step of the program (a [CHUNK, CHUNK] comparison ranks them)
ALIGN_NUM_WARPS = 4


@triton.jit(do_not_specialize=["num_pairs", "size", "num_blocks"])
def _align_kernel(topk_ids_ptr, sorted_ids_ptr, expert_ids_ptr, num_padded_ptr, offsets_ptr,
                  num_pairs, num_experts, size, num_blocks,
                  BLOCK_M: tl.constexpr, NUM_BINS: tl.constexpr, CHUNK: tl.constexpr):
    """One program: counts per expert, padded runs, the expert of every row block, then each pair's slot.

    Bins at or past `num_experts` stay empty but for bin `num_experts` (remote pairs) and the last one
    (masked lanes); neither kind of pair gets a slot.
    `offsets_ptr` `[NUM_BINS]` int32 is scratch through which the lanes look up their expert's next slot.
    """
    lanes = tl.arange(0, CHUNK)
    bins = tl.arange(0, NUM_BINS)
    for start in range(0, size, CHUNK):
        slots = start + lanes
        tl.store(sorted_ids_ptr + slots, tl.zeros((CHUNK,), tl.int32) + num_pairs, mask=slots < size)
    counts = tl.zeros((NUM_BINS,), tl.int32)
    for start in range(0, num_pairs, CHUNK):
        pairs = start + lanes
        ids = tl.load(topk_ids_ptr + pairs, mask=pairs < num_pairs, other=NUM_BINS - 1).to(tl.int32)
        counts += tl.histogram(ids, NUM_BINS)
    counts = tl.where(bins < num_experts, counts, 0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    padded_end = tl.cumsum(padded, 0)  # [NUM_BINS]; bins past the experts end at the total
    tl.store(num_padded_ptr, tl.sum(padded, 0).to(tl.int64))
    for start in range(0, num_blocks, CHUNK):
        blocks = start + lanes
        ended = padded_end[None, :] <= (blocks * BLOCK_M)[:, None]  # [CHUNK, NUM_BINS]
        expert = tl.minimum(tl.sum(ended.to(tl.int32), axis=1), num_experts)
        tl.store(expert_ids_ptr + blocks, expert.to(tl.int64), mask=blocks < num_blocks)
    next_slot = padded_end - padded  # [NUM_BINS]: where each expert's next pair goes
    for start in range(0, num_pairs, CHUNK):
        pairs = start + lanes
        ids = tl.load(topk_ids_ptr + pairs, mask=pairs < num_pairs, other=NUM_BINS - 1).to(tl.int32)
        valid = ids < num_experts  # in range and not remote
        # Publish next_slot for the per-pair gather: written, barrier, read, barrier (before the next write).
        tl.store(offsets_ptr + bins, next_slot)
        tl.debug_barrier()  # also orders the padding fill before the pairs' stores
        earlier = (ids[:, None] == ids[None, :]) & (lanes[None, :] < lanes[:, None])  # same expert, before
        rank = tl.sum(earlier.to(tl.int32), axis=1)
        slot = tl.load(offsets_ptr + ids, mask=valid, other=0) + rank
        tl.store(sorted_ids_ptr + slot, pairs, mask=valid)
        next_slot += tl.histogram(ids, NUM_BINS)
        tl.debug_barrier()


def align_by_expert_kernel(topk_ids: torch.Tensor, num_experts: int, block_m: int
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`align_by_expert` in one Triton program (one launch: what a decode step wants)."""
    num_pairs, device = topk_ids.numel(), topk_ids.device
    size = padded_size(num_pairs, num_experts, block_m)
    num_bins = triton.next_power_of_2(num_experts + 1)  # one spare bin for masked lanes
    sorted_ids = torch.empty(size, dtype=torch.int32, device=device)
    expert_ids = torch.empty(size // block_m, dtype=torch.int64, device=device)
    num_padded = torch.empty(1, dtype=torch.int64, device=device)
    offsets = torch.empty(num_bins, dtype=torch.int32, device=device)
    _align_kernel[(1,)](topk_ids.reshape(-1), sorted_ids, expert_ids, num_padded, offsets,
                        num_pairs, num_experts, size, size // block_m,
                        BLOCK_M=block_m, NUM_BINS=num_bins, CHUNK=ALIGN_CHUNK, num_warps=ALIGN_NUM_WARPS)
    return sorted_ids, expert_ids, num_padded


# ---------------------------------------------------------------------------------------------------
# Grouped GEMM


@triton.jit(do_not_specialize=["num_pairs", "num_blocks_m"])
def _grouped_gemm_kernel(a_ptr, b_ptr, c_ptr, pair_weights_ptr, sorted_ids_ptr, expert_ids_ptr, num_padded_ptr,
                         N, K, num_pairs, num_blocks_m, stride_am, stride_be, stride_bn, stride_cm,
                         A_ROW_DIV: tl.constexpr, GATED: tl.constexpr, WEIGHTED: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         GROUP_M: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """C[p, n] = A[p // A_ROW_DIV] . B[e, n] for the BLOCK_M sorted pairs p of one expert e.

    GATED: B holds gate rows [0, N) and up rows [N, 2N); C = silu(A . gate) * (A . up).
    WEIGHTED: each row of C is scaled by its pair's routing weight.
    Rows of A, B and C are contiguous: the weight tiles stream in with wide, pipelined copies.
    """
    pid = tl.program_id(0)
    num_blocks_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_blocks_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = min(num_blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):  # past the last expert's run
        return
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    pairs = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # [BLOCK_M]
    row_mask = pairs < num_pairs
    a_rows = pairs // A_ROW_DIV
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    b_ptrs = b_ptr + expert * stride_be + offs_n[None, :] * stride_bn + offs_k[:, None]  # [BLOCK_K, BLOCK_N]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if GATED:
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if UPCAST_DOT:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        if GATED:
            b_up = tl.load(b_ptrs + N * stride_bn, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            if UPCAST_DOT:
                b_up = b_up.to(tl.float32)
            acc_up = tl.dot(a, b_up, acc_up, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    dtype = c_ptr.dtype.element_ty
    if GATED:
        # round as the unfused path does: each projection, then silu, then the product
        gate = acc.to(dtype).to(tl.float32)
        act = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32)
        acc = act * acc_up.to(dtype).to(tl.float32)
    if WEIGHTED:
        acc = acc * tl.load(pair_weights_ptr + pairs, mask=row_mask, other=0.0)[:, None]
    c_ptrs = c_ptr + pairs[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(dtype), mask=row_mask[:, None] & n_mask[None, :])


def _grouped_gemm(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, pair_weights: torch.Tensor,
                  sorted_ids: torch.Tensor, expert_ids: torch.Tensor, num_padded: torch.Tensor, *,
                  n: int, a_row_div: int, gated: bool, weighted: bool, tiles: MoeTiles) -> None:
    assert a.stride(-1) == b.stride(-1) == c.stride(-1) == 1
    num_blocks_m = sorted_ids.numel() // tiles.block_m
    grid = (num_blocks_m * triton.cdiv(n, tiles.block_n),)
    _grouped_gemm_kernel[grid](
        a, b, c, pair_weights, sorted_ids, expert_ids, num_padded,
        n, a.shape[1], c.shape[0], num_blocks_m, a.stride(0), b.stride(0), b.stride(1), c.stride(0),
        A_ROW_DIV=a_row_div, GATED=gated, WEIGHTED=weighted, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
        BLOCK_K=tiles.block_k, GROUP_M=tiles.group_m, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
        **dot_args(a.dtype))


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, tiles: MoeTiles | None = None, *, remote_pairs: bool = False) -> torch.Tensor:
    """Each token of `x` `[T, H]` through its top-k experts, summed with the routing weights: `[T, H]`.

    topk_weights `[T, k]` (float32) and topk_ids `[T, k]` (int64) come from the router; `tiles`
    overrides `moe_config` (benchmarks and tests). With `remote_pairs`, ids may be E = w13.shape[0]:
    pairs whose expert another rank holds, which add nothing here (their rows of the combine are zeroed).
    """
    num_tokens, hidden = x.shape
    top_k = topk_ids.shape[1]
    num_pairs = num_tokens * top_k
    if num_tokens == 0:
        return torch.empty_like(x)
    inter = w2.shape[2]
    tiles = tiles or moe_config(num_tokens, top_k, w13, x.dtype)
    x = x.contiguous()
    pair_weights = topk_weights.reshape(-1).to(torch.float32).contiguous()  # [P]
    sorted_ids, expert_ids, num_padded = align_by_expert(topk_ids, w13.shape[0], tiles.block_m)
    act = torch.empty((num_pairs, inter), dtype=x.dtype, device=x.device)  # [P, I]
    _grouped_gemm(x, w13, act, pair_weights, sorted_ids, expert_ids, num_padded,
                  n=inter, a_row_div=top_k, gated=True, weighted=False, tiles=tiles)
    # [P, H]; rows of remote pairs are never written
    pair_out = (torch.zeros if remote_pairs else torch.empty)((num_pairs, hidden), dtype=x.dtype, device=x.device)
    _grouped_gemm(act, w2, pair_out, pair_weights, sorted_ids, expert_ids, num_padded,
                  n=hidden, a_row_div=1, gated=False, weighted=True, tiles=tiles)
    return pair_out.view(num_tokens, top_k, hidden).sum(dim=1)
