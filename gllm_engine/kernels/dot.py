"""How the kernels' `tl.dot` products are asked to multiply: the UPCAST_DOT and DOT_PRECISION constexprs."""

from __future__ import annotations

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction


@triton.jit
def _probe():
    pass


# Decided when Triton decorated `_probe`: with TRITON_INTERPRET=1 at import, kernels run on the CPU.
INTERPRETED = isinstance(_probe, InterpretedFunction)


def dot_args(dtype: torch.dtype) -> dict:
    """The constexprs for operands of `dtype`.

    float32 stays exact ("ieee", not tf32). Triton's interpreter multiplies the raw bit patterns of
    bfloat16 operands in `tl.dot` (its docs: cast bfloat16 to float32 first), so there the 16-bit
    operands are widened to float32, which gives the same products and float32 sums.
    """
    upcast = INTERPRETED and dtype != torch.float32
    return {"UPCAST_DOT": upcast, "DOT_PRECISION": "ieee" if upcast or dtype == torch.float32 else "tf32"}
