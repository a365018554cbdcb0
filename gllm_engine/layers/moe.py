"""Mixture-of-experts: softmax top-k routing and the experts of one layer, stacked for a fused kernel.

Expert weights are held as two tensors, `w13` `[E, 2I, H]` (each expert's gate rows, then its up
rows) and `w2` `[E, H, I]`, filled one HF expert tensor at a time by `weight_loader` with shard id
`(expert, "w1" | "w3" | "w2")` (gate, up, down: Mixtral's names). E and I are this rank's: the
experts it holds and its slice of their intermediate size.

Parallel layouts, over the tensor-parallel ranks of a pipeline stage (`EPLayout`):
- tensor parallelism (ep = 1) splits every expert's intermediate dimension, as the dense MLP does;
- expert parallelism (ep = tp) gives each rank E / ep whole experts;
- in between (ep divides tp), each of ep groups of tp / ep ranks holds E / ep experts, split tp / ep ways.
Whatever the layout, every rank holds the same tokens (attention's all-reduce just replicated them),
routes all of them with the replicated router, computes the (token, expert) pairs of its experts (or
slices) and leaves the others out; one all-reduce over the stage's TP group sums the partial outputs.

Why an all-reduce and not an all-to-all: with attention tensor-parallel, every rank already holds
every token, so the dispatch is a local selection; and since the next attention needs the whole
output on every rank again, the combine is a reduce-scatter plus an all-gather, i.e. the all-reduce
TP does anyway (the same T x H bytes). An all-to-all dispatch and combine pays off when ranks hold
different tokens (data-parallel attention, which gLLM does not have): each token then travels only
to the ranks of its k experts. What EP changes here is the compute, not the traffic or the memory:
whole experts make wider GEMMs (I instead of I / tp per expert), and a rank's load follows how many
pairs the router sends to its experts.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from gllm_engine.kernels import reference
from gllm_engine.layers.ops import REFERENCE_OPS, KernelOps
from gllm_engine.layers.parallel import ALL_EXPERTS, SINGLE, EPLayout, TPLayout

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
    """The routed experts of one layer: `forward(x [T, H], router_logits [T, E]) -> [T, H]`.

    This rank holds experts `ep.expert_range(num_experts)` (local index = global id - first), each
    as its `ep.expert_tp(tp)` slice of the intermediate dimension; `tp` is the group that sums.
    """

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int, *,
                 renormalize: bool, tp: TPLayout = SINGLE, ep: EPLayout = ALL_EXPERTS,
                 ops: KernelOps = REFERENCE_OPS):
        super().__init__()
        self.expert_tp = ep.expert_tp(tp)
        if intermediate_size % self.expert_tp.size:
            raise ValueError(f"expert intermediate size ({intermediate_size}) is not divisible by the "
                             f"{self.expert_tp.size} tensor-parallel ranks that share each expert")
        self.num_experts, self.top_k, self.renormalize, self.tp, self.ep = num_experts, top_k, renormalize, tp, ep
        self.local_experts = ep.expert_range(num_experts)
        self.local_intermediate = intermediate_size // self.expert_tp.size
        num_local = len(self.local_experts)
        self.w13 = nn.Parameter(torch.empty(num_local, 2 * self.local_intermediate, hidden_size), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_local, hidden_size, self.local_intermediate), requires_grad=False)
        self.w13.weight_loader = self.weight_loader
        self.w2.weight_loader = self.weight_loader
        self.fused_moe = fused_moe_kernel(ops)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ExpertShard) -> None:
        """Copy this rank's slice of one expert's HF projection, w1/w3 `[I, H]` or w2 `[H, I]`.

        Experts that other expert-parallel ranks hold are skipped (nothing is copied or converted).
        """
        expert, shard = shard_id
        if expert not in self.local_experts:
            if not 0 <= expert < self.num_experts:
                raise ValueError(f"expert {expert} {shard}: the layer has {self.num_experts} experts")
            return
        local, size, start = expert - self.local_experts.start, self.local_intermediate, self.expert_tp.rank
        if shard == "w2":
            dst, src = param.data[local], loaded.narrow(1, start * size, size)
        elif shard in ("w1", "w3"):
            offset = 0 if shard == "w1" else size
            dst, src = param.data[local, offset:offset + size], loaded.narrow(0, start * size, size)
        else:
            raise ValueError(f"unknown expert shard {shard!r} (w1, w3 or w2)")
        if dst.shape != src.shape:
            raise ValueError(f"expert {expert} {shard}: checkpoint slice {tuple(src.shape)} does not match "
                             f"{tuple(dst.shape)}")
        dst.copy_(src)

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(self.partial_forward(x, router_logits))

    def partial_forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """This rank's share of the output `[T, H]`: its experts' (slices') contributions, before the sum over `tp`."""
        weights, ids = select_experts(router_logits, self.top_k, self.renormalize)  # [T, k] each
        if self.ep.size == 1:
            return self.fused_moe(x, self.w13, self.w2, weights, ids)
        num_local = len(self.local_experts)
        local_ids = ids - self.local_experts.start
        # Another rank's expert becomes the kernels' "remote" id, num_local: skipped, adds nothing.
        local_ids = local_ids.masked_fill((local_ids < 0) | (local_ids >= num_local), num_local)
        return self.fused_moe(x, self.w13, self.w2, weights, local_ids, remote_pairs=True)
