"""One decoder for the Llama family: Llama 2/3/3.x, Mistral, Qwen2 and Qwen3.

The architectures differ only by flags read from the HF config: bias on q/k/v (Qwen2), per-head
RMSNorm on q and k (Qwen3), explicit head_dim, tied embeddings and rope scaling.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gllm_engine.layers.attention import Attention, AttentionMetadata
from gllm_engine.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from gllm_engine.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from gllm_engine.layers.norm import RMSNorm
from gllm_engine.layers.ops import REFERENCE_OPS, KernelOps
from gllm_engine.layers.parallel import SINGLE, WHOLE_MODEL, PPStage, TPLayout
from gllm_engine.layers.rotary import RotaryEmbedding, rope_parameters


@dataclass(frozen=True)
class DecoderFlags:
    """What distinguishes one member of the family from another."""

    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool

    @classmethod
    def from_hf(cls, architecture: str, cfg: Any) -> DecoderFlags:
        attention_bias = bool(getattr(cfg, "attention_bias", False))
        if architecture == "Qwen2ForCausalLM":
            return cls(qkv_bias=True, o_bias=False, mlp_bias=False, qk_norm=False)
        if architecture == "Qwen3ForCausalLM":
            return cls(qkv_bias=attention_bias, o_bias=attention_bias, mlp_bias=False, qk_norm=True)
        return cls(qkv_bias=attention_bias, o_bias=attention_bias,
                   mlp_bias=bool(getattr(cfg, "mlp_bias", False)), qk_norm=False)


def head_dim_of(cfg: Any) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


class DecoderAttention(nn.Module):
    """Self-attention: fused qkv projection, rotary (and Qwen3's q/k norms), paged attention, o projection."""

    def __init__(self, cfg: Any, flags: DecoderFlags, max_positions: int, tp: TPLayout, ops: KernelOps):
        super().__init__()
        head_dim = head_dim_of(cfg)
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, head_dim, cfg.num_attention_heads,
                                          cfg.num_key_value_heads, bias=flags.qkv_bias, tp=tp, ops=ops)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * head_dim, cfg.hidden_size,
                                        bias=flags.o_bias, tp=tp, ops=ops)
        self.q_norm = RMSNorm(head_dim, cfg.rms_norm_eps, ops) if flags.qk_norm else None
        self.k_norm = RMSNorm(head_dim, cfg.rms_norm_eps, ops) if flags.qk_norm else None
        self.attn = Attention(self.num_heads, self.num_kv_heads, head_dim, head_dim**-0.5,
                              RotaryEmbedding(head_dim, max_positions, rope_parameters(cfg)), ops)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        qk_norm = (self.q_norm, self.k_norm) if self.q_norm is not None else None
        return self.o_proj(self.attn(positions, x, self.qkv_proj, meta, qk_norm))


class DecoderMLP(nn.Module):
    """Gated MLP: fused gate-up projection, SiLU-and-mul, down projection."""

    def __init__(self, cfg: Any, flags: DecoderFlags, tp: TPLayout, ops: KernelOps):
        super().__init__()
        inter = cfg.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [inter, inter], bias=flags.mlp_bias, tp=tp,
                                                       ops=ops)
        self.down_proj = RowParallelLinear(inter, cfg.hidden_size, bias=flags.mlp_bias, tp=tp, ops=ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gate_up_proj.silu_and_mul(x))


class DecoderLayer(nn.Module):
    """Pre-norm decoder layer; the residual stream is carried beside the hidden states."""

    def __init__(self, cfg: Any, flags: DecoderFlags, max_positions: int, tp: TPLayout, ops: KernelOps):
        super().__init__()
        self.self_attn = DecoderAttention(cfg, flags, max_positions, tp, ops)
        self.mlp = DecoderMLP(cfg, flags, tp, ops)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
                meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class DecoderModel(nn.Module):
    """Embedding, the decoder layers of this pipeline stage, final norm; other stages' layers are placeholders."""

    def __init__(self, cfg: Any, flags: DecoderFlags, max_positions: int, tp: TPLayout, ops: KernelOps,
                 stage: PPStage = WHOLE_MODEL):
        super().__init__()
        self.stage = stage
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp) if stage.is_first else None
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, flags, max_positions, tp, ops) if stage.owns_layer(i) else nn.Identity()
            for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops) if stage.is_last else None

    def local_layers(self) -> list[DecoderLayer]:
        return [layer for layer in self.layers if isinstance(layer, DecoderLayer)]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                intermediate: tuple[torch.Tensor, torch.Tensor] | None = None):
        """Final hidden states `[T, H]` on the last stage, else (hidden, residual) for the next stage."""
        if self.stage.is_first:
            x, residual = self.embed_tokens(input_ids), None  # [T, H]
        else:
            x, residual = intermediate
        for layer in self.local_layers():
            x, residual = layer(positions, x, residual, meta)
        if not self.stage.is_last:
            return x, residual
        x, _ = self.norm(x, residual)
        return x


class LlamaForCausalLM(nn.Module):
    """Causal LM head over the shared decoder; HF weight names load unchanged."""

    # HF checkpoint projection -> (fused parameter, shard id)
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, hf_config: Any, *, max_positions: int, tp: TPLayout = SINGLE,
                 ops: KernelOps = REFERENCE_OPS, stage: PPStage = WHOLE_MODEL,
                 architecture: str = "LlamaForCausalLM"):
        super().__init__()
        self.config = hf_config
        self.stage = stage
        flags = DecoderFlags.from_hf(architecture, hf_config)
        self.model = DecoderModel(hf_config, flags, max_positions, tp, ops, stage)
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        self.lm_head = None
        if stage.is_last:
            self.lm_head = ParallelLMHead(hf_config.vocab_size, hf_config.hidden_size, tp, ops)
            if self.tie_word_embeddings and stage.is_first:
                self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                intermediate: tuple[torch.Tensor, torch.Tensor] | None = None):
        """Hidden states `[T, H]` of every token of the step (last stage), or what the next stage needs."""
        return self.model(input_ids, positions, meta, intermediate)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits `[N, V]` in the model's dtype for the selected hidden states `[N, H]` (last stage only)."""
        return self.lm_head.compute_logits(hidden)

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.local_layers()]

    def _targets(self, name: str) -> list[str]:
        """The parameter names a checkpoint tensor loads into on this stage (none if another stage's)."""
        if name.startswith("model.layers."):
            return [name] if self.stage.owns_layer(int(name.split(".")[2])) else []
        if name.startswith("model.embed_tokens."):
            targets = [name] if self.stage.is_first else []
            if self.tie_word_embeddings and self.stage.is_last and not self.stage.is_first:
                targets.append(name.replace("model.embed_tokens.", "lm_head."))
            return targets
        if name.startswith("lm_head."):
            return [] if self.tie_word_embeddings or not self.stage.is_last else [name]
        if name.startswith("model.norm."):
            return [name] if self.stage.is_last else []
        return [name]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy HF-named tensors into (fused, sharded) parameters; returns the parameter names loaded."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for hf_name, tensor in weights:
            if "rotary_emb.inv_freq" in hf_name:
                continue
            for name in self._targets(hf_name):
                shard_id = None
                for hf_part, (fused, sid) in self.packed_modules_mapping.items():
                    if f".{hf_part}." in name:
                        name, shard_id = name.replace(f".{hf_part}.", f".{fused}."), sid
                        break
                param = params.get(name)
                if param is None:
                    raise ValueError(f"checkpoint tensor {hf_name!r} has no matching parameter in "
                                     f"{type(self).__name__}")
                loader = getattr(param, "weight_loader", None)
                if loader is None:
                    if param.shape != tensor.shape:
                        raise ValueError(f"{hf_name}: checkpoint shape {tuple(tensor.shape)} != {tuple(param.shape)}")
                    param.data.copy_(tensor)
                else:
                    loader(param, tensor.to(param.dtype), shard_id)
                loaded.add(name)
        return loaded
