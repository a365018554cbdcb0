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
