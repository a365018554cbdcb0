"""Cost of the HTTP path: `gllm serve` under N concurrent streams versus the offline `LLM`, same requests.

Both paths run the same requests (token-id prompts, ignore_eos, each with its own max_tokens) and
the same engine options, one after the other in separate processes so that GPU memory is freed in
between: first the offline `LLM.generate` on all requests, then a `gllm serve` process driven by
`--concurrency` streaming clients (/v1/completions, SSE, stream_options.include_usage) spread over
`--client-procs` processes, so that parsing the streams never limits the server. Prints output
tokens/s of each path and the server's share of the offline throughput.

The server runs its engine in a process of its own on a GPU (`--engine-process`) and on a thread
elsewhere, as `gllm serve` does by default; `--engine-process/--no-engine-process` forces either.

Requests: `--requests-file` (saved by offline_throughput.py --save-requests), or ShareGPT sampled
as offline_throughput.py does.

    python benchmarks/server_overhead.py --requests-file .gpu/sharegpt1000.json             # Llama-3-8B shapes
    python benchmarks/server_overhead.py --model DIR --load-format dummy --device cpu --dtype float32 \\
        --num-prompts 8 --concurrency 4 --client-procs 2 --max-output-len 4                # smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import queue as queue_mod
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from gllm_cli.datasets import BenchRequest
from gllm_cli.metrics import throughput
from gllm_cli.serve import spawn_server

SERVER_START_LIMIT_S = 900.0  # loading and CUDA-graph capture of a large model
OFFLINE_LIMIT_S = 3600.0


def engine_flags(args: argparse.Namespace) -> dict[str, object]:
    """The engine options both paths share, as EngineConfig.create keywords."""
    return dict(load_format=args.load_format, dtype=args.dtype, device=args.device, max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=args.max_num_batched_tokens, enforce_eager=args.enforce_eager,
                gpu_memory_utilization=args.gpu_memory_util)


def uses_engine_process(args: argparse.Namespace) -> bool:
    """Whether the server gets its engine in a process of its own: as asked, else on a GPU."""
    if args.engine_process is not None:
        return args.engine_process
    if args.device == "auto":
        import torch

        return torch.cuda.is_available()
    return args.device.startswith("cuda")


def serve_args(args: argparse.Namespace) -> list[str]:
    flags = [args.model] if args.model else []
    for key, value in engine_flags(args).items():
        flag = "--gpu-memory-util" if key == "gpu_memory_utilization" else "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags += [flag] if value else []
        elif value is not None:
            flags += [flag, str(value)]
    engine = "--engine-process" if uses_engine_process(args) else "--no-engine-process"
    return [*flags, engine, "--no-access-log"]


def offline(args: argparse.Namespace, requests: list[BenchRequest], result_path: str) -> None:
    """Child process: the offline engine on every request; writes {"seconds", "tokens": [per request]}."""
    from gllm_engine import LLM, SamplingParams

    llm = LLM(args.model, skip_tokenizer_init=True, show_progress=False, **engine_flags(args))
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
    params = [SamplingParams(temperature=0, max_tokens=r.output_len, ignore_eos=True) for r in requests]
    llm.generate(prompts[:4], [SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)] * len(prompts[:4]))
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    seconds = time.perf_counter() - start
    Path(result_path).write_text(json.dumps({"seconds": seconds,
                                             "tokens": [len(o.outputs[0].token_ids) for o in outs]}))


async def stream_one(client: httpx.AsyncClient, r: BenchRequest) -> int:
    """One streamed completion; its completion_tokens from the usage chunk, or -1 if it failed."""
    body = {"prompt": r.prompt_token_ids, "max_tokens": r.output_len, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    try:
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                await resp.aread()
                return -1
            tokens = -1
            async for line in resp.aiter_lines():
                if '"usage"' in line and line.startswith("data: {"):  # parse only the final usage chunk
                    usage = json.loads(line[6:]).get("usage")
                    if usage:
                        tokens = usage["completion_tokens"]
            return tokens
    except httpx.HTTPError:
        return -1


def client_proc(url: str, requests: list[tuple[int, BenchRequest]], concurrency: int, ready: mp.Barrier,
                out: mp.Queue) -> None:
    """Child process: this share of the requests, at most `concurrency` open streams, once all clients are ready."""

    async def run() -> tuple[list[tuple[int, int]], float, float]:
        sem = asyncio.Semaphore(concurrency)
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(base_url=url, timeout=None, limits=limits) as client:
            async def one(i: int, r: BenchRequest) -> tuple[int, int]:
                async with sem:
                    return i, await stream_one(client, r)

            await asyncio.to_thread(ready.wait)
            start = time.time()
            results = await asyncio.gather(*(one(i, r) for i, r in requests))
        return results, start, time.time()

    out.put(asyncio.run(run()))


def drive_server(url: str, requests: list[BenchRequest], concurrency: int, procs: int) -> dict:
    """Every request through the server; seconds from the first client's start to the last stream's end."""
    ctx = mp.get_context("spawn")
    results_queue = ctx.Queue()
    procs = max(1, min(procs, concurrency))
    ready = ctx.Barrier(procs + 1)
    shares = [[(i, r) for i, r in enumerate(requests) if i % procs == p] for p in range(procs)]
    per_proc = [concurrency // procs + (p < concurrency % procs) for p in range(procs)]
    workers = [ctx.Process(target=client_proc, args=(url, share, n, ready, results_queue))
               for share, n in zip(shares, per_proc)]
    for w in workers:
        w.start()
    ready.wait(timeout=120)
    tokens, starts, ends = [0] * len(requests), [], []
    while len(ends) < len(workers):
        try:
            results, start, end = results_queue.get(timeout=5)
        except queue_mod.Empty:
            if any(w.exitcode not in (None, 0) for w in workers):
                sys.exit("a client process failed")
            continue
        starts.append(start)
        ends.append(end)
        for i, t in results:
            tokens[i] = t
    for w in workers:
        w.join()
    if max(starts) - min(starts) > 0.5:
        print(f"warning: the client processes started {max(starts) - min(starts):.1f} s apart")
    return {"seconds": max(ends) - min(starts), "tokens": tokens}


async def warm_up(url: str, requests: list[BenchRequest]) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=None) as client:
        await asyncio.gather(*(stream_one(client, BenchRequest(None, r.prompt_token_ids, 8)) for r in requests))


def run_offline(args: argparse.Namespace, requests: list[BenchRequest], tmp: Path) -> dict:
    result = tmp / "offline.json"
    proc = mp.get_context("spawn").Process(target=offline, args=(args, requests, str(result)))
    proc.start()
    proc.join(OFFLINE_LIMIT_S)
    if proc.is_alive():
        proc.kill()
        proc.join()
    if not result.exists():
        sys.exit(f"the offline run failed (exit code {proc.exitcode})")
    return json.loads(result.read_text())


def run_server(args: argparse.Namespace, requests: list[BenchRequest]) -> dict:
    server, url = spawn_server(*serve_args(args), timeout_s=SERVER_START_LIMIT_S)
    try:
        asyncio.run(warm_up(url, requests[:4]))
        return drive_server(url, requests, args.concurrency, args.client_procs)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            server.kill()


def row(name: str, requests: list[BenchRequest], result: dict) -> dict:
    tokens = result["tokens"]
    wrong = sum(1 for t, r in zip(tokens, requests) if t != r.output_len)
    done = sum(t for t in tokens if t > 0)
    rates = throughput(result["seconds"], len(requests) - wrong, 0, done)
    return {"path": name, "requests": len(requests), "seconds": result["seconds"], "output_tokens": done,
            "output_tokens_per_s": rates.output_tokens_per_s, "wrong_or_failed": wrong}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="benchmarks/configs/llama3-8b", help="model dir or .gguf ('' = embedded)")
    ap.add_argument("--load-format", default="dummy")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--max-num-seqs", type=int, default=None, help="default: the engine's")
    ap.add_argument("--max-num-batched-tokens", type=int, default=None)
    ap.add_argument("--gpu-memory-util", type=float, default=0.9)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=None,
                    help="the server's engine in a process of its own (default: on a GPU)")
    ap.add_argument("--requests-file", help="requests saved by offline_throughput.py --save-requests")
    ap.add_argument("--num-prompts", type=int, default=1000)
    ap.add_argument("--max-output-len", type=int, default=None, help="cap output lengths (smoke runs only)")
    ap.add_argument("--concurrency", type=int, default=256, help="streams open at once")
    ap.add_argument("--client-procs", type=int, default=4, help="processes the clients are spread over")
    ap.add_argument("--output-json")
    args = ap.parse_args()
    args.model = args.model or None

    from offline_throughput import workload_requests  # this directory's script: the same ShareGPT sampling

    requests = workload_requests(args.requests_file, args.num_prompts, 0, args.max_output_len)

    with tempfile.TemporaryDirectory(prefix="gllm-server-overhead-") as tmp:
        off = row("offline LLM.generate", requests, run_offline(args, requests, Path(tmp)))
    engine = "engine process" if uses_engine_process(args) else "engine thread"
    on = row(f"gllm serve ({engine}), {args.concurrency} SSE streams", requests, run_server(args, requests))
    ratio = on["output_tokens_per_s"] / off["output_tokens_per_s"]

    table = Table(title=f"{len(requests)} requests, {sum(r.output_len for r in requests):,} output tokens")
    for col in ("path", "seconds", "output tokens", "output tok/s", "wrong or failed"):
        table.add_column(col, justify="left" if col == "path" else "right")
    for r in (off, on):
        table.add_row(r["path"], f"{r['seconds']:.1f}", f"{r['output_tokens']:,}", f"{r['output_tokens_per_s']:,.0f}",
                      str(r["wrong_or_failed"]))
    Console(width=None if sys.stdout.isatty() else 120).print(table)
    print(f"the server keeps {ratio:.1%} of the offline output throughput")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps({"offline": off, "server": on, "ratio": ratio}, indent=1))


if __name__ == "__main__":
    main()
