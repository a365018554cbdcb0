"""Qwen2-MoE and Qwen3-MoE: the Llama-family decoder of llama.py with sparse mixture-of-experts MLPs.

Attention, norms, embeddings and the LM head are llama.py's (Qwen2-MoE attends like Qwen2, with
q/k/v bias; Qwen3-MoE like Qwen3, with per-head q/k RMSNorm). A layer is sparse unless it is in
`mlp_only_layers`, and then only every `decoder_sparse_step`-th; dense layers keep llama.py's MLP of
`intermediate_size`. Sparse layers route each token to `num_experts_per_tok` of `num_experts`
experts of `moe_intermediate_size` (weights renormalised when `norm_topk_prob`); Qwen2-MoE adds a
shared expert of `shared_expert_intermediate_size`, scaled per token by a sigmoid gate.

`MoeForCausalLM` is the shared part: it is also Mixtral's (mixtral.py), which differs only in names.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from gllm_engine.layers.linear import ReplicatedLinear
from gllm_engine.layers.moe import ExpertShard, FusedMoE
from gllm_engine.layers.ops import REFERENCE_OPS, KernelOps
from gllm_engine.layers.parallel import ALL_EXPERTS, SINGLE, WHOLE_MODEL, EPLayout, PPStage, TPLayout
from gllm_engine.models.llama import DecoderFlags, DecoderLayer, DecoderMLP, LlamaForCausalLM


@dataclass(frozen=True)
class MoeSpec:
    """The sparse layers of one MoE model, read from its HF config."""

    num_experts: int
    top_k: int
    expert_intermediate_size: int
    renormalize: bool  # rescale each token's top-k weights to sum to 1
    shared_expert_intermediate_size: int  # 0: no shared expert
    sparse_layers: frozenset[int]
    dense_architecture: str  # the llama.py architecture whose attention this model has


class SparseMoeBlock(nn.Module):
    """Router, routed experts and an optional gated shared expert; HF's module names.

    The router is replicated; the routed experts follow `ep` (layers/moe.py); the shared expert is a
    dense MLP, tensor-parallel over all of `tp` whatever `ep` is.
    """

    def __init__(self, hidden_size: int, spec: MoeSpec, flags: DecoderFlags, tp: TPLayout, ep: EPLayout,
                 ops: KernelOps):
        super().__init__()
        self.gate = ReplicatedLinear(hidden_size, spec.num_experts, tp=tp, ops=ops)
        self.experts = FusedMoE(spec.num_experts, spec.top_k, hidden_size, spec.expert_intermediate_size,
                                renormalize=spec.renormalize, tp=tp, ep=ep, ops=ops)
        self.shared_expert: DecoderMLP | None = None
        self.shared_expert_gate: ReplicatedLinear | None = None
        if spec.shared_expert_intermediate_size:
            shape = SimpleNamespace(hidden_size=hidden_size, intermediate_size=spec.shared_expert_intermediate_size)
            self.shared_expert = DecoderMLP(shape, flags, tp, ops)
            self.shared_expert_gate = ReplicatedLinear(hidden_size, 1, tp=tp, ops=ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.experts(x, self.gate(x))  # [T, H]
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out


# Per-expert HF tensors, e.g. model.layers.3.mlp.experts.17.gate_proj.weight (Mixtral: .w1.weight).
_EXPERT_TENSOR = re.compile(r"(.+\.mlp\.experts)\.(\d+)\.(\w+)\.weight")
# A layer's experts in one tensor, as transformers holds them: gate_up_proj [E, 2I, H], down_proj [E, H, I].
_STACKED_TENSOR = re.compile(r"(.+\.mlp\.experts)\.(gate_up_proj|down_proj)")
# HF expert projection -> (stacked parameter, shard)
_EXPERT_SHARDS = {
    "gate_proj": ("w13", "w1"), "up_proj": ("w13", "w3"), "down_proj": ("w2", "w2"),
    "w1": ("w13", "w1"), "w3": ("w13", "w3"), "w2": ("w2", "w2"),
}


def _expert_slices(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor, ExpertShard]] | None:
    """(parameter, tensor, shard id) for each expert projection in an HF expert tensor; None for other tensors."""
    if match := _EXPERT_TENSOR.fullmatch(name):
        prefix, expert, proj = match.groups()
        param, shard = _EXPERT_SHARDS[proj]
        return [(f"{prefix}.{param}", tensor, (int(expert), shard))]
    if match := _STACKED_TENSOR.fullmatch(name):
        prefix, proj = match.groups()
        if proj == "down_proj":
            return [(f"{prefix}.w2", t, (e, "w2")) for e, t in enumerate(tensor)]
        gate, up = tensor.chunk(2, dim=1)
        return [(f"{prefix}.w13", t, (e, shard)) for shard, part in (("w1", gate), ("w3", up))
                for e, t in enumerate(part)]
    return None


class MoeForCausalLM(LlamaForCausalLM):
    """llama.py's causal LM with a SparseMoeBlock as the MLP of every sparse layer.

    Checkpoint tensors of the experts are stacked into each layer's `experts.w13` / `experts.w2`
    (this rank's experts only, under expert parallelism `ep`); every other tensor loads as in
    LlamaForCausalLM. Mixtral's `block_sparse_moe` reads as `mlp`.
    """

    def __init__(self, hf_config: Any, spec: MoeSpec, *, max_positions: int, tp: TPLayout = SINGLE,
                 ops: KernelOps = REFERENCE_OPS, stage: PPStage = WHOLE_MODEL, ep: EPLayout = ALL_EXPERTS):
        super().__init__(hf_config, max_positions=max_positions, tp=tp, ops=ops, stage=stage,
                         architecture=spec.dense_architecture)
        self.spec = spec
        flags = DecoderFlags.from_hf(spec.dense_architecture, hf_config)
        # llama.py's DecoderLayer builds a dense MLP; sparse layers swap theirs for the MoE block.
        for i, layer in enumerate(self.model.layers):
            if isinstance(layer, DecoderLayer) and i in spec.sparse_layers:
                layer.mlp = SparseMoeBlock(hf_config.hidden_size, spec, flags, tp, ep, ops)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Expert tensors go into the stacked experts here; the rest to LlamaForCausalLM.load_weights."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()

        def non_expert(stream: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
            for hf_name, tensor in stream:
                name = hf_name.replace(".block_sparse_moe.", ".mlp.")
                slices = _expert_slices(name, tensor)
                if slices is None:
                    yield name, tensor
                    continue
                if not self._targets(name):  # another pipeline stage's layer
                    continue
                for param_name, part, shard_id in slices:
                    param = params.get(param_name)
                    if param is None:
                        raise ValueError(f"checkpoint tensor {hf_name!r} has no matching parameter in "
                                         f"{type(self).__name__} (is layer {name.split('.')[2]} sparse?)")
                    param.weight_loader(param, part, shard_id)  # converts only what it keeps
                    loaded.add(param_name)

        return loaded | super().load_weights(non_expert(weights))


def sparse_layers(hf_config: Any) -> frozenset[int]:
    """Layers with experts: not in `mlp_only_layers`, and every `decoder_sparse_step`-th."""
    dense_only = set(getattr(hf_config, "mlp_only_layers", None) or [])
    step = getattr(hf_config, "decoder_sparse_step", 1) or 1
    return frozenset(i for i in range(hf_config.num_hidden_layers)
                     if i not in dense_only and hf_config.num_experts > 0 and (i + 1) % step == 0)


class QwenMoeForCausalLM(MoeForCausalLM):
    """Qwen2MoeForCausalLM and Qwen3MoeForCausalLM, told apart by `architecture`."""

    _DENSE_TWINS = {"Qwen2MoeForCausalLM": "Qwen2ForCausalLM", "Qwen3MoeForCausalLM": "Qwen3ForCausalLM"}

    def __init__(self, hf_config: Any, *, max_positions: int, tp: TPLayout = SINGLE, ops: KernelOps = REFERENCE_OPS,
                 stage: PPStage = WHOLE_MODEL, architecture: str = "Qwen3MoeForCausalLM",
                 ep: EPLayout = ALL_EXPERTS):
        if architecture not in self._DENSE_TWINS:
            raise ValueError(f"{type(self).__name__} runs {', '.join(self._DENSE_TWINS)}, not {architecture!r}")
        if architecture == "Qwen2MoeForCausalLM" and not getattr(hf_config, "qkv_bias", True):
            raise ValueError("Qwen2-MoE without q/k/v bias (qkv_bias=false) is not supported")
        spec = MoeSpec(
            num_experts=hf_config.num_experts, top_k=hf_config.num_experts_per_tok,
            expert_intermediate_size=hf_config.moe_intermediate_size,
            renormalize=bool(getattr(hf_config, "norm_topk_prob", False)),
            shared_expert_intermediate_size=getattr(hf_config, "shared_expert_intermediate_size", 0) or 0,
            sparse_layers=sparse_layers(hf_config), dense_architecture=self._DENSE_TWINS[architecture])
        super().__init__(hf_config, spec, max_positions=max_positions, tp=tp, ops=ops, stage=stage, ep=ep)
