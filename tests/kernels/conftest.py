"""Shared setup of the kernel tests: each Triton kernel is compared with its torch reference.

Without a CUDA device the kernels run in Triton's interpreter on the CPU. Triton 3.x reads
TRITON_INTERPRET when `@triton.jit` decorates a kernel, i.e. when gllm_engine.kernels.<module> is
first imported; this conftest is loaded before the test modules that import them, so setting it
here is early enough. On a GPU it is left alone and the kernels compile for real.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# (atol, rtol) of kernel vs reference; bfloat16 kernels round softmax weights and sums differently.
TOLERANCES = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (3e-2, 3e-2)}
BLOCK_SIZE = 16


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def assert_matches() -> Callable[[torch.Tensor, torch.Tensor], None]:
    def check(actual: torch.Tensor, expected: torch.Tensor) -> None:
        assert actual.dtype == expected.dtype and actual.shape == expected.shape
        atol, rtol = TOLERANCES[expected.dtype]
        torch.testing.assert_close(actual.float().cpu(), expected.float().cpu(), atol=atol, rtol=rtol)

    return check


@pytest.fixture
def make_paged_kv(device: torch.device) -> Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """A factory of paged KV caches holding random contexts of `seq_lens` tokens.

    Block ids are shuffled (never contiguous per request), tables are padded with zeros, and every
    cache row no request owns holds NaN, so a kernel reading past a seq_len poisons its output.
    """

    def make(seq_lens: list[int], num_kv_heads: int, head_dim: int, dtype: torch.dtype,
             seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        blocks = [-(-s // BLOCK_SIZE) for s in seq_lens]
        num_blocks = sum(blocks) + 3  # block 0 (the padding target) and two spares stay unowned
        ids = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
        table = torch.zeros((len(seq_lens), max(blocks) + 2), dtype=torch.int32)
        shape = (num_blocks, BLOCK_SIZE, num_kv_heads, head_dim)
        k_cache = torch.full(shape, float("nan"), dtype=dtype)
        v_cache = torch.full(shape, float("nan"), dtype=dtype)
        for b, (seq_len, n) in enumerate(zip(seq_lens, blocks)):
            table[b, :n] = torch.tensor(ids[:n], dtype=torch.int32)
            ids = ids[n:]
            pos = torch.arange(seq_len)
            slots = table[b, pos // BLOCK_SIZE].long() * BLOCK_SIZE + pos % BLOCK_SIZE
            k_cache.view(-1, num_kv_heads, head_dim)[slots] = torch.randn(
                seq_len, num_kv_heads, head_dim, generator=gen).to(dtype)
            v_cache.view(-1, num_kv_heads, head_dim)[slots] = torch.randn(
                seq_len, num_kv_heads, head_dim, generator=gen).to(dtype)
        return k_cache.to(device), v_cache.to(device), table.to(device)

    return make
