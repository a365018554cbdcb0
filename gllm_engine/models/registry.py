"""Maps HF `architectures` names to gLLM model classes."""

from __future__ import annotations

from torch import nn

from gllm_engine.models.llama import LlamaForCausalLM
from gllm_engine.models.mixtral import MixtralForCausalLM
from gllm_engine.models.qwen_moe import QwenMoeForCausalLM

_MODELS: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
    "Qwen2MoeForCausalLM": QwenMoeForCausalLM,
    "Qwen3MoeForCausalLM": QwenMoeForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def get_model_class(architecture: str) -> type[nn.Module]:
    """The class for an HF architecture name; ValueError naming the supported ones otherwise."""
    try:
        return _MODELS[architecture]
    except KeyError:
        raise ValueError(f"architecture {architecture or '(none)'!r} is not supported; gLLM runs: "
                         f"{', '.join(supported_architectures())}") from None
