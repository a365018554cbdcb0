"""Programmatic dependent launch (PDL) of the small kernels that make up a decode step (Hopper and newer).

Launched with PDL, a kernel's programs are scheduled while the kernel before it in the stream still
runs; they wait in `pdl_wait` until it has finished and its writes are visible. CUDA graphs keep
these edges, so a batch-1 step no longer pays a launch gap for each of its ~300 kernels (4.54 ->
4.38 ms per step for Llama-3-8B on an H200, `benchmarks/RESULTS.md`).

A kernel launched with `pdl_args` calls `pdl_wait` before it touches memory; the wait also lets the
next kernel launch. Waiting first keeps at most two kernels resident at once.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from gllm_engine.kernels.dot import INTERPRETED

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # a Triton without grid dependency control: no PDL
    gdc_launch_dependents = gdc_wait = None


def _supports_pdl(index: int) -> bool:
    if gdc_wait is None or torch.version.hip is not None:  # grid dependency control is NVIDIA's (sm_90+)
        return False
    return torch.cuda.get_device_capability(index)[0] >= 9


@functools.cache
def pdl_args(device: torch.device) -> dict:
    """The `PDL` constexpr and launch option for a kernel on `device`: on for CUDA devices of sm_90 and newer.

    Cached per device (every decode-step launch asks); callers only unpack the dict."""
    if INTERPRETED or device.type != "cuda":
        return {"PDL": False}
    if not _supports_pdl(torch.cuda.current_device() if device.index is None else device.index):
        return {"PDL": False}
    return {"PDL": True, "launch_pdl": True}


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """Wait for the previous kernel in the stream (a no-op without PDL), and let the next one launch."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
