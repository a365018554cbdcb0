"""Check the Triton fused MoE against its torch reference at Qwen3-30B-A3B shapes, and time it against the roofline.

    python benchmarks/moe_kernel.py [--batches 1 32 256] [--sweep] [--ep N]

Shapes default to Qwen3-30B-A3B (128 experts, top-8, hidden 2048, expert intermediate 768, bfloat16).
For each batch of T tokens (random router logits, softmax top-k, renormalised):
  - checks `moe.fused_moe` against `reference.fused_moe` computed in float32 (allclose at 2e-2), eager
    and replayed from a CUDA graph (as the engine runs decode steps), and prints both max errors;
  - times it with `timing.bench_us` (median, L2 cache emptied before each call): eager, in a CUDA graph, the
    expert sort alone in both implementations (the one-program Triton kernel `align_by_expert` uses up to
    ALIGN_KERNEL_MAX_PAIRS pairs, and the torch sort beyond), and the torch reference;
  - rates the CUDA-graph time: GB/s over the weights of the experts the batch touches, TFLOP/s over
    6 * T * k * H * I, and the share of the roofline max(bytes / bandwidth, flops / peak) reached, for
    the device's datasheet (H100 SXM: 3.35 TB/s, H200: 4.8 TB/s; 989 TFLOP/s dense bf16 on both) and for
    what this run measures on it first (a 1 GiB device-to-device copy, an 8192^3 matmul in --dtype).
`--sweep` also times a list of candidate tile configurations per batch and prints the fastest ones as
`TUNED_TILES` lines for gllm_engine/kernels/moe.py. `--ep N` times one expert-parallel rank instead: it
holds E / N whole experts, the router still picks among all E, and the pairs of other ranks' experts
are marked remote (skipped); rates count only this rank's pairs and experts. Exits 1 if any check fails.

`--device cpu` runs the same checks in Triton's interpreter with wall-clock timing and no CUDA graphs,
at toy shapes (e.g. --experts 8 --top-k 2 --hidden 64 --inter 32 --dtype float32), to try the script.
The kernel modules are loaded from their files, so only torch and triton are needed.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import bench_us  # noqa: E402

KERNELS_DIR = Path(__file__).resolve().parents[1] / "gllm_engine" / "kernels"
ATOL = RTOL = 2e-2
# Datasheet HBM bandwidth (B/s) and dense bf16 tensor-core peak (FLOP/s), by CUDA device name prefix.
DATASHEETS = {"NVIDIA H100 80GB HBM3": (3.35e12, 989e12), "NVIDIA H200": (4.8e12, 989e12)}
# Candidate tiles for --sweep: (block_m, block_n, block_k, group_m, num_warps, num_stages)
SWEEP = [
    (16, 32, 64, 1, 4, 4), (16, 32, 128, 1, 4, 4), (16, 64, 64, 1, 4, 4), (16, 64, 128, 1, 4, 4),
    (16, 128, 64, 1, 4, 4), (16, 128, 128, 1, 4, 3), (16, 64, 256, 1, 4, 3), (32, 64, 64, 8, 4, 4),
    (32, 64, 128, 8, 4, 3), (32, 128, 64, 8, 4, 4), (64, 64, 64, 8, 4, 4), (64, 128, 64, 8, 4, 3),
    (64, 128, 64, 8, 8, 3), (64, 256, 64, 8, 8, 3), (128, 128, 64, 8, 8, 3), (128, 256, 64, 8, 8, 3),
    (128, 128, 128, 8, 8, 2),
]


def load_kernels() -> tuple[ModuleType, ModuleType]:
    """Import gllm_engine/kernels/{moe,reference}.py by path, without the engine package's own imports."""
    mods = []
    for name in ("moe", "reference"):
        spec = importlib.util.spec_from_file_location(f"gllm_kernels_{name}", KERNELS_DIR / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        mods.append(module)
    return mods[0], mods[1]


@dataclass(frozen=True)
class Roofline:
    bandwidth: float  # B/s
    flops: float  # FLOP/s

    def share(self, num_bytes: float, flops: float, seconds: float) -> float:
        """% of this roofline's time bound that a run of `seconds` reaches."""
        return max(num_bytes / self.bandwidth, flops / self.flops) / seconds * 100


def datasheet(name: str) -> Roofline:
    """The device's datasheet peaks; NaN (no share printed) for devices not in DATASHEETS."""
    peaks = next((v for prefix, v in DATASHEETS.items() if name.startswith(prefix)), (float("nan"),) * 2)
    return Roofline(*peaks)


def measured_peaks(device: torch.device, dtype: torch.dtype) -> Roofline:
    """Copy bandwidth (read + write of 1 GiB) and matmul throughput (8192^3 in `dtype`) timed on `device`."""
    if device.type != "cuda":
        return Roofline(float("nan"), float("nan"))
    roofline = Roofline(_copy_bandwidth(device), _matmul_flops(device, dtype))
    torch.cuda.empty_cache()  # the buffers are gone: give their memory back before the cases
    return roofline


def _copy_bandwidth(device: torch.device, num_bytes: int = 2**30) -> float:
    src = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * num_bytes / (bench_us(lambda: dst.copy_(src), device) * 1e-6)


def _matmul_flops(device: torch.device, dtype: torch.dtype, n: int = 8192) -> float:
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    return 2 * n**3 / (bench_us(lambda: a @ b, device) * 1e-6)


@dataclass
class Case:
    x: torch.Tensor  # [T, H]
    w13: torch.Tensor  # [E, 2I, H]
    w2: torch.Tensor  # [E, H, I]
    weights: torch.Tensor  # [T, k] float32
    ids: torch.Tensor  # [T, k]: local expert ids, E_local for another rank's (remote) experts
    truth: torch.Tensor  # [T, H] float32: the reference on float32 copies
    remote_pairs: bool  # expert parallelism: some pairs belong to other ranks

    @property
    def args(self) -> tuple[torch.Tensor, ...]:
        return self.x, self.w13, self.w2, self.weights, self.ids

    @property
    def local_ids(self) -> torch.Tensor:
        """The ids of the pairs this rank computes."""
        return self.ids[self.ids < self.w13.shape[0]]


def make_case(num_tokens: int, w13: torch.Tensor, w2: torch.Tensor, top_k: int, num_experts: int, ref: ModuleType,
              seed: int) -> Case:
    """Random tokens routed among `num_experts`; w13/w2 hold the first E_local of them (all, without EP)."""
    gen = torch.Generator(device=w13.device).manual_seed(seed)
    hidden, num_local = w13.shape[2], w13.shape[0]
    x = torch.randn(num_tokens, hidden, generator=gen, device=w13.device).to(w13.dtype)
    logits = torch.randn(num_tokens, num_experts, generator=gen, device=w13.device)
    weights, ids = torch.topk(torch.softmax(logits, dim=-1), top_k, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    ids = ids.masked_fill(ids >= num_local, num_local)  # other ranks' experts: remote
    remote = num_local < num_experts
    truth = ref.fused_moe(x.float(), w13.float(), w2.float(), weights, ids, remote_pairs=remote)
    return Case(x, w13, w2, weights, ids, truth, remote)


def check(out: torch.Tensor, truth: torch.Tensor) -> tuple[float, bool]:
    a = out.float()
    ok = a.shape == truth.shape and bool(torch.isfinite(a).all()) and torch.allclose(a, truth, atol=ATOL, rtol=RTOL)
    return (a - truth).abs().max().item(), ok


def capture(fn: Callable[[], torch.Tensor]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """A CUDA graph of `fn` (run once before, to compile) and its static output."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def rates(case: Case, us: float, spec: Roofline, measured: Roofline) -> tuple[float, float, float, float]:
    """GB/s over the touched experts' weights, TFLOP/s, % of the datasheet roofline and of the measured one."""
    hidden, inter = case.w13.shape[2], case.w2.shape[2]
    touched = case.local_ids.unique().numel()
    num_bytes = touched * 3 * hidden * inter * case.w13.element_size()
    flops = 6 * case.local_ids.numel() * hidden * inter
    seconds = us * 1e-6
    return (num_bytes / seconds / 1e9, flops / seconds / 1e12, spec.share(num_bytes, flops, seconds),
            measured.share(num_bytes, flops, seconds))


def run_batch(moe: ModuleType, ref: ModuleType, case: Case, device: torch.device, spec: Roofline,
              measured: Roofline) -> bool:
    num_tokens, top_k = case.ids.shape
    tiles = moe.moe_config(num_tokens, top_k, case.w13, case.x.dtype)
    args, remote = case.args, case.remote_pairs
    err, ok = check(moe.fused_moe(*args, remote_pairs=remote), case.truth)
    ref_err, _ = check(ref.fused_moe(*args, remote_pairs=remote), case.truth)
    us = bench_us(lambda: moe.fused_moe(*args, remote_pairs=remote), device)
    num_experts = case.w13.shape[0]
    align_kernel_us = bench_us(lambda: moe.align_by_expert_kernel(case.ids, num_experts, tiles.block_m), device)
    align_sorted_us = bench_us(lambda: moe.align_by_expert_sorted(case.ids, num_experts, tiles.block_m), device)
    ref_us = bench_us(lambda: ref.fused_moe(*args, remote_pairs=remote), device)
    graph_us, graph_err = float("nan"), float("nan")
    if device.type == "cuda":
        graph, out = capture(lambda: moe.fused_moe(*args, remote_pairs=remote))
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        graph_err, graph_ok = check(out, case.truth)
        ok = ok and graph_ok
        graph_us = bench_us(graph.replay, device)
    gbs, tflops, spec_pct, measured_pct = rates(case, graph_us if device.type == "cuda" else us, spec, measured)
    touched = case.local_ids.unique().numel()
    print(f"{num_tokens:>5d} {case.local_ids.numel():>6d} {touched:>7d} {err:9.2e} {graph_err:9.2e} {ref_err:9.2e} "
          f"{'ok' if ok else 'FAIL':>4s} {us:9.1f} {graph_us:9.1f} {align_kernel_us:8.1f} {align_sorted_us:8.1f} "
          f"{ref_us:9.1f} {gbs:8.1f} "
          f"{tflops:7.2f} {spec_pct:6.1f}% {measured_pct:6.1f}%   {tuple(tiles)}", flush=True)
    return ok


def sweep_batch(moe: ModuleType, case: Case, device: torch.device) -> None:
    """Time every SWEEP candidate that compiles and is correct; print the fastest three as table lines."""
    num_tokens = case.ids.shape[0]
    args, remote = case.args, case.remote_pairs
    timed = []
    for candidate in SWEEP:
        tiles = moe.MoeTiles(*candidate)
        try:
            _, ok = check(moe.fused_moe(*args, tiles=tiles, remote_pairs=remote), case.truth)
            if not ok:
                print(f"  T={num_tokens} {candidate}: FAIL (does not match the reference)", flush=True)
                continue
            timed.append((bench_us(lambda t=tiles: moe.fused_moe(*args, tiles=t, remote_pairs=remote), device),
                          tiles))
        except Exception as exc:  # e.g. out of shared memory: skip the candidate
            print(f"  T={num_tokens} {candidate}: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}")
    timed.sort(key=lambda item: item[0])
    for us, tiles in timed[:3]:
        print(f"  T={num_tokens:<5d} {us:9.1f} µs   ({num_tokens}, MoeTiles{tuple(tiles)}),", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32, 256])
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--inter", type=int, default=768, help="expert intermediate size (per tensor-parallel rank)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--sweep", action="store_true", help="time candidate tiles per batch")
    parser.add_argument("--ep", type=int, default=1, help="time one of this many expert-parallel ranks")
    args = parser.parse_args()
    if args.ep < 1 or args.experts % args.ep:
        parser.error(f"--ep ({args.ep}) must be >= 1 and divide --experts ({args.experts})")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("moe_kernel needs a CUDA device (or --device cpu at toy shapes)")
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernel module is loaded below
    import triton

    moe, ref = load_kernels()
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    e, h, i = args.experts // args.ep, args.hidden, args.inter  # this rank's experts
    # Scaled so every product stays O(1): errors are then comparable to the tolerance.
    w13 = (torch.randn(e, 2 * i, h, generator=gen, device=device) / h**0.5).to(dtype)
    w2 = (torch.randn(e, h, i, generator=gen, device=device) / i**0.5).to(dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"
    ep = f" (rank 0 of ep={args.ep}: {e} of {args.experts} experts; pairs and experts are this rank's)" \
        if args.ep > 1 else ""
    spec, measured = datasheet(name), measured_peaks(device, dtype)
    print(f"{name}, torch {torch.__version__}, triton {triton.__version__}, {args.dtype}; "
          f"E={args.experts} top-{args.top_k} H={h} I={i}{ep}; rates and roofline from the CUDA-graph time; "
          f"sortK/sortT: expert sort by the Triton kernel / by torch ops (eager)")
    print(f"roofline: datasheet {spec.bandwidth / 1e12:.2f} TB/s, {spec.flops / 1e12:.0f} TFLOP/s; measured here "
          f"{measured.bandwidth / 1e12:.2f} TB/s copy, {measured.flops / 1e12:.0f} TFLOP/s {args.dtype} matmul")
    print(f"{'T':>5s} {'pairs':>6s} {'experts':>7s} {'err':>9s} {'graph err':>9s} {'ref err':>9s} {'chk':>4s} "
          f"{'eager µs':>9s} {'graph µs':>9s} {'sortK µs':>8s} {'sortT µs':>8s} {'ref µs':>9s} {'GB/s':>8s} "
          f"{'TFLOP/s':>7s} {'%spec':>7s} {'%meas':>7s}   tiles (m, n, k, group, warps, stages)")
    failures = []
    cases = {}
    for batch, seed in zip(args.batches, itertools.count(1)):
        try:
            cases[batch] = make_case(batch, w13, w2, args.top_k, args.experts, ref, seed)
            if not run_batch(moe, ref, cases[batch], device, spec, measured):
                failures.append(batch)
        except Exception as exc:  # report and go on: one broken batch must not hide the others
            print(f"T={batch}: ERROR {type(exc).__name__}: {exc}", flush=True)
            traceback.print_exc()
            failures.append(batch)
    if args.sweep:
        print(f"\nsweep: fastest tiles per batch; key ({name!r}, {e}, {h}, {i}, torch.{args.dtype})")
        for case in cases.values():
            sweep_batch(moe, case, device)
    print(f"\n{len(args.batches) - len(failures)}/{len(args.batches)} batches ok"
          + (f"; failed: T={failures}" if failures else ""))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
