"""Offline throughput on ShareGPT: gLLM beside transformers' continuous batching, same requests, same run.

Requests: ShareGPT conversations sampled and filtered by `gllm_cli.datasets` (seed 0), tokenized
with the embedded SmolLM2 tokenizer (its ids are valid for any larger vocabulary), ignore_eos.
Dummy (random) weights at the shapes of `--config`. Each engine runs in its own process, one after
the other, so GPU memory is freed between them.

The transformers baseline is the continuous-batching manager that `generate_batch` wraps
(`attn_implementation="paged|sdpa"`, sized with the same workload hints `generate_batch` computes),
fed through `add_request` so that every request keeps its own `max_new_tokens`: `generate_batch`
itself takes one `max_new_tokens` for the whole batch. `--num-prompts-transformers N` runs it on
the first N requests only; `--transformers-timeout` stops it, and a stopped run reports the rates
of its window (finished requests; tokens of every request, finished or not) marked as partial.

    python benchmarks/offline_throughput.py --config benchmarks/configs/llama3-8b --num-prompts-transformers 200
    python benchmarks/offline_throughput.py --save-requests reqs.json          # sample and tokenize only
    python benchmarks/offline_throughput.py --config DIR --device cpu --dtype float32 --num-prompts 8 --max-output-len 8
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from gllm_cli.datasets import BenchRequest, load_requests, read_sharegpt, sample_sharegpt, save_requests
from gllm_cli.metrics import throughput

ENGINES = ("gllm", "transformers")
TRANSFORMERS_ATTN = "paged|sdpa"
WARMUP_TOKENS = 16
WARMUP_LIMIT_S = 120.0
PROGRESS_EVERY_S = 30.0
STOP_GRACE_S = 300.0  # beyond an engine's time limit, for loading and teardown, before its process is killed
TRANSFORMERS_H100_REFERENCE = ("for scale: transformers 5.17 did 2.65 req/s (1,191 total tok/s) on 1,000 such requests "
                               "on an H100")

Row = dict[str, Any]
Runner = Callable[[argparse.Namespace, list[BenchRequest], Callable[[Row], None]], None]


def sharegpt_requests(num: int, seed: int) -> list[BenchRequest]:
    from gllm_engine.loader.default_model import default_model_path
    from gllm_engine.loader.tokenizer import load_tokenizer

    data = read_sharegpt()
    print(f"ShareGPT: {len(data.records)} complete records read" + (" (file truncated)" if data.truncated else ""))
    return sample_sharegpt(data.records, load_tokenizer(default_model_path()), num, seed=seed)


def workload_requests(requests_file: str | None, num_prompts: int, seed: int,
                      max_output_len: int | None = None) -> list[BenchRequest]:
    """The first `num_prompts` requests of `requests_file` (from --save-requests), else a ShareGPT sample;
    outputs capped at `max_output_len` (smoke runs)."""
    requests = (load_requests(requests_file) if requests_file else sharegpt_requests(num_prompts, seed))[:num_prompts]
    if max_output_len:
        for r in requests:
            r.output_len = min(r.output_len, max_output_len)
    return requests


def throughput_row(engine: str, requests: list[BenchRequest], seconds: float, completed: int, input_tokens: int,
         output_tokens: int, note: str | None = None) -> Row:
    rates = throughput(seconds, completed, input_tokens, output_tokens)
    return dict(engine=engine, requests=len(requests), completed=completed, seconds=seconds,
                input_tokens=input_tokens, output_tokens=output_tokens, requests_per_s=rates.requests_per_s,
                output_tokens_per_s=rates.output_tokens_per_s, total_tokens_per_s=rates.total_tokens_per_s, note=note)


def warmup_requests(requests: list[BenchRequest]) -> list[BenchRequest]:
    """Synthetic prompts as long as the workload's shortest and longest, a few tokens each: kernels compile
    outside the timing, and no prefix is shared with the workload (token ids 1..64, repeated)."""
    by_len = sorted(requests, key=lambda r: len(r.prompt_token_ids))
    return [BenchRequest(None, [1 + i % 64 for i in range(len(r.prompt_token_ids))], min(r.output_len, WARMUP_TOKENS))
            for r in (by_len[0], by_len[-1])]


def add_gllm_arguments(ap: argparse.ArgumentParser) -> None:
    """The engine options `dummy_gllm` reads."""
    ap.add_argument("--max-num-seqs", type=int, default=None, help="gLLM (default: the engine's)")
    ap.add_argument("--max-num-batched-tokens", type=int, default=None, help="gLLM")
    ap.add_argument("--enforce-eager", action="store_true", help="gLLM: no CUDA graphs")
    ap.add_argument("--no-async-scheduling", action="store_true", help="gLLM: plan a step after the last's tokens")
    ap.add_argument("--kv-cache-dtype", default="auto", help="gLLM: auto (the model dtype), fp8 or int8")
    ap.add_argument("--scheduling-policy", default="fcfs", help="gLLM: fcfs or longest_first")


def dummy_gllm(args: argparse.Namespace, config_dir: str) -> Any:
    """A gLLM `LLM` with dummy weights at the shapes of `config_dir`, configured by `add_gllm_arguments`'s options."""
    from gllm_engine import LLM

    return LLM(config_dir, load_format="dummy", dtype=args.dtype, device=args.device, skip_tokenizer_init=True,
               max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
               enforce_eager=args.enforce_eager, async_scheduling=not args.no_async_scheduling,
               kv_cache_dtype=args.kv_cache_dtype, scheduling_policy=args.scheduling_policy, show_progress=False)


def timed_gllm(llm: Any, requests: list[BenchRequest], device: str, use_tqdm: bool = False) -> Row:
    """Generate every request greedily to its output length (ignore_eos); the throughput row of the run."""
    from gllm_engine import SamplingParams

    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
    params = [SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True) for r in requests]
    sync_device(device)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=use_tqdm)
    sync_device(device)
    elapsed = time.perf_counter() - start
    return throughput_row("gLLM", requests, elapsed, len(outs), sum(len(r.prompt_token_ids) for r in requests),
                          sum(len(o.outputs[0].token_ids) for o in outs))


def run_gllm(args: argparse.Namespace, requests: list[BenchRequest], report: Callable[[Row], None]) -> None:
    llm = dummy_gllm(args, args.config)
    timed_gllm(llm, warmup_requests(requests), args.device)  # kernels compile outside the timing
    report(timed_gllm(llm, requests, args.device, use_tqdm=True))


def run_transformers(args: argparse.Namespace, requests: list[BenchRequest], report: Callable[[Row], None]) -> None:
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    from transformers.generation.continuous_batching.utils import WorkloadHints

    device = _torch_device(args.device)
    config = AutoConfig.from_pretrained(args.config)
    with torch.device(device):  # random init on the device: an 8B init on the CPU takes minutes
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype),
                                                 attn_implementation=TRANSFORMERS_ATTN).eval()
    max_new = max(r.output_len for r in requests)
    gen = GenerationConfig(do_sample=False, max_new_tokens=max_new, eos_token_id=-1, pad_token_id=0)  # no EOS
    hints = WorkloadHints(max_prompt_length=max(len(r.prompt_token_ids) for r in requests),
                          max_generated_length=max_new, num_requests=len(requests))
    engine = f"transformers {transformers.__version__} ({TRANSFORMERS_ATTN})"
    t0 = time.perf_counter()
    with model.continuous_batching_context_manager(generation_config=gen, workload_hints=hints,
                                                   continuous_batching_config=_cpu_cache_config(device, requests)
                                                   ) as manager:
        print(f"transformers: manager ready after {time.perf_counter() - t0:.1f} s", flush=True)
        warm = {manager.add_request(r.prompt_token_ids, request_id=f"warmup-{i}", max_new_tokens=r.output_len)
                for i, r in enumerate(warmup_requests(requests))}
        if len(_collect(manager, warm, deadline=time.perf_counter() + WARMUP_LIMIT_S)) < len(warm):
            raise RuntimeError("transformers: the warm-up requests did not finish")
        sync_device(device)
        start = time.perf_counter()
        ids = {manager.add_request(r.prompt_token_ids, request_id=str(i), max_new_tokens=r.output_len): r
               for i, r in enumerate(requests)}
        finished = _collect(manager, set(ids), deadline=start + args.transformers_timeout)
        errors = [o.error for o in finished.values() if o.error]
        if len(finished) == len(ids) and not errors:
            elapsed = time.perf_counter() - start
            report(throughput_row(engine, requests, elapsed, len(finished),
                                  sum(len(r.prompt_token_ids) for r in requests),
                                  sum(len(o.generated_tokens) for o in finished.values())))
            return
        # Stopped early (time limit, a failed request or a dead generation thread): a hard stop fails the
        # unfinished requests, and their outputs carry the tokens they had generated.
        fatal = getattr(manager.background_thread_status, "fatal_error", None)
        manager.stop(block=True, timeout=60, hard_stop=True)
        elapsed = time.perf_counter() - start  # up to the stop, so every counted token falls inside it
        outs = [*finished.values(), *_drain(manager, set(ids) - set(finished))]
        started = [o for o in outs if o.generated_tokens]  # prefill done: its prompt counts as processed
        row = throughput_row(engine, requests, elapsed, sum(1 for o in finished.values() if not o.error),
                   sum(len(ids[o.request_id].prompt_token_ids) for o in started),
                   sum(len(o.generated_tokens) for o in started),
                   note=f"partial: stopped at the {args.transformers_timeout:.0f} s limit; rates over that window")
        if errors or fatal is not None:
            row["error"] = f"a request failed: {errors[0]}" if errors else f"the generation thread failed: {fatal}"
        report(row)
        if manager.is_running():  # the stop was not honoured: leave now rather than wait on the thread forever
            print("transformers: the generation thread did not stop; exiting", flush=True)
            os._exit(0)


def _cpu_cache_config(device: str, requests: list[BenchRequest]) -> Any:
    """On the CPU, a cache sized to the workload: transformers would otherwise claim 90% of free host memory."""
    if device != "cpu":
        return None  # the GPU baseline sizes itself, as it does for any user
    from transformers import ContinuousBatchingConfig

    page = 256  # tokens per block: the default of both 5.17 (block_size) and later versions (page_size)
    # twice what the requests can fill, so the scheduler's free-block safety margin never holds one back
    blocks = sum(2 * (-(-(len(r.prompt_token_ids) + r.output_len) // page) + 1) for r in requests)
    return ContinuousBatchingConfig(num_blocks=blocks, max_batch_tokens=512)


def _collect(manager: Any, ids: set[str], deadline: float) -> dict[str, Any]:
    """Outputs of the requests in `ids` as they finish, until all have, the deadline passes or the thread stops.

    A failed request ends the wait too (its output carries the error).
    """
    finished: dict[str, Any] = {}
    start = last_report = time.perf_counter()
    while len(finished) < len(ids):
        now = time.perf_counter()
        if now >= deadline:
            print(f"transformers: time limit reached with {len(finished)}/{len(ids)} done", flush=True)
            break
        if now - last_report >= PROGRESS_EVERY_S:
            last_report = now
            print(f"transformers: {len(finished)}/{len(ids)} done after {now - start:.0f} s{_queue_state(manager)}",
                  flush=True)
        out = manager.get_result(timeout=1.0)
        if out is None:
            if not manager.is_running():
                print("transformers: the generation thread stopped", flush=True)
                break
            continue
        if out.request_id in ids and out.is_finished():
            finished[out.request_id] = out
            if out.error:
                break
    return finished


def _drain(manager: Any, ids: set[str]) -> list[Any]:
    """The outputs still queued for `ids` after a hard stop (failed, with the tokens they had generated)."""
    outs = []
    while (out := manager.get_result(timeout=1.0)) is not None:
        if out.request_id in ids:
            outs.append(out)
    return outs


def _queue_state(manager: Any) -> str:
    """Transformers' scheduler and cache state for the progress line, to tell a slow run from a stuck one.

    Reads internals of the manager (present in 5.17 to 5.24), so best effort: blank when they are missing.
    """
    processor = getattr(manager, "batch_processor", None)
    scheduler, cache = getattr(processor, "scheduler", None), getattr(processor, "cache", None)
    if scheduler is None:
        return ""
    parts = [f"{len(scheduler.active_requests)} active", f"{len(scheduler.waiting_requests)} waiting"]
    if hasattr(cache, "get_num_free_blocks"):  # 5.17; later versions count free pages per allocator
        parts.append(f"{cache.get_num_free_blocks()}/{cache.num_blocks} free blocks")
    if getattr(scheduler, "block_new_requests", False):
        parts.append("admission blocked")
    return f" ({', '.join(parts)})"


def _torch_device(device: str) -> str:
    import torch

    if device == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if device == "cuda":
        raise RuntimeError("--device cuda but no CUDA device is visible")
    return "cpu"


def sync_device(device: str) -> None:
    import torch

    if device != "cpu" and torch.cuda.is_available():
        torch.cuda.synchronize()


RUNNERS = {"gllm": run_gllm, "transformers": run_transformers}


def _child(runner: Runner, args: argparse.Namespace, requests: list[BenchRequest], result_path: str) -> None:
    runner(args, requests, lambda row: Path(result_path).write_text(json.dumps(row)))


def run_isolated(name: str, runner: Runner, args: argparse.Namespace, requests: list[BenchRequest],
                 limit_s: float) -> Row:
    """`runner(args, requests, report)` in a fresh process (GPU memory is freed after it): the last row it
    reported, or an error row if it failed or overran `limit_s`."""
    with tempfile.TemporaryDirectory(prefix="gllm-bench-") as tmp:
        result = Path(tmp) / "result.json"
        proc = mp.get_context("spawn").Process(target=_child, args=(runner, args, requests, str(result)))
        proc.start()
        proc.join(limit_s)
        failure = None
        if proc.is_alive():
            proc.kill()
            proc.join()
            failure = f"killed after {limit_s:.0f} s"
        elif proc.exitcode != 0:
            failure = f"exit code {proc.exitcode}"
        if result.exists():
            return json.loads(result.read_text())
    return dict(engine=name, requests=len(requests), error=failure or "no result")


def run_engine(engine: str, args: argparse.Namespace, requests: list[BenchRequest]) -> Row:
    """Run one engine of this script in a fresh process (see `run_isolated`)."""
    limit = (args.gllm_timeout if engine == "gllm" else args.transformers_timeout) + STOP_GRACE_S
    return run_isolated(engine, RUNNERS[engine], args, requests, limit)


def print_table(rows: list[Row], title: str) -> None:
    baseline = next((r for r in rows if r["engine"].startswith("transformers") and "error" not in r), None)
    table = Table(title=title)
    for col in ("engine", "requests", "seconds", "req/s", "output tok/s", "total tok/s", "req/s vs HF",
                "tok/s vs HF"):
        table.add_column(col, justify="left" if col == "engine" else "right")
    for r in rows:
        if "error" in r:
            table.add_row(r["engine"], str(r["requests"]), *["-"] * 6)
            continue
        done = str(r["requests"]) if r["completed"] == r["requests"] else f"{r['completed']}/{r['requests']}"
        ratios = [f"{r[k] / baseline[k]:.1f}x" if baseline and baseline[k] else "-"
                  for k in ("requests_per_s", "total_tokens_per_s")]
        table.add_row(r["engine"], done, f"{r['seconds']:.1f}", f"{r['requests_per_s']:.2f}",
                      f"{r['output_tokens_per_s']:,.0f}", f"{r['total_tokens_per_s']:,.0f}", *ratios)
    Console(width=None if sys.stdout.isatty() else 120).print(table)  # logs: wide enough for the table
    for r in rows:
        if r.get("error") or r.get("note"):
            print(f"{r['engine']}: {r.get('error') or r['note']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="benchmarks/configs/llama3-8b", help="model dir (config.json; dummy weights)")
    ap.add_argument("--num-prompts", type=int, default=1000)
    ap.add_argument("--num-prompts-transformers", type=int, default=None,
                    help="run the transformers baseline on the first N requests only (default: all)")
    ap.add_argument("--engines", default=",".join(ENGINES), help="comma-separated, run in this order")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    add_gllm_arguments(ap)
    ap.add_argument("--max-output-len", type=int, default=None, help="cap output lengths (smoke runs only)")
    ap.add_argument("--transformers-timeout", type=float, default=300.0,
                    help="seconds of generation before the transformers baseline is stopped (then reported partial)")
    ap.add_argument("--gllm-timeout", type=float, default=900.0, help="seconds before the gLLM run counts as hung")
    ap.add_argument("--requests-file", help="pre-sampled requests (from --save-requests) instead of ShareGPT")
    ap.add_argument("--save-requests", help="sample and tokenize, write the requests to this file, and exit")
    ap.add_argument("--output-json")
    args = ap.parse_args()
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if not engines or any(e not in ENGINES for e in engines):
        ap.error(f"--engines takes a comma-separated subset of {', '.join(ENGINES)}")

    requests = workload_requests(args.requests_file, args.num_prompts, args.seed, args.max_output_len)
    if args.save_requests:
        save_requests(requests, args.save_requests)
        print(f"wrote {len(requests)} requests to {args.save_requests}")
        return
    prompt_tokens, output_tokens = sum(len(r.prompt_token_ids) for r in requests), sum(r.output_len for r in requests)
    print(f"workload: {len(requests)} requests, {prompt_tokens} prompt + {output_tokens} output tokens "
          f"(mean {prompt_tokens / len(requests):.0f} + {output_tokens / len(requests):.0f}), ignore_eos")

    rows = []
    for engine in engines:
        subset = requests[: args.num_prompts_transformers] if engine == "transformers" else requests
        rows.append(run_engine(engine, args, subset))
        r = rows[-1]
        print(f"{r['engine']}: " + (f"failed: {r['error']}" if "error" in r else
                                    f"{r['completed']}/{r['requests']} requests in {r['seconds']:.1f} s, "
                                    f"{r['output_tokens']} output tokens"), flush=True)

    print_table(rows, f"Offline throughput, ShareGPT, {Path(args.config).name} ({args.dtype}, gLLM's KV cache "
                      f"{args.kv_cache_dtype}, dummy weights)")
    if "transformers" in engines and args.device != "cpu":
        print(TRANSFORMERS_H100_REFERENCE)
    if args.output_json:
        workload = dict(requests=len(requests), prompt_tokens=prompt_tokens, output_tokens=output_tokens,
                        seed=args.seed, config=args.config, dtype=args.dtype, device=args.device,
                        kv_cache_dtype=args.kv_cache_dtype)
        Path(args.output_json).write_text(json.dumps({"workload": workload, "results": rows}, indent=2))
    if any("error" in r for r in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
