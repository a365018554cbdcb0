"""The library matmul (`F.linear`, cuBLAS on a GPU) at the row counts of decode steps, beside each
projection's bound.

    python benchmarks/matmul_rows.py [--config benchmarks/configs/llama3-8b] [--rows 24 64 128 256 512]
        [--blas default|cublaslt|cublas|tunable] [--bandwidth 3.05 --tflops 680]

One row per projection of a layer of --config (qkv, o, gate_up, down) and the LM head, one column per
row count M: microseconds per call and the share of its bound, the larger of moving the weight, input
and output once at the copy bandwidth and its FLOPs at the matmul rate (a share over 100%: faster than
the 8192^3 matmul the rate was measured on). A last row sums the layer's four projections. Ceilings come
from --bandwidth and --tflops, else are measured as `single_gpu.py` measures them. Calls are timed by
`timing.bench_us` (median; the L2 cache emptied by a read before each call, so the weight streams from
memory as in a decode step).

`--blas` sets torch's preferred BLAS library (`default` is torch's; the engine asks for `cublaslt`, see
`gllm_engine/executor/worker.py`); `tunable` turns on PyTorch's TunableOp, which times the
library's candidate algorithms for each shape on its first call and keeps the fastest; both need CUDA.
On the CPU (`--device cpu`) the table comes from wall-clock loops: a smoke run, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))

from single_gpu import ceilings_or_measured  # noqa: E402
from timing import bench_us  # noqa: E402


def projection_shapes(config_dir: str) -> dict[str, tuple[int, int]]:
    """(out, in) features of a dense decoder layer's projections and of its LM head, from its HF config."""
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(config_dir)
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    q_width, kv_width = hf.num_attention_heads * head_dim, hf.num_key_value_heads * head_dim
    return {"qkv": (q_width + 2 * kv_width, hf.hidden_size), "o": (hf.hidden_size, q_width),
            "gate_up": (2 * hf.intermediate_size, hf.hidden_size), "down": (hf.hidden_size, hf.intermediate_size),
            "lm_head": (hf.vocab_size, hf.hidden_size)}


def matmul_bound(rows: int, out_features: int, in_features: int, bandwidth: float, flops: float,
                 element_bytes: int = 2) -> float:
    """Seconds `x [rows, in] @ w.T [in, out]` needs at least: every operand moved once, or its FLOPs."""
    moved = (out_features * in_features + rows * in_features + rows * out_features) * element_bytes
    return max(moved / bandwidth, 2 * rows * out_features * in_features / flops)


def set_blas(blas: str) -> None:
    """Point torch's matmuls at `blas` (not "default"): a preferred library, or TunableOp's per-shape choice."""
    if blas == "tunable":
        torch.cuda.tunable.enable(True)
        torch.cuda.tunable.tuning_enable(True)
        torch.cuda.tunable.set_filename(str(Path(tempfile.gettempdir()) / "gllm_tunableop.csv"))  # not the cwd
    else:
        torch.backends.cuda.preferred_blas_library(blas)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="benchmarks/configs/llama3-8b", help="model dir (config.json)")
    ap.add_argument("--rows", type=int, nargs="+", default=[24, 48, 64, 96, 128, 192, 256, 384, 512])
    ap.add_argument("--blas", default="default", choices=("default", "cublaslt", "cublas", "tunable"))
    ap.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--bandwidth", type=float, help="copy bandwidth, TB/s (default: measured)")
    ap.add_argument("--tflops", type=float, help="matmul rate, TFLOP/s (default: measured)")
    ap.add_argument("--output-json", help="save the times per call (for `schedule_roofline.py --matmul-costs`)")
    args = ap.parse_args()
    cuda = args.device != "cpu" and torch.cuda.is_available()
    args.device = "cuda" if cuda else "cpu"
    if args.blas != "default" and not cuda:
        sys.exit(f"--blas {args.blas} picks a CUDA library: it needs a GPU")
    bandwidth, flops = ceilings_or_measured(args)
    if args.blas != "default":
        set_blas(args.blas)
    dtype = getattr(torch, args.dtype)
    element_bytes = torch.finfo(dtype).bits // 8
    device = torch.device(args.device)
    name = torch.cuda.get_device_name() if cuda else "cpu"
    table = Table(title=f"F.linear ({args.blas}) on {name}, {Path(args.config).name}, {args.dtype}: "
                        f"µs per call (share of the bound at {bandwidth:g} TB/s, {flops:g} TFLOP/s)")
    table.add_column("projection (out x in)")
    for rows in args.rows:
        table.add_column(f"M = {rows}", justify="right")
    layer = [[0.0, 0.0] for _ in args.rows]  # µs, bound µs
    gen = torch.Generator(device=device).manual_seed(0)
    shapes = projection_shapes(args.config)
    times: dict[str, list[float]] = {}
    for proj, (out_features, in_features) in shapes.items():
        weight = torch.randn(out_features, in_features, generator=gen, device=device, dtype=dtype)
        cells = []
        times[proj] = []
        for i, rows in enumerate(args.rows):
            x = torch.randn(rows, in_features, generator=gen, device=device, dtype=dtype)
            us = bench_us(lambda x=x, w=weight: F.linear(x, w), device)
            times[proj].append(us)
            bound = matmul_bound(rows, out_features, in_features, bandwidth * 1e12, flops * 1e12, element_bytes) * 1e6
            cells.append(f"{us:,.1f} ({bound / us:.0%})")
            if proj != "lm_head":
                layer[i][0] += us
                layer[i][1] += bound
        table.add_row(f"{proj} ({out_features} x {in_features})", *cells)
    table.add_row("layer (qkv + o + gate_up + down)", *(f"{us:,.1f} ({bound / us:.0%})" for us, bound in layer))
    Console(width=None if sys.stdout.isatty() else 200).print(table)
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(dict(device=name, blas=args.blas, dtype=args.dtype,
                                                          config=args.config, rows=args.rows, shapes=shapes,
                                                          us=times), indent=1))


if __name__ == "__main__":
    main()
