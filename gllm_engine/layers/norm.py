"""RMSNorm with an optional fused residual add."""

from __future__ import annotations

import torch
from torch import nn

from gllm_engine.layers.ops import REFERENCE_OPS, KernelOps


class RMSNorm(nn.Module):
    """RMS normalization, optionally adding the residual first (one fused kernel on a GPU)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, ops: KernelOps = REFERENCE_OPS):
        super().__init__()
        self.eps = eps
        self.ops = ops
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Without `residual`: norm(x). With it: (norm(x + residual), x + residual)."""
        out, new_residual = self.ops.rms_norm(x, self.weight, self.eps, residual)
        return out if residual is None else (out, new_residual)
