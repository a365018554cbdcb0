"""Greedy token choice: the argmax of each row of logits, in Triton. Reference: `reference.argmax`.

torch reduces a row of a 128k vocabulary in one block (~26 us on an H200); here each program takes
one chunk of a row and a second kernel picks among the chunks (~3 us). As in torch, the first index
of the largest value wins and NaN counts as the largest value.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gllm_engine.kernels.launch import pdl_args, pdl_wait

ARGMAX_CHUNK = 2048  # logits per first-pass program


@triton.jit
def _chunk_argmax_kernel(x_ptr, max_ptr, idx_ptr, V, stride_x, CHUNK: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    i = chunk * CHUNK + tl.arange(0, CHUNK)
    x = tl.load(x_ptr + row * stride_x + i, mask=i < V, other=float("-inf")).to(tl.float32)
    first_nan = tl.min(tl.where(x != x, i, V), 0)
    best = tl.max(x, 0)
    first_best = tl.min(tl.where(x == best, i, V), 0)
    out = row * tl.num_programs(1) + chunk
    tl.store(max_ptr + out, tl.where(first_nan < V, float("nan"), best))
    tl.store(idx_ptr + out, tl.where(first_nan < V, first_nan, first_best))


@triton.jit
def _pick_chunk_kernel(max_ptr, idx_ptr, out_ptr, num_chunks, V, BLOCK_C: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK_C)
    mask = c < num_chunks
    m = tl.load(max_ptr + row * num_chunks + c, mask=mask, other=float("-inf"))
    j = tl.load(idx_ptr + row * num_chunks + c, mask=mask, other=V)
    first_nan = tl.min(tl.where(m != m, j, V), 0)
    best = tl.max(m, 0)
    first_best = tl.min(tl.where(m == best, j, V), 0)
    tl.store(out_ptr + row, tl.where(first_nan < V, first_nan, first_best).to(tl.int64))


def argmax(x: torch.Tensor) -> torch.Tensor:
    """`x.argmax(dim=-1)` for `x` `[N, V]`: int64 `[N]`."""
    rows, vocab = x.shape
    out = torch.empty(rows, dtype=torch.int64, device=x.device)
    if rows == 0:
        return out
    if x.stride(-1) != 1:
        x = x.contiguous()
    num_chunks = triton.cdiv(vocab, ARGMAX_CHUNK)
    best = torch.empty((rows, num_chunks), dtype=torch.float32, device=x.device)
    index = torch.empty((rows, num_chunks), dtype=torch.int32, device=x.device)
    launch = pdl_args(x.device)
    _chunk_argmax_kernel[(rows, num_chunks)](x, best, index, vocab, x.stride(0), CHUNK=ARGMAX_CHUNK, num_warps=4,
                                             **launch)
    _pick_chunk_kernel[(rows,)](best, index, out, num_chunks, vocab, BLOCK_C=triton.next_power_of_2(num_chunks),
                                num_warps=1, **launch)
    return out
