"""Offline throughput on ShareGPT: gLLM beside transformers' continuous batching, same requests, same run.

Requests: 1,000 ShareGPT conversations sampled and filtered by `gllm_cli.datasets` (seed 0),
tokenized with the embedded SmolLM2 tokenizer (its ids are valid for any larger vocabulary),
ignore_eos. Each engine runs in its own process so GPU memory is freed between them; the
transformers baseline uses `attn_implementation="paged|sdpa"` and its continuous-batching
manager with each request's own `max_new_tokens`.

    python benchmarks/offline_throughput.py --config benchmarks/configs/llama3-8b            # GPU
    python benchmarks/offline_throughput.py --save-requests reqs.json                        # tokenize only
    python benchmarks/offline_throughput.py --config DIR --device cpu --dtype float32 --num-prompts 8 --max-output-len 8
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from gllm_cli.datasets import BenchRequest, load_requests, read_sharegpt, sample_sharegpt, save_requests

TRANSFORMERS_H100_REFERENCE = "transformers 5.17 measured earlier on an H100: 2.65 req/s, 1,191 total tok/s"


def sharegpt_requests(num: int, seed: int) -> list[BenchRequest]:
    from gllm_engine.loader.default_model import default_model_path
    from gllm_engine.loader.tokenizer import load_tokenizer

    data = read_sharegpt()
    print(f"ShareGPT: {len(data.records)} complete records read" + (" (file truncated)" if data.truncated else ""))
    return sample_sharegpt(data.records, load_tokenizer(default_model_path()), num, seed=seed)


def run_gllm(args: argparse.Namespace, requests: list[BenchRequest], results: mp.Queue) -> None:
    from gllm_engine import LLM, SamplingParams

    llm = LLM(args.config, load_format="dummy", dtype=args.dtype, device=args.device, skip_tokenizer_init=True,
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              enforce_eager=args.enforce_eager, show_progress=False)
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
    params = [SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True) for r in requests]
    llm.generate(prompts[:2], params[:2])  # warm-up: kernels compiled outside the timing
    _sync(args.device)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=True)
    _sync(args.device)
    elapsed = time.perf_counter() - start
    results.put(dict(engine="gLLM", requests=len(requests), seconds=elapsed,
                     output_tokens=sum(len(o.outputs[0].token_ids) for o in outs),
                     input_tokens=sum(len(r.prompt_token_ids) for r in requests)))


def run_transformers(args: argparse.Namespace, requests: list[BenchRequest], results: mp.Queue) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    device = "cuda" if args.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}.get(args.dtype,
                                                                                                  torch.bfloat16)
    config = AutoConfig.from_pretrained(args.config)
    attn = "paged|sdpa"
    with torch.device(device):  # random init on the device: on the CPU an 8B init takes minutes
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn).eval()
    gen = GenerationConfig(do_sample=False, max_new_tokens=max(r.output_len for r in requests), eos_token_id=-1,
                           pad_token_id=0)
    from transformers.generation.continuous_batching.utils import WorkloadHints

    # Size the manager for this workload, as generate_batch does.
    hints = WorkloadHints(max_prompt_length=max(len(r.prompt_token_ids) for r in requests),
                          max_generated_length=gen.max_new_tokens, num_requests=len(requests))
    t0 = time.perf_counter()
    with model.continuous_batching_context_manager(generation_config=gen, workload_hints=hints) as manager:
        print(f"transformers: manager ready after {time.perf_counter() - t0:.1f} s", flush=True)
        warm = manager.add_request(requests[0].prompt_token_ids, request_id="warmup", max_new_tokens=2)
        _wait_all(manager, {warm})
        _sync(device)
        start = time.perf_counter()
        ids = {manager.add_request(r.prompt_token_ids, request_id=str(i), max_new_tokens=r.output_len)
               for i, r in enumerate(requests)}
        generated = _wait_all(manager, ids)
        _sync(device)
        elapsed = time.perf_counter() - start
    results.put(dict(engine=f"transformers ({attn})", requests=len(requests), seconds=elapsed,
                     output_tokens=generated, input_tokens=sum(len(r.prompt_token_ids) for r in requests)))


def _wait_all(manager, ids: set[str]) -> int:
    """Block until every request in `ids` finished; returns the tokens they generated."""
    pending, generated = set(ids), 0
    start = last_report = time.perf_counter()
    while pending:
        if time.perf_counter() - last_report > 30:
            last_report = time.perf_counter()
            done = len(ids) - len(pending)
            print(f"transformers: {done}/{len(ids)} done after {last_report - start:.0f} s", flush=True)
        out = manager.get_result(timeout=1.0)
        if out is None:
            continue
        if out.error:
            raise RuntimeError(f"transformers request {out.request_id} failed: {out.error}")
        if out.request_id in pending and out.is_finished():
            pending.discard(out.request_id)
            generated += len(out.generated_tokens)
    return generated


def _sync(device: str) -> None:
    import torch

    if device != "cpu" and torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="benchmarks/configs/llama3-8b", help="model dir (config.json; dummy weights)")
    ap.add_argument("--num-prompts", type=int, default=1000)
    ap.add_argument("--num-prompts-transformers", type=int, default=None,
                    help="run the transformers baseline on the first N requests only (default: all)")
    ap.add_argument("--engines", default="gllm,transformers")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--max-output-len", type=int, default=None, help="cap output lengths (smoke runs only)")
    ap.add_argument("--requests-file", help="pre-sampled requests (from --save-requests) instead of ShareGPT")
    ap.add_argument("--save-requests", help="sample and tokenize, write the requests to this file, and exit")
    ap.add_argument("--output-json")
    args = ap.parse_args()

    requests = load_requests(args.requests_file) if args.requests_file else sharegpt_requests(args.num_prompts,
                                                                                               args.seed)
    requests = requests[: args.num_prompts]
    if args.max_output_len:
        for r in requests:
            r.output_len = min(r.output_len, args.max_output_len)
    if args.save_requests:
        save_requests(requests, args.save_requests)
        print(f"wrote {len(requests)} requests to {args.save_requests}")
        return

    ctx = mp.get_context("spawn")
    rows = []
    for engine in args.engines.split(","):
        target, subset = {"gllm": (run_gllm, requests),
                          "transformers": (run_transformers, requests[: args.num_prompts_transformers])}[engine]
        queue = ctx.Queue()
        proc = ctx.Process(target=target, args=(args, subset, queue))
        proc.start()
        proc.join()
        if proc.exitcode != 0:
            raise SystemExit(f"{engine} run failed (exit code {proc.exitcode})")
        rows.append(queue.get())
        r = rows[-1]
        print(f"{r['engine']}: {r['requests']} requests in {r['seconds']:.1f} s, {r['output_tokens']} output tokens",
              flush=True)

    baseline = next((r for r in rows if r["engine"].startswith("transformers")), None)
    table = Table(title=f"Offline throughput, ShareGPT, {Path(args.config).name} ({args.dtype}, dummy weights)")
    for col in ("engine", "requests", "seconds", "req/s", "output tok/s", "total tok/s", "vs transformers"):
        table.add_column(col, justify="right")
    for r in rows:
        r["requests_per_s"] = r["requests"] / r["seconds"]
        r["output_tokens_per_s"] = r["output_tokens"] / r["seconds"]
        r["total_tokens_per_s"] = (r["input_tokens"] + r["output_tokens"]) / r["seconds"]
    for r in rows:
        ratio = f"{r['total_tokens_per_s'] / baseline['total_tokens_per_s']:.1f}x" if baseline else "-"
        table.add_row(r["engine"], str(r["requests"]), f"{r['seconds']:.1f}", f"{r['requests_per_s']:.2f}",
                      f"{r['output_tokens_per_s']:.0f}", f"{r['total_tokens_per_s']:.0f}", ratio)
    Console().print(table)
    print(TRANSFORMERS_H100_REFERENCE)
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
