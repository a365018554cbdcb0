"""SiLU-and-multiply (the gated MLP activation) in Triton. Reference: `reference.silu_and_mul`."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gllm_engine.kernels.launch import pdl_args, pdl_wait

ACT_BLOCK = 1024  # output columns per program
ACT_NUM_WARPS = 4


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, D: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < D
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + D + cols, mask=mask, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    # round silu(gate) to the input dtype before the product, as the two torch ops do
    act = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32)
    tl.store(out_ptr + row * D + cols, (act * up).to(dtype), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """`silu(x[..., :d]) * x[..., d:]` for `x` `[..., 2d]`; returns a new `[..., d]` tensor."""
    d = x.shape[-1] // 2
    out = torch.empty((*x.shape[:-1], d), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    x2 = x.reshape(-1, 2 * d)  # [R, 2d]
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    block = min(ACT_BLOCK, triton.next_power_of_2(d))
    _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(d, block))](x2, out, x2.stride(0), D=d, BLOCK=block,
                                                               num_warps=ACT_NUM_WARPS, **pdl_args(x.device))
    return out
