"""A rank's place in the parallel layout, as layers and models see it (passed in, never looked up)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TPLayout:
    """This rank's place in its tensor-parallel group; `group` is a torch.distributed process group."""

    rank: int = 0
    size: int = 1
    group: Any = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


SINGLE = TPLayout()


@dataclass(frozen=True)
class EPLayout:
    """How one stage's tensor-parallel ranks share the routed experts of every MoE layer.

    The `tp` ranks form `size` expert-parallel groups of `tp / size` consecutive ranks: group `rank`
    holds experts `[rank * E / size, (rank + 1) * E / size)`, and its ranks split each of those
    experts' intermediate dimension as tensor parallelism does. `size == tp` gives every rank whole
    experts; `size == 1` (the default) is plain tensor parallelism.
    """

    rank: int = 0
    size: int = 1

    @classmethod
    def over(cls, tp: TPLayout, size: int) -> EPLayout:
        """This TP rank's expert-parallel group when the `tp.size` ranks form `size` groups."""
        if size < 1 or tp.size % size:
            raise ValueError(f"expert-parallel size ({size}) must divide the tensor-parallel size ({tp.size})")
        return cls(tp.rank // (tp.size // size), size)

    def expert_tp(self, tp: TPLayout) -> TPLayout:
        """This rank's place among the `tp.size / size` ranks that share one expert (no group: never reduces)."""
        per_expert = tp.size // self.size
        return TPLayout(tp.rank % per_expert, per_expert)

    def expert_range(self, num_experts: int) -> range:
        """The global ids of the experts this rank holds."""
        if num_experts % self.size:
            raise ValueError(f"the {num_experts} experts do not divide over {self.size} expert-parallel ranks")
        per_rank = num_experts // self.size
        return range(self.rank * per_rank, (self.rank + 1) * per_rank)


ALL_EXPERTS = EPLayout()


@dataclass(frozen=True)
class PPStage:
    """The decoder layers `[layer_start, layer_end)` this pipeline stage runs."""

    rank: int = 0
    size: int = 1
    layer_start: int = 0
    layer_end: int | None = None  # None: through the last layer

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.size - 1

    def owns_layer(self, index: int) -> bool:
        return self.layer_start <= index and (self.layer_end is None or index < self.layer_end)


WHOLE_MODEL = PPStage()


def split_layers(num_layers: int, pp_size: int, split: list[int] | None = None) -> list[tuple[int, int]]:
    """Layer ranges per stage: `split` gives each stage's layer count, else as even as possible."""
    if split is None:
        base, extra = divmod(num_layers, pp_size)
        split = [base + (1 if i < extra else 0) for i in range(pp_size)]
    if len(split) != pp_size or sum(split) != num_layers or min(split) < 1:
        raise ValueError(f"pipeline layer split {split} must give {pp_size} stages at least one layer each "
                         f"and sum to the model's {num_layers} layers")
    ranges, start = [], 0
    for count in split:
        ranges.append((start, start + count))
        start += count
    return ranges
