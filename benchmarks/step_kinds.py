"""Where an offline run's time goes, by kind of step: decode only (by batch size), or with prefill chunks (by
its tokens).

    python benchmarks/step_kinds.py --requests-file .gpu/sharegpt1000.json [--max-num-seqs N] [--enforce-eager]

Runs the ShareGPT workload of offline_throughput.py (gLLM, dummy weights, greedy, ignore_eos) through
the engine core one step at a time. Each step's wall time is charged to the batch collected in it:
with a batch in flight, a step waits for the previous batch, launches the next and then processes
the collected one, so its time is the collected batch's GPU time plus what the host adds. Batches with
prefill chunks are classified by their tokens in all (decodes included); up to the CUDA-graph limit
(1,024 tokens, at most 16 chunks) they replay graphs. A table
per kind gives steps, total seconds, median / p90 / max milliseconds and mean tokens, plus the
slowest steps (a long one usually means a kernel compiled mid-run).

With `--schedule` (the same requests' schedule from `decode_replay.py record`) the table also gives each
decode bucket's bound from `schedule_roofline.py` and the share of it the run reached (bound / measured),
and a line does the same for the steps with prefill chunks and for the whole run. Ceilings come from
`--bandwidth` and `--tflops`, else are measured as `single_gpu.py` measures them.

    python benchmarks/step_kinds.py --requests-file .gpu/sharegpt1000.json --schedule .gpu/schedule.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict, deque
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))

from offline_throughput import add_gllm_arguments, dummy_gllm, sync_device, warmup_requests, workload_requests  # noqa: E402
from schedule_roofline import (  # noqa: E402
    DECODE_BUCKETS,
    Bound,
    DenseShapes,
    check_workload,
    decode_bucket,
    schedule_bound,
)

from gllm_cli.datasets import BenchRequest  # noqa: E402

PREFILL_KINDS = ("prefill <= 512", "prefill <= 1024", "prefill > 1024")
KINDS = (*DECODE_BUCKETS, *PREFILL_KINDS)


def kind_of(num_tokens: int, num_decodes: int, num_seqs: int) -> str:
    if num_decodes == num_seqs:
        return decode_bucket(num_seqs)
    return "prefill <= 512" if num_tokens <= 512 else "prefill <= 1024" if num_tokens <= 1024 else "prefill > 1024"


def run(args: argparse.Namespace, requests: list[BenchRequest]) -> dict[str, list[tuple[float, int]]]:
    """Per kind: (milliseconds, tokens) of every step of the workload."""
    from gllm_engine import SamplingParams

    llm = dummy_gllm(args, args.config)
    llm.generate([{"prompt_token_ids": r.prompt_token_ids} for r in warmup_requests(requests)],
                 SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    core = llm.engine
    for i, r in enumerate(requests):
        core.add_request(str(i), r.prompt_token_ids,
                         SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True))
    launched: deque[tuple[str, int]] = deque()  # kinds of the batches in flight, oldest first
    collected: list[tuple[str, int]] = []
    schedule, collect = core.scheduler.schedule, core.executor.collect

    def scheduled():
        out = schedule()
        if not out.is_empty:
            launched.append((kind_of(out.num_tokens, out.num_decodes, len(out.scheduled)), out.num_tokens))
        return out

    def collecting():
        collected.append(launched.popleft())
        return collect()

    core.scheduler.schedule, core.executor.collect = scheduled, collecting
    times: dict[str, list[tuple[float, int]]] = defaultdict(list)
    sync_device(args.device)
    start = time.perf_counter()
    while core.has_unfinished_requests():
        collected.clear()
        t = time.perf_counter()
        core.step()
        ms = (time.perf_counter() - t) * 1e3
        for kind, tokens in collected:
            times[kind].append((ms / len(collected), tokens))
    sync_device(args.device)
    total_s = time.perf_counter() - start
    tokens = sum(len(r.prompt_token_ids) + r.output_len for r in requests)
    print(f"{len(requests)} requests in {total_s:.1f} s ({tokens / total_s:,.0f} total tok/s)")
    return times


def schedule_bounds(args: argparse.Namespace, requests: list[BenchRequest]) -> dict[str, Bound] | None:
    """`schedule_roofline.schedule_bound` of `--schedule` at the given or measured ceilings; None without one."""
    if not args.schedule:
        return None
    recorded = json.loads(Path(args.schedule).read_text())
    check_workload(recorded, requests, "--schedule")
    from single_gpu import ceilings_or_measured

    bandwidth, flops = ceilings_or_measured(args)
    print(f"ceilings: {bandwidth:.2f} TB/s, {flops:.0f} TFLOP/s")
    shapes = DenseShapes.from_config(args.config, args.kv_cache_dtype)
    return schedule_bound(recorded["steps"], shapes, bandwidth * 1e12, flops * 1e12)


def print_tables(times: dict[str, list[tuple[float, int]]], bounds: dict[str, Bound] | None = None) -> None:
    console = Console(highlight=False)
    table = Table(title="Steps by kind")
    columns = ["kind", "steps", "total s", "median ms", "p90 ms", "max ms", "mean tokens"]
    if bounds:
        columns += ["bound steps", "bound s", "of bound"]
    for col in (*columns, "slowest (ms, tokens)"):
        table.add_column(col, justify="left" if col in ("kind", "slowest (ms, tokens)") else "right")
    for kind in KINDS:
        rows = times.get(kind)
        if not rows:
            continue
        ms = sorted(m for m, _ in rows)
        slowest = ", ".join(f"{m:.0f} ({n})" for m, n in sorted(rows, reverse=True)[:3])
        cells = [kind, str(len(rows)), f"{sum(ms) / 1e3:.2f}", f"{statistics.median(ms):.2f}",
                 f"{ms[int(0.9 * (len(ms) - 1))]:.2f}", f"{ms[-1]:.1f}", f"{sum(n for _, n in rows) / len(rows):.0f}"]
        if bounds:
            bound = bounds.get(kind)
            cells += ([f"{bound.steps}", f"{bound.seconds:.2f}", f"{bound.seconds / (sum(ms) / 1e3):.0%}"]
                      if bound else ["", "", ""])
        table.add_row(*cells, slowest)
    console.print(table)
    if bounds:
        def measured_s(kinds) -> float:
            return sum(m for kind in kinds for m, _ in times.get(kind, ())) / 1e3

        for name, kinds in (("with prefill", PREFILL_KINDS), ("all", KINDS)):
            bound = bounds.get(name, Bound())
            console.print(f"{name}: {measured_s(kinds):.2f} s measured, {bound.seconds:.2f} s bound "
                          f"({bound.seconds / max(measured_s(kinds), 1e-9):.0%} of it reached)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="benchmarks/configs/llama3-8b", help="model dir (config.json; dummy weights)")
    ap.add_argument("--requests-file", help="pre-sampled requests (offline_throughput.py --save-requests)")
    ap.add_argument("--num-prompts", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    add_gllm_arguments(ap)
    ap.add_argument("--max-output-len", type=int, default=None, help="cap output lengths (smoke runs only)")
    ap.add_argument("--schedule", help="the same requests' schedule (decode_replay.py record): bounds per kind")
    ap.add_argument("--bandwidth", type=float, help="with --schedule: copy bandwidth, TB/s (default: measured)")
    ap.add_argument("--tflops", type=float, help="with --schedule: bf16 matmul rate, TFLOP/s (default: measured)")
    args = ap.parse_args()
    requests = workload_requests(args.requests_file, args.num_prompts, args.seed, args.max_output_len)
    bounds = schedule_bounds(args, requests)  # before the engine: measuring the ceilings needs GPU memory
    print_tables(run(args, requests), bounds)


if __name__ == "__main__":
    main()
