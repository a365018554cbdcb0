"""The single-GPU race in one call: three workloads beside transformers, the rooflines, a batch sweep.

Workloads (dummy weights, ignore_eos, each engine in a fresh process):
  sharegpt  the offline_throughput.py workload (1,000 ShareGPT requests) on --config (Llama-3-8B shapes)
  batch1    one request of 128 random prompt tokens, 256 generated, on --config
  uniform   256 requests, input and output lengths each uniform in 100-1,024, random ids (nano-vllm's
            benchmark), on --small-config (Qwen3-0.6B shapes)
  sweep     B requests of 128 prompt tokens, 256 generated, for each B of --sweep, on --config

With --also-kv-cache-dtype fp8 int8, gLLM runs ShareGPT, batch 1 and uniform again with each of those KV
caches (no sweep), in rows of their own beside the same transformers runs.

"vs transformers" compares each workload by the metric of its quoted peers: ShareGPT in total tok/s (vLLM's and
SGLang's figures), uniform in output tok/s (nano-vllm's bench.py divides the requests' max_tokens by the time).
A transformers run stopped at --transformers-timeout is said so under the table: its rates are over that window,
where its batch is usually still full, so a ratio against it is usually lower than against a complete run.

Ceilings are measured in the same run: a device-to-device copy (bytes read + written over time) and a
bf16 8192^3 matrix product. The compute roofline of a workload is that rate over 2 FLOP per parameter
per token; the batch-1 bound is the weight bytes over the copy bandwidth. Published peers are quoted
beside our numbers, not measured here. With --sharegpt-schedule (the ShareGPT requests' schedule, from
`decode_replay.py record`) ShareGPT's rows are also given as a share of that schedule's roofline
(`schedule_roofline.py`), per KV cache dtype: the bound its steps cannot beat at the measured ceilings.

    python benchmarks/single_gpu.py --requests-file .gpu/sharegpt1000.json --output-json out.json
    python benchmarks/single_gpu.py --config DIR --small-config DIR --device cpu --dtype float32 \\
        --num-prompts 4 --uniform-requests 4 --uniform-range 4 12 --batch1 8 8 --sweep 1 2 --max-output-len 4
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))  # this directory's scripts, also in spawned children

from offline_throughput import (  # noqa: E402
    STOP_GRACE_S,
    Row,
    add_gllm_arguments,
    dummy_gllm,
    run_isolated,
    run_transformers,
    timed_gllm,
    warmup_requests,
    workload_requests,
)
from schedule_roofline import bound_tokens_per_s, check_workload, model_params  # noqa: E402

from gllm_cli.datasets import BenchRequest, uniform_requests  # noqa: E402

# Figures quoted in issue 6 for the same workloads (not measured here).
PUBLISHED = {
    "sharegpt": "vLLM bench serve 1,000 ShareGPT, Llama-3.1-8B: 14,029 total tok/s; SGLang 2,000 prompts: "
                "24,023 (vLLM 0.6.3 on the same: 22,116); target >= 26,000",
    "batch1": "target >= 170 tok/s (90% of the H100's 188 tok/s weight-read bound)",
    "uniform": "nano-vllm and vLLM within 3% of each other; target >= 20x transformers",
}
# the metric "vs transformers" compares, per workload (the module docstring says why)
RATIO_METRIC = {"sharegpt": "total_tokens_per_s", "uniform": "output_tokens_per_s"}
MODELS = ("large", "small")
MATMUL_N = 8192
COPY_BYTES = 4 << 30


def measure_ceilings(args: argparse.Namespace, _requests: list[BenchRequest], report) -> None:
    """Copy bandwidth (bytes read + written per second) and bf16 matmul FLOP/s, medians of timed repeats."""
    import torch

    if args.device == "cpu" or not torch.cuda.is_available():
        report(dict(engine="ceilings", bandwidth=None, flops=None))
        return
    from triton.testing import do_bench

    src = torch.randn(COPY_BYTES // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    a, b = (torch.randn(MATMUL_N, MATMUL_N, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    mm_ms = do_bench(lambda: a @ b, warmup=100, rep=500, return_mode="median")
    report(dict(engine="ceilings", device=torch.cuda.get_device_name(), bandwidth=2 * COPY_BYTES / (copy_ms / 1e3),
                flops=2 * MATMUL_N**3 / (mm_ms / 1e3)))


def ceilings_or_measured(args: argparse.Namespace) -> tuple[float, float]:
    """(copy TB/s, matmul TFLOP/s): `args.bandwidth` and `args.tflops` where both are given, else measured
    by `measure_ceilings`; exits where there is no GPU to measure on."""
    if args.bandwidth is not None and args.tflops is not None:
        return args.bandwidth, args.tflops
    ceilings = {}
    measure_ceilings(args, [], ceilings.update)
    if ceilings["bandwidth"] is None:
        sys.exit("no GPU to measure ceilings on: give --bandwidth and --tflops")
    return ceilings["bandwidth"] / 1e12, ceilings["flops"] / 1e12


def _fixed_requests(batch: int, prompt_len: int, output_len: int, vocab: int, seed: int) -> list[BenchRequest]:
    """`batch` requests of `prompt_len` random ids (different per request: no prefix is shared)."""
    return [BenchRequest(None, [(seed + 7919 * i + 31 * j) % vocab for j in range(prompt_len)], output_len)
            for i in range(batch)]


def gllm_large(args: argparse.Namespace, requests: list[BenchRequest], report) -> None:
    """On --config: the ShareGPT workload, then batch 1, then the sweep; reports after each part."""
    llm = dummy_gllm(args, args.config)
    vocab = llm.engine.config.model.hf_config.vocab_size
    timed_gllm(llm, warmup_requests(requests), args.device)  # compile kernels outside the timing
    result: dict[str, Any] = dict(engine="gLLM", sharegpt=timed_gllm(llm, requests, args.device))
    report(result)
    prompt_len, output_len = args.batch1
    one = _fixed_requests(1, prompt_len, output_len, vocab, seed=1)
    # the prefill alone, on another prompt of the same length (the same one would hit the prefix cache)
    first_s = timed_gllm(llm, _fixed_requests(1, prompt_len, 1, vocab, seed=2), args.device)["seconds"]
    row = timed_gllm(llm, one, args.device)
    total_s, made = row["seconds"], row["output_tokens"]
    decode_s = total_s - first_s  # the time after the first token (None where noise swamps it)
    result["batch1"] = dict(seconds=total_s, prefill_seconds=first_s, output_tokens=made, tokens_per_s=made / total_s,
                            decode_tokens_per_s=(made - 1) / decode_s if made > 1 and decode_s > 0 else None)
    report(result)
    result["sweep"] = []
    for batch in args.sweep:
        row = timed_gllm(llm, _fixed_requests(batch, prompt_len, output_len, vocab, seed=batch), args.device)
        result["sweep"].append(dict(batch=batch, seconds=row["seconds"], output_tokens_per_s=row["output_tokens_per_s"],
                                    ms_per_step=1e3 * row["seconds"] / output_len))
        report(result)


def with_kv_cache_dtype(args: argparse.Namespace, kv_cache_dtype: str) -> argparse.Namespace:
    """`args` for a second gLLM run with another KV cache dtype, without the sweep."""
    other = copy.copy(args)
    other.kv_cache_dtype, other.sweep = kv_cache_dtype, []
    return other


def gllm_small(args: argparse.Namespace, requests: list[BenchRequest], report) -> None:
    """On --small-config: the uniform workload."""
    llm = dummy_gllm(args, args.small_config)
    timed_gllm(llm, warmup_requests(requests), args.device)
    report(timed_gllm(llm, requests, args.device))


def transformers_on(config_dir: str, args: argparse.Namespace) -> argparse.Namespace:
    """`args` for offline_throughput.run_transformers on another model."""
    other = copy.copy(args)
    other.config = config_dir
    return other


def _ratio(row: Row | None, base: Row | None, key: str = "total_tokens_per_s") -> str:
    if not row or not base or "error" in row or "error" in base or not base.get(key):
        return "-"
    return f"{row[key] / base[key]:.1f}x"


def _pct(value: float | None, bound: float | None) -> str:
    return f"{100 * value / bound:.0f}%" if value and bound else "-"


def print_report(report: dict[str, Any]) -> None:
    ceil = report["ceilings"]
    flops, bandwidth = ceil.get("flops"), ceil.get("bandwidth")
    roof = {name: flops / (2 * report["params"][name]) if flops else None for name in ("large", "small")}
    bound_b1 = bandwidth / report["weight_bytes"] if bandwidth else None
    table = Table(title=f"Single-GPU workloads ({report['device']}, {report['dtype']}, gLLM's KV cache "
                        f"{report.get('kv_cache_dtype', 'auto')}, {report.get('scheduling_policy', 'fcfs')} "
                        "admission, dummy weights)")
    for col in ("workload", "engine", "req/s", "output tok/s", "total tok/s", "vs transformers", "% of roofline"):
        table.add_column(col, justify="left" if col in ("workload", "engine") else "right")

    def add(workload: str, row: Row | None, base: Row | None, bound: float | None, engine: str = "gLLM") -> None:
        if not row or "error" in row:
            table.add_row(workload, f"{engine}: {(row or {}).get('error', 'not run')}", "-", "-", "-", "-", "-")
            return
        ratio = _ratio(row, base, RATIO_METRIC[workload]) if engine.startswith("gLLM") else "1.0x"
        table.add_row(workload, engine, f"{row['requests_per_s']:.2f}", f"{row['output_tokens_per_s']:,.0f}",
                      f"{row['total_tokens_per_s']:,.0f}", ratio, _pct(row["total_tokens_per_s"], bound))

    also = report.get("also_kv_cache_dtypes") or []
    partial = []
    for workload, model in (("sharegpt", "large"), ("uniform", "small")):
        if f"gllm_{model}" not in report:  # not among --models
            continue
        base = report[f"transformers_{model}"]
        runs = [("gLLM", report[f"gllm_{model}"])]
        runs += [(f"gLLM, KV cache {cache}", report[f"gllm_{model}_{cache}"]) for cache in also]
        for engine, run in runs:
            add(workload, run.get("sharegpt") if model == "large" else run, base, roof[model], engine=engine)
        add(workload, base, None, roof[model], engine=base.get("engine", "transformers"))
        if (base.get("note") or "").startswith("partial"):
            partial.append(f"  {workload}: transformers stopped at its time limit with {base['completed']} of "
                           f"{base['requests']} requests done; its rates are over those {base['seconds']:.0f} s")
    batch1_runs = [("gLLM", "gllm_large")] + [(f"gLLM, KV cache {cache}", f"gllm_large_{cache}") for cache in also]
    for engine, key in batch1_runs:
        b1 = report.get(key, {}).get("batch1")
        if b1:
            decode = b1["decode_tokens_per_s"]
            rate = f"{b1['tokens_per_s']:,.1f}" + (f" (decode {decode:,.1f})" if decode else "")
            table.add_row("batch1", engine, "-", rate, "-", "-", _pct(decode, bound_b1))
    console = Console(width=None if sys.stdout.isatty() else 140)
    console.print(table)
    for workload, text in PUBLISHED.items():
        print(f"  {workload}: {text}")
    print("  vs transformers: " + ", ".join(f"{w} in {k.removesuffix('_per_s').replace('_', ' ')}/s"
                                            for w, k in RATIO_METRIC.items()))
    for line in partial:
        print(line)
    for cache, bound in report.get("schedule_roofline", {}).items():
        run = report.get("gllm_large" if cache == report.get("kv_cache_dtype") else f"gllm_large_{cache}", {})
        measured = (run.get("sharegpt") or {}).get("total_tokens_per_s")
        print(f"  sharegpt: its schedule's roofline with KV cache {cache}: {bound:,.0f} total tok/s"
              + (f"; gLLM at {_pct(measured, bound)}" if measured else ""))
    sweep_rows = report.get("gllm_large", {}).get("sweep", [])
    prompt_len, output_len = report["batch1_shape"]
    sweep = Table(title=f"Latency vs batch ({prompt_len} prompt tokens, {output_len} generated; time includes the "
                        "prefill)")
    for col in ("batch", "seconds", "output tok/s", "ms per step"):
        sweep.add_column(col, justify="right")
    for r in sweep_rows:
        sweep.add_row(str(r["batch"]), f"{r['seconds']:.2f}", f"{r['output_tokens_per_s']:,.0f}",
                      f"{r['ms_per_step']:.2f}")
    if sweep_rows:
        console.print(sweep)
    if flops:
        print(f"ceilings: {bandwidth / 1e12:.2f} TB/s copy, {flops / 1e12:.0f} TFLOP/s bf16 matmul; compute "
              f"roofline {roof['large']:,.0f} tok/s ({Path(report['config']).name}), {roof['small']:,.0f} tok/s "
              f"({Path(report['small_config']).name}); batch-1 bound {bound_b1:,.0f} tok/s "
              f"({report['weight_bytes'] / 1e9:.2f} GB of weights per step)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="benchmarks/configs/llama3-8b")
    ap.add_argument("--small-config", default="benchmarks/configs/qwen3-0.6b")
    ap.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--requests-file", help="ShareGPT requests saved by offline_throughput.py --save-requests")
    ap.add_argument("--sharegpt-schedule", help="the ShareGPT requests' schedule (decode_replay.py record)")
    ap.add_argument("--num-prompts", type=int, default=1000)
    ap.add_argument("--num-prompts-transformers", type=int, default=200, help="ShareGPT requests for transformers")
    ap.add_argument("--uniform-requests", type=int, default=256)
    ap.add_argument("--uniform-range", type=int, nargs=2, default=[100, 1024], metavar=("LOW", "HIGH"))
    ap.add_argument("--batch1", type=int, nargs=2, default=[128, 256], metavar=("PROMPT", "OUTPUT"))
    ap.add_argument("--sweep", type=int, nargs="+", default=[1, 8, 32, 128, 256])
    add_gllm_arguments(ap)
    ap.add_argument("--max-output-len", type=int, default=None, help="cap ShareGPT/uniform outputs (smoke runs)")
    ap.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS),
                    help="large: ShareGPT, batch 1 and the sweep on --config; small: uniform on --small-config")
    ap.add_argument("--also-kv-cache-dtype", nargs="+", default=[], choices=("fp8", "int8"),
                    help="gLLM: run ShareGPT, batch 1 and uniform again with each of these KV cache dtypes")
    ap.add_argument("--transformers-timeout", type=float, default=120.0)
    ap.add_argument("--gllm-timeout", type=float, default=900.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output-json")
    args = ap.parse_args()

    sharegpt = (workload_requests(args.requests_file, args.num_prompts, args.seed, args.max_output_len)
                if "large" in args.models else [])
    recorded = (json.loads(Path(args.sharegpt_schedule).read_text())
                if args.sharegpt_schedule and "large" in args.models else None)
    if recorded:
        check_workload(recorded, sharegpt, "--sharegpt-schedule")
        recorded_policy = recorded["settings"].get("scheduling_policy", "fcfs")
        if recorded_policy != args.scheduling_policy:
            sys.exit(f"--sharegpt-schedule was recorded with --scheduling-policy {recorded_policy}; "
                     f"this run has {args.scheduling_policy}")
    small_vocab = json.loads((Path(args.small_config) / "config.json").read_text())["vocab_size"]
    uniform = uniform_requests(args.uniform_requests, *args.uniform_range, vocab_size=small_vocab, seed=args.seed)
    if args.max_output_len:
        for r in uniform:
            r.output_len = min(r.output_len, args.max_output_len)
    params = {"large": model_params(args.config), "small": model_params(args.small_config)}
    itemsize = 4 if args.dtype == "float32" else 2
    report: dict[str, Any] = dict(device=args.device, dtype=args.dtype, kv_cache_dtype=args.kv_cache_dtype,
                                  scheduling_policy=args.scheduling_policy,
                                  also_kv_cache_dtypes=args.also_kv_cache_dtype, config=args.config,
                                  small_config=args.small_config, params=params,
                                  weight_bytes=params["large"] * itemsize, batch1_shape=args.batch1)
    gllm_limit, hf_limit = args.gllm_timeout + STOP_GRACE_S, args.transformers_timeout + STOP_GRACE_S
    steps = [("ceilings", None, "ceilings", measure_ceilings, args, [], 600.0),
             ("gllm_large", "large", "gLLM", gllm_large, args, sharegpt, gllm_limit),
             ("transformers_large", "large", "transformers", run_transformers, transformers_on(args.config, args),
              sharegpt[: args.num_prompts_transformers], hf_limit),
             ("gllm_small", "small", "gLLM", gllm_small, args, uniform, gllm_limit),
             ("transformers_small", "small", "transformers", run_transformers,
              transformers_on(args.small_config, args), uniform, hf_limit)]
    for cache in args.also_kv_cache_dtype:
        other = with_kv_cache_dtype(args, cache)
        steps += [(f"gllm_large_{cache}", "large", "gLLM", gllm_large, other, sharegpt, gllm_limit),
                  (f"gllm_small_{cache}", "small", "gLLM", gllm_small, other, uniform, gllm_limit)]
    steps = [step for step in steps if step[1] in (None, *args.models)]
    for key, _model, name, runner, run_args, requests, limit in steps:
        print(f"{key}: running", flush=True)
        report[key] = run_isolated(name, runner, run_args, requests, limit)
        print(f"{key}: {json.dumps(report[key])[:300]}", flush=True)
        if args.output_json:
            Path(args.output_json).write_text(json.dumps(report, indent=2))
    ceilings = report["ceilings"]
    if ceilings.get("device"):
        report["device"] = ceilings["device"]
    if recorded and ceilings.get("flops"):
        report["schedule_roofline"] = {
            cache: bound_tokens_per_s(recorded, args.config, cache, ceilings["bandwidth"], ceilings["flops"])
            for cache in (args.kv_cache_dtype, *args.also_kv_cache_dtype)}
    print_report(report)
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
