"""Fill a gLLM model's parameters: stream checkpoint tensors into `model.load_weights`, or dummy values.

The model owns the mapping from HF names to its (fused, sharded) parameters: `load_weights` takes
an iterable of (hf_name, tensor) and returns the names of the parameters it filled. This module
only feeds it, shows progress, and checks that nothing was left out.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import closing

import torch
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from gllm_engine.loader import ModelLoadError
from gllm_engine.loader.model_files import ModelFiles

DUMMY_RANGE = 1e-3  # dummy weights are uniform in [-DUMMY_RANGE, DUMMY_RANGE]
_MAX_LISTED = 5


def load_model_weights(model: nn.Module, files: ModelFiles, *, dummy_seed: int = 0,
                       show_progress: bool = True) -> None:
    """Load every parameter of `model` from `files`; ModelLoadError names the parameters left unset."""
    if files.load_format == "dummy":
        fill_dummy_weights(model, dummy_seed)
        return
    weights = files.iter_weights()
    if show_progress:
        weights = _with_progress(weights, files.num_weight_bytes())
    with closing(weights):  # if load_weights fails midway, the progress bar still goes away
        loaded = set(model.load_weights(weights))
    missing = [name for name, _ in model.named_parameters() if name not in loaded]
    if missing:
        listed = ", ".join(missing[:_MAX_LISTED]) + (", ..." if len(missing) > _MAX_LISTED else "")
        raise ModelLoadError(f"{len(missing)} parameters of {type(model).__name__} are not in the checkpoint "
                             f"{files.path}: {listed} (is it the right model, complete?)")


@torch.no_grad()
def fill_dummy_weights(model: nn.Module, seed: int = 0) -> None:
    """Random weights for benchmarks without a checkpoint, reproducible for a given seed and model.

    Every floating-point parameter is drawn in place on its own device (no CPU copies, fast for
    large models) from uniform(-1e-3, 1e-3); 1-byte (fp8) parameters from uniform(-1, 1), since 1e-3
    rounds to zero in fp8. Parameters named like norm weights ("norm" in the name, ending in
    ".weight") are set to 1.0 so activations keep their scale through the layers. Integer
    parameters are left as they are.
    """
    generators: dict[torch.device, torch.Generator] = {}
    for name, param in model.named_parameters():
        if not param.dtype.is_floating_point:
            continue
        if "norm" in name and name.endswith(".weight"):
            param.fill_(1.0)
            continue
        if param.device not in generators:
            generators[param.device] = torch.Generator(device=param.device).manual_seed(seed)
        gen = generators[param.device]
        if param.element_size() >= 2:
            param.uniform_(-DUMMY_RANGE, DUMMY_RANGE, generator=gen)
        else:  # fp8 has no uniform_: draw in bfloat16, then convert
            values = torch.empty(param.shape, dtype=torch.bfloat16, device=param.device)
            param.copy_(values.uniform_(-1.0, 1.0, generator=gen))


def _with_progress(weights: Iterable[tuple[str, torch.Tensor]],
                   total_bytes: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Pass `weights` through while a one-line transient progress bar (stderr, terminals only) counts bytes."""
    columns = (TextColumn("Loading weights"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    console = Console(stderr=True)
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task("weights", total=total_bytes or None)
        for name, tensor in weights:
            yield name, tensor
            progress.advance(task, tensor.numel() * tensor.element_size())
