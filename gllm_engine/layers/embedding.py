"""Vocabulary-parallel token embedding and LM head."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gllm_engine.layers.ops import REFERENCE_OPS, KernelOps
from gllm_engine.layers.parallel import SINGLE, TPLayout


class VocabParallelEmbedding(nn.Module):
    """Each rank holds a contiguous slice of the vocabulary; out-of-slice ids embed to zero, then all-reduce."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TPLayout = SINGLE):
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.shard_size = (vocab_size + tp.size - 1) // tp.size
        self.vocab_start = tp.rank * self.shard_size
        self.weight = nn.Parameter(torch.empty(self.shard_size, hidden_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
        shard = loaded[self.vocab_start:self.vocab_start + self.shard_size]
        if loaded.shape[1] != param.shape[1]:
            raise ValueError(f"embedding width {loaded.shape[1]} does not match hidden size {param.shape[1]}")
        param.data.zero_()
        param.data[: shard.shape[0]].copy_(shard)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.shard_size)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside[:, None], 0)
        return self.tp.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Projects hidden states to logits over the full vocabulary (gathered across ranks)."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TPLayout = SINGLE, ops: KernelOps = REFERENCE_OPS):
        super().__init__(vocab_size, hidden_size, tp)
        self.ops = ops

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.ops.linear(hidden, self.weight)  # [N, V / tp]
        return self.tp.all_gather_last_dim(logits)[:, : self.vocab_size]
