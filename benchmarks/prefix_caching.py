"""Shared-prefix workload with prefix caching on and off: TTFT and throughput, one table.

N requests share one long system prompt and each adds a different short question (random token
ids, so any model works, dummy weights included). All arrive at once; TTFT is measured from the
start of the run to each request's first generated token.

    python benchmarks/prefix_caching.py --model benchmarks/configs/llama3-8b --load-format dummy
    python benchmarks/prefix_caching.py --device cpu --requests 16 --system-len 512 --question-len 32
"""

from __future__ import annotations

import argparse
import gc
import random
import time

import torch
from rich.console import Console
from rich.table import Table

from gllm_cli.metrics import summarize, throughput
from gllm_engine import LLM, SamplingParams


def shared_prefix_prompts(num: int, system_len: int, question_len: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    system = [rng.randrange(3, vocab) for _ in range(system_len)]
    return [system + [rng.randrange(3, vocab) for _ in range(question_len)] for _ in range(num)]


def run(llm: LLM, prompts: list[list[int]], output_len: int) -> dict:
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    start = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
    first: dict[str, float] = {}
    generated = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id not in first and out.outputs[0].token_ids:
                first[out.request_id] = time.perf_counter() - start
            if out.finished:
                generated += len(out.outputs[0].token_ids)
    duration = time.perf_counter() - start
    ttft = summarize(list(first.values()))
    rates = throughput(duration, len(prompts), sum(map(len, prompts)), generated)
    stats = engine.stats()
    return dict(duration=duration, ttft_mean=ttft["mean"], ttft_median=ttft["median"], ttft_p90=ttft["p90"],
                requests_per_s=rates.requests_per_s, total_tokens_per_s=rates.total_tokens_per_s,
                hit_rate=stats.prefix_cache_hits / max(1, stats.prefix_cache_queries))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model path (default: the embedded SmolLM2)")
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--system-len", type=int, default=1500)
    ap.add_argument("--question-len", type=int, default=100)
    ap.add_argument("--output-len", type=int, default=32)
    args = ap.parse_args()

    table = Table(title=f"{args.requests} requests: {args.system_len}-token shared prefix + {args.question_len}-token "
                        f"question, {args.output_len} generated")
    for col in ("prefix caching", "duration s", "TTFT mean s", "TTFT median s", "TTFT p90 s", "req/s",
                "total tok/s", "hit rate"):
        table.add_column(col, justify="right")
    results = {}
    for caching in (False, True):
        llm = LLM(args.model, load_format=args.load_format, device=args.device, dtype=args.dtype,
                  enable_prefix_caching=caching, skip_tokenizer_init=True, show_progress=False)
        vocab = llm.config.model.hf_config.vocab_size
        prompts = shared_prefix_prompts(args.requests, args.system_len, args.question_len, vocab)
        # Warm-up on another prefix, so the measured one starts uncached either way.
        run(llm, shared_prefix_prompts(2, args.system_len, args.question_len, vocab, seed=1), 2)
        r = results[caching] = run(llm, prompts, args.output_len)
        table.add_row("on" if caching else "off", f"{r['duration']:.2f}", f"{r['ttft_mean']:.3f}",
                      f"{r['ttft_median']:.3f}", f"{r['ttft_p90']:.3f}", f"{r['requests_per_s']:.2f}",
                      f"{r['total_tokens_per_s']:.0f}", f"{r['hit_rate']:.1%}")
        llm.engine.shutdown()
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    Console().print(table)
    on, off = results[True], results[False]
    Console().print(f"caching on vs off: throughput x{on['requests_per_s'] / off['requests_per_s']:.2f}, "
                    f"mean TTFT x{off['ttft_mean'] / on['ttft_mean']:.2f} lower")


if __name__ == "__main__":
    main()
