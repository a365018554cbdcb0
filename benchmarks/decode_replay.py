"""Decode attention over the decode steps of a real offline run, timed on a GPU, per batch-size bucket.

Which requests decode in which step, and over how much context, depends on the requests and the
batching settings, not on the model. `record` therefore runs the engine on the CPU with a tiny random
model and saves every step's plan: per scheduled sequence, the tokens computed before the step and the
tokens it computes (`schedule_roofline.py` reads the same file). The CPU engine captures no CUDA graphs;
with `--matmul-costs` (a GPU's `matmul_rows.py --output-json`) and `--tflops` it admits as one with the
graphs it would keep on that GPU (`longest_first` fills the rows a decode step is padded to).

`replay` takes the decode-only steps and rebuilds every Nth of those batches on a GPU at --config's
attention shapes. Each batch is padded to the CUDA-graph size the engine would pad it to, with
shuffled blocks. `paged_decode_attention` is then timed in CUDA graphs of 10 calls, and the totals
are scaled to all steps and all layers.

    python benchmarks/decode_replay.py record --requests-file .gpu/sharegpt1000.json --out decode_steps.json
    python benchmarks/decode_replay.py replay decode_steps.json --config benchmarks/configs/llama3-8b --every 5

For tuning, `--programs-per-sm` overrides the engine's split-K target (`DECODE_PROGRAMS_PER_SM`) and
`--decode-tiles` the kernel's tiles; `--kv-cache-dtype fp8` times a float8 cache, `int8` an int8 one
with its scales.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from offline_throughput import workload_requests  # noqa: E402
from schedule_roofline import BUCKETS, MeasuredCosts, workload  # noqa: E402
from timing import bench_us  # noqa: E402

from gllm_engine.config import LONGEST_FIRST_MIN_RUNNING, SCHEDULING_POLICIES  # noqa: E402

GRAPH_CALLS = 10


def record(args: argparse.Namespace) -> None:
    """Run the requests through the engine on the CPU and save each step's plan: `[num_decodes, [[start,
    num_new_tokens], ...]]`, decodes first."""
    from transformers import LlamaConfig

    from gllm_engine.config import EngineConfig
    from gllm_engine.core.engine_core import EngineCore
    from gllm_engine.sampling_params import SamplingParams

    requests = workload_requests(args.requests_file, args.num_prompts, args.seed)
    vocab = max(max(r.prompt_token_ids) for r in requests) + 1
    with tempfile.TemporaryDirectory() as model_dir:  # the schedule does not depend on the model: a tiny one
        LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=args.max_model_len,
                    architectures=["LlamaForCausalLM"]).save_pretrained(model_dir)
        config = EngineConfig.create(model_dir, load_format="dummy", dtype="float32", device="cpu",
                                     max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                                     max_num_batched_tokens=args.max_num_batched_tokens, block_size=args.block_size,
                                     num_gpu_blocks_override=args.num_blocks, skip_tokenizer_init=True,
                                     scheduling_policy=args.scheduling_policy,
                                     longest_first_min_running=args.longest_first_min_running)
        core = EngineCore(config, show_progress=False)
        if args.matmul_costs:  # the CPU engine captures no CUDA graphs: admit as a GPU one with these would
            costs = MeasuredCosts.load(args.matmul_costs, 0.0, 0.0)
            core.scheduler.waiting.decode_batch_sizes = costs.with_graphs(
                args.max_num_seqs, args.max_num_batched_tokens, args.tflops * 1e12).graph_sizes[False]
        for i, r in enumerate(requests):
            core.add_request(str(i), r.prompt_token_ids,
                             SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True))
        steps: list[list] = []
        schedule = core.scheduler.schedule

        def recording_schedule():
            out = schedule()
            if out.scheduled:
                steps.append([out.num_decodes, [[s.start, s.num_new_tokens] for s in out.scheduled]])
            return out

        core.scheduler.schedule = recording_schedule
        while core.has_unfinished_requests():
            core.step()
    settings = {k: getattr(args, k) for k in ("max_num_seqs", "max_num_batched_tokens", "block_size", "num_blocks",
                                              "scheduling_policy", "longest_first_min_running", "matmul_costs")}
    Path(args.out).write_text(json.dumps({"settings": settings, **workload(requests), "steps": steps}))
    decode_steps = decode_contexts(steps)
    tokens = sum(map(sum, decode_steps))
    print(f"{len(steps)} steps, {len(decode_steps)} decode-only, {tokens:,} context tokens read per layer "
          f"-> {args.out}")


def decode_contexts(steps: list[list]) -> list[list[int]]:
    """The context lengths (the new token's included) of each decode-only step of a recorded schedule."""
    return [[start + 1 for start, _ in seqs] for num_decodes, seqs in steps if num_decodes == len(seqs)]


def replay(args: argparse.Namespace) -> None:
    """Time decode attention over every `--every`th recorded decode step; print a table per batch-size bucket."""
    import torch
    from rich.console import Console
    from rich.table import Table
    from transformers import AutoConfig

    from gllm_engine.config import KV_CACHE_TORCH_DTYPES
    from gllm_engine.kernels import attention, reference
    from gllm_engine.runner.cuda_graph import capture_sizes

    if not torch.cuda.is_available():
        sys.exit("decode_replay.py replay needs a CUDA device")
    if args.programs_per_sm:
        attention.DECODE_PROGRAMS_PER_SM = args.programs_per_sm
    if args.decode_tiles:
        tiles = attention.DecodeTiles(*(int(x) for x in args.decode_tiles.split(",")))
        attention.decode_config = lambda head_dim, dtype: tiles
    recorded = json.loads(Path(args.schedule).read_text())
    block_size, max_num_seqs = recorded["settings"]["block_size"], recorded["settings"]["max_num_seqs"]
    hf = AutoConfig.from_pretrained(args.config)
    num_heads, num_kv_heads = hf.num_attention_heads, hf.num_key_value_heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // num_heads
    layers, dtype, device = hf.num_hidden_layers, torch.bfloat16, torch.device("cuda")
    decode_steps = decode_contexts(recorded["steps"])
    sampled = decode_steps[::args.every]
    sizes = capture_sizes(max_num_seqs)
    num_blocks = max(sum(-(-c // block_size) for c in lens) for lens in sampled) + 1
    cache_dtype = KV_CACHE_TORCH_DTYPES.get(args.kv_cache_dtype, dtype)
    k_cache, v_cache, scales = reference.kv_caches_as(
        *(torch.randn(num_blocks, block_size, num_kv_heads, head_dim, device=device) for _ in range(2)), cache_dtype)
    width = -(-max(max(lens) for lens in sampled) // block_size)
    gen = torch.Generator().manual_seed(0)
    # K and V of one token, one layer (with an int8 cache's float32 scales)
    token_bytes = 2 * num_kv_heads * (head_dim * k_cache.element_size() + (4 if scales else 0))
    results = []  # (batch, context tokens, seconds per call)
    for lens in sampled:
        padded = next(s for s in sizes if s >= len(lens))
        seq_lens = np.zeros(padded, dtype=np.int32)
        seq_lens[:len(lens)] = lens
        blocks = -(-seq_lens // block_size)
        ids = (torch.randperm(num_blocks - 1, generator=gen)[:int(blocks.sum())] + 1).to(torch.int32)
        tables = torch.zeros(padded, width, dtype=torch.int32)
        for row, start in enumerate(np.cumsum(blocks) - blocks):
            tables[row, :blocks[row]] = ids[start:start + blocks[row]]
        q = torch.randn(padded, num_heads, head_dim, dtype=dtype, device=device)
        tables, seq_lens_t, out = tables.to(device), torch.from_numpy(seq_lens).to(device), torch.empty_like(q)

        def step(q=q, tables=tables, seq_lens_t=seq_lens_t, out=out):
            attention.paged_decode_attention(q, k_cache, v_cache, tables, seq_lens_t, head_dim**-0.5, out=out,
                                             **scales)

        step()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(GRAPH_CALLS):
                step()
        results.append((len(lens), sum(lens), bench_us(graph.replay, device) / GRAPH_CALLS * 1e-6))

    table = Table(title=f"Decode attention over {len(sampled)} of {len(decode_steps)} decode steps "
                        f"({torch.cuda.get_device_name(device)}, Hq={num_heads} Hkv={num_kv_heads} D={head_dim}, "
                        f"{layers} layers, KV cache {str(cache_dtype).removeprefix('torch.')})")
    for column in ("batch", "steps timed", "seconds (all steps, all layers)", "KV read (TB)", "TB/s"):
        table.add_column(column, justify="right")
    scale = args.every * layers

    def add(label: str, rows: list[tuple[int, int, float]]) -> None:
        seconds = sum(t for _, _, t in rows)
        kv_bytes = sum(c for _, c, _ in rows) * token_bytes
        table.add_row(label, str(len(rows)), f"{seconds * scale:.2f}", f"{kv_bytes * scale / 1e12:.2f}",
                      f"{kv_bytes / seconds / 1e12:.2f}")

    for low, high in BUCKETS:
        rows = [r for r in results if low <= r[0] <= high]
        if rows:
            add(f"{low}-{high}", rows)
    add("all", results)
    Console().print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    rec = commands.add_parser("record", help="run the requests on the CPU and save every step's plan")
    rec.add_argument("--requests-file", help="requests saved by offline_throughput.py --save-requests")
    rec.add_argument("--num-prompts", type=int, default=1000)
    rec.add_argument("--seed", type=int, default=0)
    rec.add_argument("--max-num-seqs", type=int, default=1024, help="the engine's default on a GPU")
    rec.add_argument("--max-num-batched-tokens", type=int, default=8192)
    rec.add_argument("--block-size", type=int, default=16)
    rec.add_argument("--num-blocks", type=int, default=80000, help="KV blocks (enough that nothing is preempted)")
    rec.add_argument("--max-model-len", type=int, default=8192)
    rec.add_argument("--scheduling-policy", default="fcfs", choices=SCHEDULING_POLICIES)
    rec.add_argument("--longest-first-min-running", type=int, default=LONGEST_FIRST_MIN_RUNNING)
    rec.add_argument("--matmul-costs", help="`matmul_rows.py --output-json` of a GPU: admit as the engine would "
                     "with the CUDA graphs it keeps there (longest_first rounds up to their sizes)")
    rec.add_argument("--tflops", type=float, default=None, help="that GPU's bf16 matmul rate (with --matmul-costs)")
    rec.add_argument("--out", required=True)
    rep = commands.add_parser("replay", help="time decode attention over the recorded steps on a GPU")
    rep.add_argument("schedule", help="the file `record` wrote")
    rep.add_argument("--config", default="benchmarks/configs/llama3-8b", help="a model config: attention shapes")
    rep.add_argument("--every", type=int, default=5, help="time every Nth decode step")
    rep.add_argument("--programs-per-sm", type=int, default=None, help="override the split-K target")
    rep.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "fp8", "int8"), help="auto: bfloat16")
    rep.add_argument("--decode-tiles", help="override the decode kernel's tiles: BLOCK_N,NUM_WARPS,NUM_STAGES")
    args = parser.parse_args()
    if args.command == "record" and args.matmul_costs and args.tflops is None:
        parser.error("--matmul-costs needs --tflops")
    record(args) if args.command == "record" else replay(args)


if __name__ == "__main__":
    main()
