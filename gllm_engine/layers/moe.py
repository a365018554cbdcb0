"""Mixture-of-experts: softmax top-k routing and the experts of one layer, stacked for a fused kernel.

Expert weights are held as two tensors, `w13` `[E, 2I, H]` (each expert's gate rows, then its up
rows) and `w2` `[E, H, I]`, filled one HF expert tensor at a time by `weight_loader` with shard id
`(expert, "w1" | "w3" | "w2")` (gate, up, down: Mixtral's names). Tensor parallelism splits every
expert's intermediate dimension, as the dense MLP does: each rank holds I / tp of it and the
partial outputs are summed by an all-reduce.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from gllm_engine.kernels import reference
from gllm_engine.layers.ops import REFERENCE_OPS, KernelOps
from gllm_engine.layers.parallel import SINGLE, TPLayout

ExpertShard = tuple[int, str]  # (expert index, "w1" gate | "w3" up | "w2" down)


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the experts (float32), then the top-k: weights `[T, k]` float32 and expert ids `[T, k]` int64.

    With `renormalize` the k weights of a token are rescaled to sum to 1 (Mixtral, Qwen3-MoE's
    norm_topk_prob); without it they stay softmax probabilities over all experts (Qwen2-MoE).
    """
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)  # [T, E]
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def fused_moe_kernel(ops: KernelOps) -> Callable:
    """`fused_moe` of the kernel set: the Triton kernel with "triton" ops, the torch reference otherwise."""
    if ops.name == "triton":
        from gllm_engine.kernels import moe

        return moe.fused_moe
    return reference.fused_moe


class FusedMoE(nn.Module):
    """The routed experts of one layer: `forward(x [T, H], router_logits [T, E]) -> [T, H]`."""

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int, *,
                 renormalize: bool, tp: TPLayout = SINGLE, ops: KernelOps = REFERENCE_OPS):
        super().__init__()
        if intermediate_size % tp.size:
            raise ValueError(f"expert intermediate size ({intermediate_size}) is not divisible by the "
                             f"tensor-parallel size ({tp.size})")
        self.num_experts, self.top_k, self.renormalize, self.tp = num_experts, top_k, renormalize, tp
        self.local_intermediate = intermediate_size // tp.size
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * self.local_intermediate, hidden_size),
                                requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, self.local_intermediate), requires_grad=False)
        self.w13.weight_loader = self.weight_loader
        self.w2.weight_loader = self.weight_loader
        self.fused_moe = fused_moe_kernel(ops)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ExpertShard) -> None:
        """Copy this rank's slice of one expert's HF projection: w1/w3 `[I, H]`, w2 `[H, I]`."""
        expert, shard = shard_id
        size = self.local_intermediate
        if shard == "w2":
            dst, src = param.data[expert], loaded.narrow(1, self.tp.rank * size, size)
        elif shard in ("w1", "w3"):
            offset = 0 if shard == "w1" else size
            dst, src = param.data[expert, offset:offset + size], loaded.narrow(0, self.tp.rank * size, size)
        else:
            raise ValueError(f"unknown expert shard {shard!r} (w1, w3 or w2)")
        if dst.shape != src.shape:
            raise ValueError(f"expert {expert} {shard}: checkpoint slice {tuple(src.shape)} does not match "
                             f"{tuple(dst.shape)}")
        dst.copy_(src)

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        weights, ids = select_experts(router_logits, self.top_k, self.renormalize)  # [T, k] each
        return self.tp.all_reduce(self.fused_moe(x, self.w13, self.w2, weights, ids))
