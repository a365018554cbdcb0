"""The engine options every subcommand shares, defined once.

`with_engine_options` adds them to a Typer command's signature (grouped under "Engine" in
--help) and hands the command one `engine_kwargs` dict for `EngineConfig.create`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Annotated, Any

import typer

PANEL = "Engine"
PARALLEL = "Parallelism"

# The MODEL argument of every subcommand; those that can also reach a server (--url) take the second.
ModelArgument = Annotated[str | None, typer.Argument(
    help="HF model directory or .gguf file (default: embedded SmolLM2).")]
ModelOrServedArgument = Annotated[str | None, typer.Argument(
    help="HF model directory or .gguf file (default: embedded SmolLM2); with --url, the served model's name "
         "(default: the server's).")]

# name -> (annotation, default, EngineConfig.create keyword)
ENGINE_OPTIONS: dict[str, tuple[Any, Any, str]] = {
    "device": (Annotated[str, typer.Option(help="auto, cpu or cuda[:N].", rich_help_panel=PANEL)], "auto",
               "device"),
    "dtype": (Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.", rich_help_panel=PANEL)],
              "auto", "dtype"),
    "max_model_len": (Annotated[int | None, typer.Option(help="Context length (default: the model's).",
                                                         rich_help_panel=PANEL)], None, "max_model_len"),
    "gpu_memory_util": (Annotated[float, typer.Option("--gpu-memory-util", "--gpu-memory-utilization",
                                                      help="Share of GPU memory the engine may use.",
                                                      rich_help_panel=PANEL)], 0.9, "gpu_memory_utilization"),
    "cpu_kv_cache_gib": (Annotated[float, typer.Option(help="KV-cache budget on the CPU, GiB.", rich_help_panel=PANEL)],
                         4.0, "cpu_kv_cache_gib"),
    "max_num_seqs": (Annotated[int | None, typer.Option(help="Sequences per step at most (default: 1024 on a GPU, "
                                                             "256 elsewhere).", rich_help_panel=PANEL)], None,
                     "max_num_seqs"),
    "max_num_batched_tokens": (Annotated[int | None, typer.Option(help="Token budget per step.",
                                                                  rich_help_panel=PANEL)], None,
                               "max_num_batched_tokens"),
    "block_size": (Annotated[int | None, typer.Option(help="KV-cache block size in tokens (default: 16; 256 with "
                                                          "flash-attn).", rich_help_panel=PANEL)], None,
                   "block_size"),
    "attention_backend": (Annotated[str, typer.Option(help="Paged attention: auto (flash-attn where it is installed, "
                                                           "on a GPU in 16-bit), triton or flash-attn.",
                                                      rich_help_panel=PANEL)], "auto", "attention_backend"),
    "kv_cache_dtype": (Annotated[str, typer.Option(help="KV-cache dtype: auto (the model's), fp8 (e4m3, unscaled) "
                                                        "or int8 (a scale per token and head); the 8-bit ones take "
                                                        "half a 16-bit cache's memory and reads.",
                                                   rich_help_panel=PANEL)],
                       "auto", "kv_cache_dtype"),
    "enable_prefix_caching": (Annotated[bool, typer.Option("--enable-prefix-caching/--no-enable-prefix-caching",
                                                           help="Reuse cached KV blocks of shared prefixes.",
                                                           rich_help_panel=PANEL)], True, "enable_prefix_caching"),
    "enforce_eager": (Annotated[bool, typer.Option(help="Disable CUDA graphs.", rich_help_panel=PANEL)], False,
                      "enforce_eager"),
    "async_scheduling": (Annotated[bool, typer.Option("--async-scheduling/--no-async-scheduling",
                                                      help="On one GPU, plan the next step while this one runs.",
                                                      rich_help_panel=PANEL)], True, "async_scheduling"),
    "load_format": (Annotated[str, typer.Option(help="auto, safetensors, gguf or dummy.", rich_help_panel=PANEL)],
                    "auto", "load_format"),
    "seed": (Annotated[int, typer.Option(help="Seed for dummy weights and unseeded sampling.",
                                         rich_help_panel=PANEL)], 0, "seed"),
    "tokenizer": (Annotated[str | None, typer.Option(help="Tokenizer path (default: the model's).",
                                                     rich_help_panel=PANEL)], None, "tokenizer"),
    "tensor_parallel_size": (Annotated[int, typer.Option("--tp", "--tensor-parallel-size",
                                                         help="Tensor-parallel ranks.", rich_help_panel=PARALLEL)],
                             1, "tensor_parallel_size"),
    "pipeline_parallel_size": (Annotated[int, typer.Option("--pp", "--pipeline-parallel-size",
                                                           help="Pipeline stages.", rich_help_panel=PARALLEL)],
                               1, "pipeline_parallel_size"),
    "expert_parallel_size": (Annotated[int, typer.Option("--ep", "--expert-parallel-size",
                                                         help="Expert-parallel groups of the TP ranks for MoE "
                                                              "layers (divides --tp; = --tp: whole experts per rank).",
                                                         rich_help_panel=PARALLEL)],
                             1, "expert_parallel_size"),
    "pp_layer_split": (Annotated[str | None, typer.Option(help="Layers per stage, e.g. 10,12,10.",
                                                          rich_help_panel=PARALLEL)], None, "pp_layer_split"),
    "scheduling_policy": (Annotated[str, typer.Option(
        help="fcfs, or longest_first: most max_tokens first, admissions spread over the longest request's "
             "steps (offline batches whose max_tokens bound the outputs).", rich_help_panel=PANEL)],
        "fcfs", "scheduling_policy"),
    "schedule_method": (Annotated[str, typer.Option(help="auto, chunked_prefill or token_throttling.",
                                                    rich_help_panel=PARALLEL)], "auto", "schedule_method"),
    "nnodes": (Annotated[int, typer.Option(help="Machines in a multi-node run.", rich_help_panel=PARALLEL)], 1,
               "nnodes"),
    "node_rank": (Annotated[int, typer.Option(help="This machine's index (0 runs the engine).",
                                              rich_help_panel=PARALLEL)], 0, "node_rank"),
    "master_addr": (Annotated[str, typer.Option(help="Address of node 0 for the rendezvous.",
                                                rich_help_panel=PARALLEL)], "127.0.0.1", "master_addr"),
    "master_port": (Annotated[int | None, typer.Option(help="Rendezvous port (required with --nnodes > 1).",
                                                       rich_help_panel=PARALLEL)], None, "master_port"),
}


def _flag(name: str) -> str:
    """The long CLI flag of an engine option, e.g. "--tensor-parallel-size"."""
    info = ENGINE_OPTIONS[name][0].__metadata__[0]
    decls = [d.split("/")[0] for d in info.param_decls] or [f"--{name.replace('_', '-')}"]
    return max(decls, key=len)


# EngineConfig.create keyword -> the flag that sets it, to name flags in configuration errors
FLAGS: dict[str, str] = {kwarg: _flag(name) for name, (_, _, kwarg) in ENGINE_OPTIONS.items()}


def _engine_kwargs(values: dict[str, Any]) -> dict[str, Any]:
    kwargs = {ENGINE_OPTIONS[name][2]: value for name, value in values.items()}
    split = kwargs.get("pp_layer_split")
    if split is not None:
        try:
            kwargs["pp_layer_split"] = [int(x) for x in split.split(",")]
        except ValueError:
            raise typer.BadParameter(f"--pp-layer-split must be comma-separated integers, got {split!r}") from None
    return kwargs


def with_engine_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Give `command(..., engine_kwargs)` the shared engine options as its own CLI options."""
    sig = inspect.signature(command, eval_str=True)  # also for modules with postponed annotations
    own = [p for name, p in sig.parameters.items() if name != "engine_kwargs"]
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
             for name, (annotation, default, _) in ENGINE_OPTIONS.items()]

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        engine_values = {name: kwargs.pop(name) for name in ENGINE_OPTIONS}
        return command(*args, engine_kwargs=_engine_kwargs(engine_values), **kwargs)

    wrapper.__signature__ = sig.replace(parameters=[
        p.replace(kind=inspect.Parameter.KEYWORD_ONLY) if p.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD else p
        for p in own] + extra)
    return wrapper
