"""Cost of the HTTP path: `gllm serve` under N concurrent streams versus the offline engine, same requests.

Both run the same pre-sampled requests (token-id prompts, ignore_eos, each its own max_tokens):
first the offline `LLM` in a child process, then a `gllm serve` process driven by N concurrent
streaming clients (httpx, /v1/completions). Prints output tokens/s of each and their ratio.

    python benchmarks/server_overhead.py --model benchmarks/configs/llama3-8b --load-format dummy \\
        --requests-file .gpu/sharegpt1000.json --concurrency 256
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import time

import httpx
from rich.console import Console
from rich.table import Table

from gllm_cli.datasets import BenchRequest, load_requests, random_requests
from gllm_cli.serve import spawn_server


def offline(args: argparse.Namespace, requests: list[BenchRequest], out: mp.Queue) -> None:
    from gllm_engine import LLM, SamplingParams

    llm = LLM(args.model, load_format=args.load_format, dtype=args.dtype, device=args.device,
              skip_tokenizer_init=True, show_progress=False)
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
    params = [SamplingParams(temperature=0, max_tokens=r.output_len, ignore_eos=True) for r in requests]
    llm.generate(prompts[:2], params[:2])
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    out.put((elapsed, sum(len(o.outputs[0].token_ids) for o in outs)))


async def drive(url: str, requests: list[BenchRequest], concurrency: int) -> tuple[float, int, int]:
    """Fire every request with at most `concurrency` streams open; returns (seconds, tokens, failures)."""
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=limits) as client:
        async def one(r: BenchRequest) -> tuple[int, bool]:
            body = {"prompt": r.prompt_token_ids, "max_tokens": r.output_len, "temperature": 0, "ignore_eos": True,
                    "stream": True, "stream_options": {"include_usage": True}}
            async with sem, client.stream("POST", "/v1/completions", json=body) as resp:
                if resp.status_code != 200:
                    await resp.aread()
                    return 0, False
                tokens = 0
                async for line in resp.aiter_lines():
                    if line.startswith("data: {"):
                        usage = json.loads(line[6:]).get("usage")
                        if usage:
                            tokens = usage["completion_tokens"]
                return tokens, True

        await one(requests[0])  # warm-up
        start = time.perf_counter()
        results = await asyncio.gather(*(one(r) for r in requests))
        elapsed = time.perf_counter() - start
    return elapsed, sum(t for t, _ in results), sum(1 for _, ok in results if not ok)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--requests-file", help="requests saved by offline_throughput.py --save-requests")
    ap.add_argument("--num-prompts", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=256)
    args = ap.parse_args()
    requests = (load_requests(args.requests_file) if args.requests_file
                else random_requests(args.num_prompts, 64, 32, 0.5, vocab_size=32000))[: args.num_prompts]

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=offline, args=(args, requests, queue))
    proc.start()
    proc.join()
    off_s, off_tokens = queue.get()

    flags = ["--load-format", args.load_format, "--dtype", args.dtype, "--device", args.device]
    if args.model:
        flags.insert(0, args.model)
    server, url = spawn_server(*flags)
    try:
        on_s, on_tokens, failed = asyncio.run(drive(url, requests, args.concurrency))
    finally:
        server.terminate()
        server.wait(timeout=60)

    table = Table(title=f"{len(requests)} requests, {args.concurrency} concurrent streams")
    for col in ("path", "seconds", "output tokens", "output tok/s", "failed"):
        table.add_column(col, justify="right")
    table.add_row("offline LLM", f"{off_s:.1f}", str(off_tokens), f"{off_tokens / off_s:.0f}", "0")
    table.add_row("gllm serve (HTTP, SSE)", f"{on_s:.1f}", str(on_tokens), f"{on_tokens / on_s:.0f}", str(failed))
    Console().print(table)
    print(f"server keeps {on_tokens / on_s / (off_tokens / off_s):.1%} of offline output throughput")


if __name__ == "__main__":
    main()
