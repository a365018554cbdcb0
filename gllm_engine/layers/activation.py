"""Gated activations."""

from __future__ import annotations

import torch
from torch import nn

from gllm_engine.layers.ops import REFERENCE_OPS, KernelOps


class SiluAndMul(nn.Module):
    """`silu(gate) * up` for the fused `[.., 2 * I]` gate-up projection output."""

    def __init__(self, ops: KernelOps = REFERENCE_OPS):
        super().__init__()
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.silu_and_mul(x)
