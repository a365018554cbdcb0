"""Timing of one GPU call the way a decode step meets it: operands in memory, not in the L2 cache.

triton's `do_bench` empties the L2 cache by writing zeros over a large buffer, which leaves the cache
full of dirty lines: the timed call then pays for writing them back while it streams its own operands,
and a memory-bound call of a few tens of µs reads as up to a quarter slower than it runs in a model
(`benchmarks/RESULTS.md`, 2026-12-07). Here the cache is emptied by reading a buffer instead. Figures
recorded before that entry were timed by `do_bench`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

_L2_FLUSH_BYTES = 256 * 2**20  # several times the L2 of any current GPU (50-60 MiB on Hopper)
_TARGET_SECONDS = 0.1  # time spent in timed calls per measurement, as do_bench spends


def bench_us(fn: Callable[[], object], device: torch.device) -> float:
    """Median time of one call of `fn` in µs. On CUDA: CUDA events around each call, the L2 cache emptied
    by a read of `_L2_FLUSH_BYTES` before each; elsewhere a wall-clock loop (a smoke figure)."""
    if device.type != "cuda":
        fn()
        start, runs = time.perf_counter(), 0
        while runs < 3 or time.perf_counter() - start < 0.2:
            fn()
            runs += 1
        return (time.perf_counter() - start) / runs * 1e6
    flush = torch.empty(_L2_FLUSH_BYTES // 4, dtype=torch.float32, device=device)
    fn()  # compiles, autotunes, warms the allocator
    torch.cuda.synchronize(device)
    first = _timed_calls(fn, flush, 5)
    reps = max(10, min(1000, int(_TARGET_SECONDS / (statistics.median(first) * 1e-6))))
    return statistics.median(_timed_calls(fn, flush, reps))


def _timed_calls(fn: Callable[[], object], flush: torch.Tensor, reps: int) -> list[float]:
    """µs of each of `reps` calls of `fn`, each after the L2 cache is refilled with clean lines of `flush`."""
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        flush.amax()  # a read: the lines it leaves in the cache need no write-back
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(flush.device)
    return [start.elapsed_time(end) * 1e3 for start, end in events]
