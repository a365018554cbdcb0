"""Mixtral: Mistral's attention with a sparse MoE MLP in every layer.

Each token goes to `num_experts_per_tok` (2) of `num_local_experts` (8) experts of `intermediate_size`,
their softmax weights renormalised to sum to 1. No shared expert. Checkpoints name the block
`block_sparse_moe` and the expert projections w1 (gate), w3 (up), w2 (down); `MoeForCausalLM` loads them.
"""

from __future__ import annotations

from typing import Any

from gllm_engine.layers.ops import REFERENCE_OPS, KernelOps
from gllm_engine.layers.parallel import ALL_EXPERTS, SINGLE, WHOLE_MODEL, EPLayout, PPStage, TPLayout
from gllm_engine.models.qwen_moe import MoeForCausalLM, MoeSpec


class MixtralForCausalLM(MoeForCausalLM):
    """Mixtral: the shared MoE decoder, every layer sparse, top-k weights renormalized, Mixtral's tensor names."""

    def __init__(self, hf_config: Any, *, max_positions: int, tp: TPLayout = SINGLE, ops: KernelOps = REFERENCE_OPS,
                 stage: PPStage = WHOLE_MODEL, architecture: str = "MixtralForCausalLM",
                 ep: EPLayout = ALL_EXPERTS):
        spec = MoeSpec(
            num_experts=hf_config.num_local_experts, top_k=hf_config.num_experts_per_tok,
            expert_intermediate_size=hf_config.intermediate_size, renormalize=True,
            shared_expert_intermediate_size=0, sparse_layers=frozenset(range(hf_config.num_hidden_layers)),
            dense_architecture="MistralForCausalLM")
        super().__init__(hf_config, spec, max_positions=max_positions, tp=tp, ops=ops, stage=stage, ep=ep)
