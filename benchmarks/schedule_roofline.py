"""The roofline of a recorded schedule: the fewest seconds its steps can take on a GPU of given ceilings.

A workload's compute roofline (2 FLOP per parameter per token over the matmul rate) ignores that an
offline run is a sequence of steps, and that a step of few tokens still streams every weight. This
script walks the steps of a schedule that `decode_replay.py record` saved and bounds each step by
its two phases, which run one after the other:

  linear layers  max(weight bytes / bandwidth, 2 x parameters x tokens / matmul rate); the LM head
                 only for the rows that sample, the embedding table not streamed;
  attention      max(KV bytes / bandwidth, FLOPs / matmul rate): each sequence reads its context
                 once per layer (K and V), and its new tokens attend causally to it.

Elementwise kernels, sampling and the host are left out, so a real run can only be slower. Ceilings
are the measured ones that `single_gpu.py` prints (a device-to-device copy, a bf16 8192^3 matmul).

With `--matmul-costs` (what `matmul_rows.py --output-json` measured on that GPU) an estimate joins the
bound: not a limit but a model of the engine's kernels, to weigh schedules without a GPU. Each step
costs its projections at the measured time per call for its rows (interpolated; beyond the largest row
count measured, the larger of that time and the FLOPs at the matmul rate), the LM head for its sampling
rows, attention as in the bound but with KV read at `--attention-tb-s`, the elementwise kernels'
traffic (two RMSNorms with the residual, SiLU-and-mul, rotary and the KV-cache store) at the copy
bandwidth, and `--step-overhead-ms` for what does not scale with the batch; its line gives the seconds
of each of those parts over the schedule. With `--graph-padding` the projections and elementwise
kernels run the rows of the CUDA graph the engine would replay (its capture sizes for the schedule's
`max_num_seqs` and token budget, less those a larger one beats by the measured projections, as
`runner/cuda_graph.py` drops them by timing its graphs); larger steps, and mixed steps of more prefill
chunks than a graph holds, run unpadded.

    python benchmarks/decode_replay.py record --requests-file .gpu/sharegpt1000.json --out schedule.json
    python benchmarks/schedule_roofline.py schedule.json --config benchmarks/configs/llama3-8b \\
        --bandwidth 3.05 --tflops 693 --measured-tok-s 24000 [--matmul-costs matmul_rows.json [--graph-padding]]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

BUCKETS = ((1, 16), (17, 63), (64, 127), (128, 255), (256, 511), (512, 1024))  # decode batch sizes, inclusive
ESTIMATE_PARTS = ("projections", "LM head", "attention", "elementwise", "step overhead")
KV_BYTES = {"auto": 2.0, "fp8": 1.0}  # bytes a cached value (bf16 model); int8 adds a float32 scale per head


def model_params(config_dir: str) -> int:
    """Parameters of the model at `config_dir` (a tied LM head counted once), counted on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir))
    return sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class DenseShapes:
    """What a dense decoder's step streams and computes, from its HF config."""

    body_params: int  # every weight but the embedding table and the LM head
    head_params: int
    layers: int
    q_width: int  # query heads x head dim
    kv_token_bytes: float  # K and V of one token, all layers
    weight_bytes: int  # bytes a parameter

    @classmethod
    def from_config(cls, config_dir: str, kv_cache_dtype: str = "auto") -> DenseShapes:
        from transformers import AutoConfig

        hf = AutoConfig.from_pretrained(config_dir)
        total = model_params(config_dir)
        table = hf.vocab_size * hf.hidden_size
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        per_head = head_dim * KV_BYTES[kv_cache_dtype] if kv_cache_dtype in KV_BYTES else head_dim + 4  # int8
        return cls(body_params=total - table * (1 if hf.tie_word_embeddings else 2), head_params=table,
                   layers=hf.num_hidden_layers, q_width=hf.num_attention_heads * head_dim,
                   kv_token_bytes=2 * hf.num_hidden_layers * hf.num_key_value_heads * per_head, weight_bytes=2)


@dataclass
class Bound:
    """Seconds and tokens of a group of steps (and, with measured costs, their estimate)."""

    steps: int = 0
    tokens: int = 0
    linear_s: float = 0.0
    attention_s: float = 0.0
    estimate_parts: dict[str, float] = field(default_factory=dict)  # ESTIMATE_PARTS -> seconds

    @property
    def seconds(self) -> float:
        return self.linear_s + self.attention_s

    @property
    def estimate_s(self) -> float:
        return sum(self.estimate_parts.values())

    def add(self, other: Bound) -> None:
        self.steps += other.steps
        self.tokens += other.tokens
        self.linear_s += other.linear_s
        self.attention_s += other.attention_s
        for part, seconds in other.estimate_parts.items():
            self.estimate_parts[part] = self.estimate_parts.get(part, 0.0) + seconds


def step_bound(seqs: list[list[int]], shapes: DenseShapes, bandwidth: float, flops: float) -> Bound:
    """The bound of one step: `seqs` holds `[start, num_new_tokens]` per sequence. Each sequence's last
    row counts as sampling (a chunk short of its prompt's end does not: a slight overcount of the LM head)."""
    tokens = sum(n for _, n in seqs)
    linear = max((shapes.body_params + shapes.head_params) * shapes.weight_bytes / bandwidth,
                 2 * (shapes.body_params * tokens + shapes.head_params * len(seqs)) / flops)
    return Bound(1, tokens, linear, attention_s(seqs, shapes, bandwidth, flops))


def attention_s(seqs: list[list[int]], shapes: DenseShapes, bandwidth: float, flops: float) -> float:
    """A step's attention at least: each sequence reads its context's K and V once per layer, or its FLOPs."""
    kv_bytes = sum(start + n for start, n in seqs) * shapes.kv_token_bytes
    # QK^T and PV: 2 x 2 FLOP per query width per (query, key) pair; causal within the new tokens
    pairs = sum(n * start + n * (n + 1) / 2 for start, n in seqs)
    return max(kv_bytes / bandwidth, 4 * shapes.layers * shapes.q_width * pairs / flops)


@dataclass(frozen=True)
class MeasuredCosts:
    """Per-call matmul times on one GPU (`matmul_rows.py --output-json`) and the rates of the other kernels."""

    rows: list[int]
    matmul_us: dict[str, list[float]]  # qkv, o, gate_up, down, lm_head: µs per call at each of `rows`
    shapes: dict[str, tuple[int, int]]  # (out, in) features of each
    attention_bandwidth: float  # bytes/s decode attention reads the KV cache at
    step_overhead_s: float
    # mixed (has prefill chunks) -> the sizes of the engine's CUDA graphs, ascending
    graph_sizes: dict[bool, list[int]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str, attention_bandwidth: float, step_overhead_s: float) -> MeasuredCosts:
        saved = json.loads(Path(path).read_text())
        order = np.argsort(saved["rows"])  # np.interp needs them increasing
        return cls([saved["rows"][i] for i in order], {k: [v[i] for i in order] for k, v in saved["us"].items()},
                   {k: tuple(v) for k, v in saved["shapes"].items()}, attention_bandwidth, step_overhead_s)

    def matmul_s(self, name: str, rows: int, flops: float) -> float:
        if rows <= 0:
            return 0.0
        us = self.matmul_us[name]
        if rows <= self.rows[-1]:
            return float(np.interp(rows, self.rows, us)) * 1e-6
        out_features, in_features = self.shapes[name]
        return max(us[-1] * 1e-6, 2 * rows * out_features * in_features / flops)

    def layer_s(self, rows: int, flops: float) -> float:
        """Seconds of one decoder layer's four projections (qkv, o, gate_up, down) at `rows` rows."""
        return sum(self.matmul_s(name, rows, flops) for name in ("qkv", "o", "gate_up", "down"))

    def with_graphs(self, max_num_seqs: int, max_num_batched_tokens: int, flops: float) -> MeasuredCosts:
        """These costs with steps padded to the CUDA graphs an engine of these limits keeps: its capture sizes
        less those `kept_sizes` drops by the measured time of a layer's projections."""
        from gllm_engine.runner.cuda_graph import MAX_GRAPH_TOKENS, capture_sizes, kept_sizes

        def kept(sizes: list[int]) -> list[int]:
            return kept_sizes({s: self.layer_s(s, flops) for s in sizes})
        mixed_tokens = min(MAX_GRAPH_TOKENS, max_num_batched_tokens)
        sizes = {False: kept(capture_sizes(max_num_seqs))}
        if mixed_tokens >= 16:
            sizes[True] = kept(capture_sizes(mixed_tokens, min_size=16))
        return replace(self, graph_sizes=sizes)

    def step_rows(self, tokens: int, prefill_chunks: int) -> int:
        """The rows a step of `tokens` with `prefill_chunks` prefill chunks runs its projections at: those of the
        graph it would replay, else its own."""
        from gllm_engine.runner.cuda_graph import MAX_GRAPH_PREFILLS

        if prefill_chunks > MAX_GRAPH_PREFILLS:
            return tokens
        return next((s for s in self.graph_sizes.get(prefill_chunks > 0, []) if s >= tokens), tokens)

    def elementwise_token_bytes(self, layers: int, activation_bytes: int = 2) -> float:
        """Bytes a token moves through a layer's elementwise kernels, all layers: two RMSNorms with the
        residual add (read x and residual, write both), SiLU-and-mul (read gate and up, write one), rotary
        and the KV-cache store (read q, k and v, write them)."""
        hidden = self.shapes["o"][0]
        per_layer = 2 * 4 * hidden + 3 * self.shapes["gate_up"][0] // 2 + 2 * self.shapes["qkv"][0]
        return layers * per_layer * activation_bytes


def step_estimate_parts(seqs: list[list[int]], shapes: DenseShapes, costs: MeasuredCosts, bandwidth: float,
                        flops: float, num_decodes: int | None = None) -> dict[str, float]:
    """Seconds the engine's kernels would take for one step, per part of `ESTIMATE_PARTS` (`seqs` as in
    `step_bound`, its first `num_decodes` decodes; default: all), by `costs`."""
    rows = costs.step_rows(sum(n for _, n in seqs), len(seqs) - (len(seqs) if num_decodes is None else num_decodes))
    parts = (shapes.layers * costs.layer_s(rows, flops), costs.matmul_s("lm_head", len(seqs), flops),
             attention_s(seqs, shapes, costs.attention_bandwidth, flops),
             rows * costs.elementwise_token_bytes(shapes.layers) / bandwidth, costs.step_overhead_s)
    return dict(zip(ESTIMATE_PARTS, parts))


def decode_bucket(batch: int) -> str:
    """The name of a decode-only step's batch-size bucket, e.g. "decode 17-63"."""
    low, high = next(b for b in BUCKETS if b[0] <= batch <= b[1])
    return f"decode {low}-{high}"


DECODE_BUCKETS = tuple(decode_bucket(low) for low, _ in BUCKETS)


def schedule_bound(steps: list[list], shapes: DenseShapes, bandwidth: float, flops: float,
                   costs: MeasuredCosts | None = None) -> dict[str, Bound]:
    """Bounds per kind of step ("decode LOW-HIGH" by batch size, "with prefill") and "all", with their
    estimates where `costs` are given."""
    groups: dict[str, Bound] = {}
    total = Bound()
    for num_decodes, seqs in steps:
        bound = step_bound(seqs, shapes, bandwidth, flops)
        if costs:
            bound.estimate_parts = step_estimate_parts(seqs, shapes, costs, bandwidth, flops, num_decodes)
        kind = decode_bucket(len(seqs)) if num_decodes == len(seqs) else "with prefill"
        groups.setdefault(kind, Bound()).add(bound)
        total.add(bound)
    return {**{k: groups[k] for k in (*DECODE_BUCKETS, "with prefill") if k in groups}, "all": total}


def workload(requests: list) -> dict[str, int]:
    """What a schedule file records of its requests (`BenchRequest`s), to tell whether a run is of the same ones."""
    return {"requests": len(requests), "prompt_tokens": sum(len(r.prompt_token_ids) for r in requests),
            "output_tokens": sum(r.output_len for r in requests)}


def check_workload(recorded: dict, requests: list, option: str) -> None:
    """Exit, saying so, if `recorded` (the file given as `option`) was recorded for other requests."""
    ours = workload(requests)
    theirs = {k: recorded[k] for k in ours}
    if ours != theirs:
        sys.exit(f"{option} was recorded for other requests ({theirs}); this run has {ours}")


def workload_tokens(recorded: dict) -> int:
    """Prompt and output tokens of a recorded schedule's requests, as the throughput benchmarks count them."""
    return recorded["prompt_tokens"] + recorded["output_tokens"]


def bound_tokens_per_s(recorded: dict, config_dir: str, kv_cache_dtype: str, bandwidth: float, flops: float) -> float:
    """The total tok/s no run of `recorded` (what `decode_replay.py record` saved) can beat at these ceilings."""
    shapes = DenseShapes.from_config(config_dir, kv_cache_dtype)
    return workload_tokens(recorded) / schedule_bound(recorded["steps"], shapes, bandwidth, flops)["all"].seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("schedule", help="the file `decode_replay.py record` wrote")
    ap.add_argument("--config", default="benchmarks/configs/llama3-8b", help="a dense model's config directory")
    ap.add_argument("--bandwidth", type=float, required=True, help="copy bandwidth, TB/s")
    ap.add_argument("--tflops", type=float, required=True, help="bf16 matmul rate, TFLOP/s")
    ap.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "fp8", "int8"), help="auto: bfloat16")
    ap.add_argument("--measured-tok-s", type=float, help="a run's total tok/s, to say how near it is")
    ap.add_argument("--matmul-costs", help="`matmul_rows.py --output-json` of the same GPU: add an estimate")
    ap.add_argument("--attention-tb-s", type=float,
                    help="with --matmul-costs: the KV read rate of decode attention, TB/s (default: 90%% of "
                         "--bandwidth, what the bf16 kernel reached on an H100)")
    ap.add_argument("--step-overhead-ms", type=float, default=0.45,
                    help="with --matmul-costs: time a step takes beyond its kernels' bytes and FLOPs (default: "
                         "what the H100's batch-1 decode showed)")
    ap.add_argument("--graph-padding", action="store_true",
                    help="with --matmul-costs: pad steps to the CUDA graphs the engine would replay")
    args = ap.parse_args()
    if args.graph_padding and not args.matmul_costs:
        sys.exit("--graph-padding needs --matmul-costs")
    recorded = json.loads(Path(args.schedule).read_text())
    steps = recorded["steps"]
    shapes = DenseShapes.from_config(args.config, args.kv_cache_dtype)
    bandwidth, flops = args.bandwidth * 1e12, args.tflops * 1e12
    costs = (MeasuredCosts.load(args.matmul_costs, (args.attention_tb_s or 0.9 * args.bandwidth) * 1e12,
                                args.step_overhead_ms * 1e-3) if args.matmul_costs else None)
    if args.graph_padding:
        settings = recorded["settings"]
        costs = costs.with_graphs(settings["max_num_seqs"], settings["max_num_batched_tokens"], flops)
    bounds = schedule_bound(steps, shapes, bandwidth, flops, costs)
    total = bounds["all"]
    title = (f"Roofline of {recorded['requests']} requests' schedule ({len(steps)} steps; {Path(args.config).name}, "
             f"KV cache {args.kv_cache_dtype}; {args.bandwidth:g} TB/s, {args.tflops:g} TFLOP/s)")
    table = Table(title=title)
    table.add_column("steps")
    columns = ["count", "tokens computed", "linear layers s", "attention s", "bound s", "share"]
    for column in columns + (["estimate s"] if costs else []):
        table.add_column(column, justify="right")
    for name, b in bounds.items():
        estimate = [f"{b.estimate_s:.2f}"] if costs else []
        table.add_row(name, f"{b.steps:,}", f"{b.tokens:,}", f"{b.linear_s:.2f}", f"{b.attention_s:.2f}",
                      f"{b.seconds:.2f}", f"{b.seconds / total.seconds:.0%}", *estimate)
    console = Console()
    console.print(table)
    tokens = workload_tokens(recorded)
    compute_only = 2 * (shapes.body_params + shapes.head_params) * tokens / flops
    console.print(f"bound: {tokens / total.seconds:,.0f} total tok/s ({total.seconds:.2f} s); the compute "
                  f"roofline alone: {tokens / compute_only:,.0f} tok/s ({compute_only:.2f} s)")
    if costs:
        console.print(f"estimate from {args.matmul_costs}: {tokens / total.estimate_s:,.0f} total tok/s "
                      f"({total.estimate_s:.2f} s: "
                      + ", ".join(f"{part} {total.estimate_parts[part]:.2f}" for part in ESTIMATE_PARTS) + ")")
    if args.measured_tok_s:
        console.print(f"measured {args.measured_tok_s:,.0f} tok/s: "
                      f"{args.measured_tok_s / (tokens / total.seconds):.0%} of this bound")


if __name__ == "__main__":
    main()
