"""Linear layers that own their tensor-parallel sharding.

Each layer is told its place in the tensor-parallel group (`TPLayout`) at construction and loads
only its slice of a full HF weight through `param.weight_loader(param, full_weight, shard_id)`.
Weights are stored `[out, in]` as in `nn.Linear`; the matmul is `ops.linear` (`F.linear`, or the
Triton skinny kernel for few-row batches).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gllm_engine.layers.ops import REFERENCE_OPS, KernelOps
from gllm_engine.layers.parallel import SINGLE, TPLayout


def _divide(n: int, d: int, what: str) -> int:
    if n % d:
        raise ValueError(f"{what} ({n}) is not divisible by the tensor-parallel size ({d})")
    return n // d


def _default_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"weight shape {tuple(loaded.shape)} does not match parameter {tuple(param.shape)}")
    param.data.copy_(loaded)


class _LinearBase(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPLayout, ops: KernelOps):
        super().__init__()
        self.tp = tp
        self.ops = ops
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
        _default_loader(param, loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.linear(x, self.weight, self.bias)


class ReplicatedLinear(_LinearBase):
    """The full weight on every rank."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, tp: TPLayout = SINGLE,
                 ops: KernelOps = REFERENCE_OPS):
        super().__init__(in_features, out_features, bias, tp, ops)


class ColumnParallelLinear(_LinearBase):
    """Output features split across ranks; each rank's output is its slice (no communication)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, tp: TPLayout = SINGLE,
                 ops: KernelOps = REFERENCE_OPS):
        super().__init__(in_features, _divide(out_features, tp.size, "output features"), bias, tp, ops)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
        size = param.shape[0]
        _default_loader(param, loaded.narrow(0, self.tp.rank * size, size))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections fused into one matmul (e.g. gate and up)."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False, tp: TPLayout = SINGLE,
                 ops: KernelOps = REFERENCE_OPS):
        self.output_sizes = output_sizes
        super().__init__(in_features, sum(output_sizes), bias, tp, ops)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
        sizes = [s // self.tp.size for s in self.output_sizes]
        offset = sum(sizes[:shard_id])
        shard = loaded.narrow(0, self.tp.rank * sizes[shard_id], sizes[shard_id])
        _default_loader_into(param.data.narrow(0, offset, sizes[shard_id]), shard)

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """`silu(gate) * up` of this (gate, up) pair, in one kernel where the ops have one."""
        assert len(self.output_sizes) == 2 and self.output_sizes[0] == self.output_sizes[1]
        return self.ops.linear_silu_and_mul(x, self.weight, self.bias)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections fused; KV heads are replicated when there are fewer than ranks."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False, tp: TPLayout = SINGLE, ops: KernelOps = REFERENCE_OPS):
        self.head_dim = head_dim
        self.num_heads = _divide(num_heads, tp.size, "attention heads")
        if num_kv_heads >= tp.size:
            self.num_kv_heads = _divide(num_kv_heads, tp.size, "KV heads")
        else:
            _divide(tp.size, num_kv_heads, "tensor-parallel size over KV heads")
            self.num_kv_heads = 1
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp.size
        super().__init__(hidden_size, out, bias, tp, ops)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if shard_id == "q":
            offset, size, start = 0, q_size, self.tp.rank * q_size
        else:
            offset = q_size if shard_id == "k" else q_size + kv_size
            # With fewer KV heads than ranks, consecutive ranks share (replicate) one KV head.
            total_kv_heads = loaded.shape[0] // self.head_dim
            replicas = max(1, self.tp.size // total_kv_heads)
            kv_rank = self.tp.rank // replicas
            size, start = kv_size, kv_rank * kv_size
        _default_loader_into(param.data.narrow(0, offset, size), loaded.narrow(0, start, size))


class RowParallelLinear(_LinearBase):
    """Input features split across ranks; partial outputs are summed with an all-reduce."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, tp: TPLayout = SINGLE,
                 ops: KernelOps = REFERENCE_OPS):
        super().__init__(_divide(in_features, tp.size, "input features"), out_features, bias, tp, ops)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
        if param.dim() == 1:  # bias: added once, after the reduction
            _default_loader(param, loaded)
            return
        size = param.shape[1]
        _default_loader(param, loaded.narrow(1, self.tp.rank * size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.ops.linear(x, self.weight, self.bias if self.tp.rank == 0 else None)
        return self.tp.all_reduce(out)


def _default_loader_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"weight shard shape {tuple(src.shape)} does not match {tuple(dst.shape)}")
    dst.copy_(src)
