"""RMSNorm with an optional fused residual add, in Triton. Reference: `reference.rms_norm`.

One program normalizes one row; the row is held whole in registers (hidden sizes up to a few 10k).
Inputs are never modified: the output and the residual sum are fresh tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gllm_engine.kernels.launch import pdl_args, pdl_wait

NORM_MAX_NUM_WARPS = 16
NORM_ELEMENTS_PER_WARP = 256  # a row of N elements gets about N / 256 warps (8 elements per thread)


def _num_warps(block: int) -> int:
    return min(max(block // NORM_ELEMENTS_PER_WARP, 1), NORM_MAX_NUM_WARPS)


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, eps, stride_x, stride_res,
                     N: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0).to(tl.float32)
        s = (x + r).to(res_out_ptr.dtype.element_ty)  # the sum is rounded to its dtype, as in torch
        tl.store(res_out_ptr + row * N + cols, s, mask=mask)
        x = s.to(tl.float32)
        in_dtype = res_out_ptr.dtype.element_ty
    else:
        in_dtype = x_ptr.dtype.element_ty
    rstd = tl.rsqrt(tl.sum(x * x, 0) / N + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    # transformers rounds the normalized row to the input dtype before scaling by the weight
    y = (x * rstd).to(in_dtype).to(tl.float32) * w
    tl.store(out_ptr + row * N + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RMSNorm over the last dim of `x` `[..., N]` with `weight` `[N]`, computed in float32.

    With `residual`: returns `(norm(x + residual), x + residual)`; without: `(norm(x), None)`. The
    output has dtype `promote(x, weight)`, as `weight * normed` has in the reference.
    """
    n = x.shape[-1]
    sum_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    out = torch.empty(x.shape, dtype=torch.promote_types(sum_dtype, weight.dtype), device=x.device)
    res_out = None if residual is None else torch.empty(x.shape, dtype=sum_dtype, device=x.device)
    if x.numel() == 0:
        return out, res_out
    x2 = _rows(x)  # [R, N]
    r2 = x2 if residual is None else _rows(residual)
    block = triton.next_power_of_2(n)
    _rms_norm_kernel[(x2.shape[0],)](
        x2, r2, weight.contiguous(), out, out if res_out is None else res_out, eps, x2.stride(0), r2.stride(0),
        N=n, BLOCK=block, HAS_RESIDUAL=residual is not None, num_warps=_num_warps(block), **pdl_args(x.device))
    return out, res_out
