"""Check every Triton kernel against its torch reference at Llama-3-8B shapes on a CUDA GPU, and time both.

    python benchmarks/kernels_check.py [--dtype bfloat16] [--quick]

One row per case: kernel, shape, max |kernel - reference|, ok/FAIL (allclose at 2e-2), the kernel's and
the reference's time in µs (`timing.bench_us`: median, the L2 cache emptied before each call), and the
kernel's achieved GB/s (memory-bound kernels) or TFLOP/s (prefill). Exits 1 if any case fails or raises;
a raising case prints its traceback and the others still run. The kernel modules are loaded from their
files, so only torch, triton and numpy are needed (not the engine's other dependencies); the prefill tile
map comes from gllm_engine.layers.attention, which imports nothing more.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from gllm_engine.layers.attention import prefill_tile_map  # numpy only: the kernel's work list

sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import bench_us  # noqa: E402

KERNELS_DIR = Path(__file__).resolve().parents[1] / "gllm_engine" / "kernels"

# Llama-3-8B
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
HIDDEN, INTERMEDIATE = 4096, 14336
ROPE_THETA, MAX_POSITIONS, RMS_EPS = 500000.0, 8192, 1e-5
SCALE = HEAD_DIM**-0.5

DECODE_BATCHES = (1, 32, 256)
DECODE_CONTEXTS = (128, 512, 1024, 4096)
DECODE_GRAPH_CASES = ((1, 4096), (32, 1024))  # (batch, context) captured in a CUDA graph
DECODE_8BIT_CASES = ((32, 1024), (256, 512), (256, 4096))  # (batch, context) over an fp8 and an int8 cache
# (requests, new tokens each, tokens already cached each): fresh prompts, then chunked prefill / prefix hits
PREFILL_CASES = ((1, 128, 0), (1, 1024, 0), (1, 4096, 0), (1, 8192, 0), (8, 1024, 0), (4, 512, 3584),
                 (1, 2048, 2048))
TOKEN_COUNTS = (1, 256, 8192)  # tokens of a step, for the per-token kernels
VOCAB = 128256
# (name, output features, input features) of the projections the skinny matmul serves at small batch
LINEAR_SHAPES = (("qkv", (NUM_HEADS + 2 * NUM_KV_HEADS) * HEAD_DIM, HIDDEN), ("o", HIDDEN, NUM_HEADS * HEAD_DIM),
                 ("gate_up", 2 * INTERMEDIATE, HIDDEN), ("down", HIDDEN, INTERMEDIATE), ("lm_head", VOCAB, HIDDEN))
LINEAR_ROWS = (1, 16)
ARGMAX_ROWS = (1, 256)
ATOL = RTOL = 2e-2


@dataclass
class Row:
    kernel: str
    shape: str
    max_err: float
    ok: bool
    us: float
    ref_us: float
    rate: str


@dataclass
class Kernels:
    ref: ModuleType
    attention: ModuleType
    norm: ModuleType
    activation: ModuleType
    rotary: ModuleType
    linear: ModuleType
    sampling: ModuleType


def load_kernels() -> Kernels:
    """Import gllm_engine/kernels/*.py by path, without the engine package's own imports."""
    mods = {}
    for name in ("reference", "attention", "norm", "activation", "rotary", "linear", "sampling"):
        spec = importlib.util.spec_from_file_location(f"gllm_kernels_{name}", KERNELS_DIR / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        mods[name] = module
    return Kernels(mods["reference"], mods["attention"], mods["norm"], mods["activation"], mods["rotary"],
                   mods["linear"], mods["sampling"])


def compare(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, bool]:
    a, e = actual.float(), expected.float()
    err = (a - e).abs().max().item() if a.numel() else 0.0
    ok = a.shape == e.shape and bool(torch.isfinite(a).all()) and torch.allclose(a, e, atol=ATOL, rtol=RTOL)
    return err, ok


def gbps(num_bytes: float, us: float) -> str:
    return f"{num_bytes / us / 1e3:8.1f} GB/s"


def paged_cache(num_reqs: int, tokens: int, dtype: torch.dtype, device: torch.device):
    """Random caches with each request's `tokens` in shuffled blocks; table `[num_reqs, blocks]`."""
    per_req = -(-tokens // BLOCK_SIZE)
    num_blocks = num_reqs * per_req + 1
    shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, dtype=dtype, device=device)
    v_cache = torch.randn(shape, dtype=dtype, device=device)
    ids = torch.randperm(num_blocks - 1, device=device)[: num_reqs * per_req] + 1
    table = ids.view(num_reqs, per_req).to(torch.int32)
    return k_cache, v_cache, table


def check_decode(kn: Kernels, batch: int, ctx: int, dtype: torch.dtype, device: torch.device, num_sms: int,
                 cache: str = "auto") -> Row:
    """Decode attention against the reference, over a cache in `dtype` ("auto"), float8 e4m3 ("fp8") or
    int8 with its scales ("int8")."""
    k_cache, v_cache, table = paged_cache(batch, ctx, dtype, device)
    cache_dtype = {"auto": dtype, "fp8": torch.float8_e4m3fn, "int8": torch.int8}[cache]
    k_cache, v_cache, scales = kn.ref.kv_caches_as(k_cache, v_cache, cache_dtype)
    q = torch.randn(batch, NUM_HEADS, HEAD_DIM, dtype=dtype, device=device)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
    args = (q, k_cache, v_cache, table, lens, SCALE)
    err, ok = compare(kn.attention.paged_decode_attention(*args, **scales),
                      kn.ref.paged_decode_attention(*args, **scales))
    us = bench_us(lambda: kn.attention.paged_decode_attention(*args, **scales), device)
    ref_us = bench_us(lambda: kn.ref.paged_decode_attention(*args, **scales), device)
    splits = kn.attention.decode_num_splits(batch, NUM_KV_HEADS, table.shape[1] * BLOCK_SIZE, num_sms)
    num_bytes = (batch * ctx * NUM_KV_HEADS * 2 * (k_cache.element_size() * HEAD_DIM + (4 if scales else 0))
                 + 2 * batch * NUM_HEADS * q.element_size() * HEAD_DIM)
    return Row("paged_decode_attention" + ("" if cache == "auto" else f" {cache} KV"),
               f"B={batch} ctx={ctx} splits={splits}", err, ok, us, ref_us, gbps(num_bytes, us))


def check_decode_graph(kn: Kernels, batch: int, ctx: int, dtype: torch.dtype, device: torch.device) -> Row:
    """Decode captured in a CUDA graph, as the engine runs it: no host sync may happen inside."""
    k_cache, v_cache, table = paged_cache(batch, ctx, dtype, device)
    q = torch.randn(batch, NUM_HEADS, HEAD_DIM, dtype=dtype, device=device)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
    out = torch.empty_like(q)
    args = (q, k_cache, v_cache, table, lens, SCALE)
    kn.attention.paged_decode_attention(*args, out=out)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kn.attention.paged_decode_attention(*args, out=out)
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    err, ok = compare(out, kn.ref.paged_decode_attention(*args))
    us = bench_us(graph.replay, device)
    num_bytes = (batch * ctx * NUM_KV_HEADS * 2 + 2 * batch * NUM_HEADS) * HEAD_DIM * q.element_size()
    return Row("paged_decode (CUDA graph)", f"B={batch} ctx={ctx}", err, ok, us, float("nan"), gbps(num_bytes, us))


def check_prefill(kn: Kernels, num_reqs: int, q_len: int, cached: int, dtype: torch.dtype,
                  device: torch.device) -> Row:
    seq_len = cached + q_len
    k_cache, v_cache, table = paged_cache(num_reqs, seq_len, dtype, device)
    q = torch.randn(num_reqs * q_len, NUM_HEADS, HEAD_DIM, dtype=dtype, device=device)
    qsl = torch.arange(num_reqs + 1, dtype=torch.int32, device=device) * q_len
    lens = torch.full((num_reqs,), seq_len, dtype=torch.int32, device=device)
    tiles = torch.from_numpy(prefill_tile_map(np.full(num_reqs, q_len), np.full(num_reqs, seq_len),
                                              kn.attention.prefill_block_m(HEAD_DIM, dtype))).to(device)
    args = (q, k_cache, v_cache, table, qsl, lens, tiles, SCALE)
    out = kn.attention.paged_prefill_attention(*args)
    # the truth: the reference in float32
    expected = kn.ref.paged_prefill_attention(q.float(), k_cache.float(), v_cache.float(), table, qsl, lens, tiles,
                                              SCALE)
    err, ok = compare(out, expected)
    us = bench_us(lambda: kn.attention.paged_prefill_attention(*args), device)
    ref_us = bench_us(lambda: kn.ref.paged_prefill_attention(*args), device)
    visible = num_reqs * (q_len * cached + q_len * (q_len + 1) // 2)  # (query, key) pairs under the causal mask
    flops = 4 * NUM_HEADS * HEAD_DIM * visible
    return Row("paged_prefill_attention", f"{num_reqs}x{q_len} new, {cached} cached", err, ok, us, ref_us,
               f"{flops / us / 1e6:8.1f} TFLOP/s")


def check_rms_norm(kn: Kernels, tokens: int, with_residual: bool, dtype: torch.dtype, device: torch.device) -> Row:
    x = torch.randn(tokens, HIDDEN, dtype=dtype, device=device)
    weight = (1 + 0.1 * torch.randn(HIDDEN, device=device)).to(dtype)
    residual = torch.randn(tokens, HIDDEN, dtype=dtype, device=device) if with_residual else None
    out, res = kn.norm.rms_norm(x, weight, RMS_EPS, residual)
    ref_out, ref_res = kn.ref.rms_norm(x, weight, RMS_EPS, residual)
    err, ok = compare(out, ref_out)
    if with_residual:
        res_err, res_ok = compare(res, ref_res)
        err, ok = max(err, res_err), ok and res_ok
    us = bench_us(lambda: kn.norm.rms_norm(x, weight, RMS_EPS, residual), device)
    ref_us = bench_us(lambda: kn.ref.rms_norm(x, weight, RMS_EPS, residual), device)
    num_bytes = tokens * HIDDEN * x.element_size() * (4 if with_residual else 2)
    return Row("rms_norm" + (" +residual" if with_residual else ""), f"T={tokens} H={HIDDEN}", err, ok, us, ref_us,
               gbps(num_bytes, us))


def check_silu_and_mul(kn: Kernels, tokens: int, dtype: torch.dtype, device: torch.device) -> Row:
    x = torch.randn(tokens, 2 * INTERMEDIATE, dtype=dtype, device=device)
    err, ok = compare(kn.activation.silu_and_mul(x), kn.ref.silu_and_mul(x))
    us = bench_us(lambda: kn.activation.silu_and_mul(x), device)
    ref_us = bench_us(lambda: kn.ref.silu_and_mul(x), device)
    return Row("silu_and_mul", f"T={tokens} I={INTERMEDIATE}", err, ok, us, ref_us,
               gbps(3 * tokens * INTERMEDIATE * x.element_size(), us))


def rotary_inputs(tokens: int, dtype: torch.dtype, device: torch.device):
    """Random positions, Llama-3's cos|sin table `[max_pos, D]` (float32), distinct cache slots and
    four zeroed `[NB, BS, Hkv, D]` caches (k and v for the kernel, k and v for its reference)."""
    positions = torch.randint(0, MAX_POSITIONS, (tokens,), device=device)
    inv_freq = 1.0 / (ROPE_THETA ** (torch.arange(0, HEAD_DIM, 2, device=device).float() / HEAD_DIM))
    freqs = torch.arange(MAX_POSITIONS, device=device).float()[:, None] * inv_freq[None, :]
    cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
    num_blocks = -(-tokens // BLOCK_SIZE) + 16
    slots = torch.randperm(num_blocks * BLOCK_SIZE, device=device)[:tokens]
    caches = [torch.zeros(num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, dtype=dtype, device=device)
              for _ in range(4)]
    return positions, cos_sin, slots, caches


def check_rotary_write_kv(kn: Kernels, tokens: int, qk_norm: bool, dtype: torch.dtype, device: torch.device) -> Row:
    q_size, kv_size = NUM_HEADS * HEAD_DIM, NUM_KV_HEADS * HEAD_DIM
    qkvs = [torch.randn(tokens, q_size + 2 * kv_size, dtype=dtype, device=device)]
    qkvs.append(qkvs[0].clone())

    positions, cos_sin, slots, caches = rotary_inputs(tokens, dtype, device)
    weights = tuple((1 + 0.1 * torch.randn(HEAD_DIM, device=device)).to(dtype) for _ in range(2)) if qk_norm else None
    args = [[*kn.ref.qkv_heads(qkvs[i], NUM_HEADS, NUM_KV_HEADS, HEAD_DIM), positions, cos_sin, caches[2 * i],
             caches[2 * i + 1], slots, weights, RMS_EPS] for i in range(2)]
    kn.rotary.rotary_write_kv(*args[0])  # q and k in place, k and v into the cache
    kn.ref.rotary_write_kv(*args[1])
    errs = [compare(got, want) for got, want in ((qkvs[0], qkvs[1]), (caches[0], caches[2]), (caches[1], caches[3]))]
    us = bench_us(lambda: kn.rotary.rotary_write_kv(*args[0]), device)
    ref_us = bench_us(lambda: kn.ref.rotary_write_kv(*args[1]), device)
    num_bytes = tokens * (2 * (q_size + kv_size) + 2 * kv_size) * qkvs[0].element_size() + tokens * HEAD_DIM * 4
    return Row("rotary_write_kv" + (" +qk_norm" if qk_norm else ""), f"T={tokens}", max(e for e, _ in errs),
               all(ok for _, ok in errs), us, ref_us, gbps(num_bytes, us))


def check_linear(kn: Kernels, name: str, out_features: int, in_features: int, rows: int, dtype: torch.dtype,
                 device: torch.device) -> Row:
    """The skinny matmul against F.linear (cuBLAS), timed in a CUDA graph of 20 calls as a decode step runs it."""
    import torch.nn.functional as F

    x = torch.randn(rows, in_features, dtype=dtype, device=device)
    weight = torch.randn(out_features, in_features, dtype=dtype, device=device) * in_features**-0.5
    err, ok = compare(kn.linear.skinny_linear(x, weight), F.linear(x, weight))
    us = graph_us(lambda: kn.linear.skinny_linear(x, weight))
    ref_us = graph_us(lambda: F.linear(x, weight))
    return Row(f"skinny_linear {name}", f"M={rows} N={out_features} K={in_features}", err, ok, us, ref_us,
               gbps(weight.numel() * weight.element_size(), us))


def check_gated_linear(kn: Kernels, rows: int, dtype: torch.dtype, device: torch.device) -> Row:
    """The gate-up projection with SiLU-and-mul in one skinny kernel, against cuBLAS then the reference activation."""
    import torch.nn.functional as F

    x = torch.randn(rows, HIDDEN, dtype=dtype, device=device)
    weight = torch.randn(2 * INTERMEDIATE, HIDDEN, dtype=dtype, device=device) * HIDDEN**-0.5
    err, ok = compare(kn.linear.skinny_linear(x, weight, gated=True), kn.ref.silu_and_mul(F.linear(x, weight)))
    us = graph_us(lambda: kn.linear.skinny_linear(x, weight, gated=True))
    ref_us = graph_us(lambda: kn.ref.silu_and_mul(F.linear(x, weight)))
    return Row("skinny_linear gate_up+silu", f"M={rows} N={2 * INTERMEDIATE} K={HIDDEN}", err, ok, us, ref_us,
               gbps(weight.numel() * weight.element_size(), us))


def check_qkv_rotary(kn: Kernels, rows: int, dtype: torch.dtype, device: torch.device) -> Row:
    """The qkv projection with its rotary and KV-cache store in one skinny kernel, against the path it
    replaces: the skinny projection, then `rotary_write_kv` on its views (both in CUDA graphs)."""
    q_size, kv_size = NUM_HEADS * HEAD_DIM, NUM_KV_HEADS * HEAD_DIM
    x = torch.randn(rows, HIDDEN, dtype=dtype, device=device)
    weight = torch.randn(q_size + 2 * kv_size, HIDDEN, dtype=dtype, device=device) * HIDDEN**-0.5
    positions, cos_sin, slots, caches = rotary_inputs(rows, dtype, device)
    args = [(NUM_HEADS, NUM_KV_HEADS, positions, cos_sin, caches[2 * i], caches[2 * i + 1], slots) for i in range(2)]
    out = kn.linear.qkv_rotary_write_kv(x, weight, None, *args[0])
    expected = kn.ref.qkv_rotary_write_kv(x, weight, None, *args[1])
    errs = [compare(got, want) for got, want in ((out, expected), (caches[0], caches[2]), (caches[1], caches[3]))]

    def unfused() -> None:
        qkv = kn.linear.skinny_linear(x, weight)
        kn.rotary.rotary_write_kv(*kn.ref.qkv_heads(qkv, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM), positions, cos_sin,
                                  caches[2], caches[3], slots)

    us = graph_us(lambda: kn.linear.qkv_rotary_write_kv(x, weight, None, *args[0]))
    ref_us = graph_us(unfused)
    return Row("skinny_linear qkv+rotary", f"M={rows} N={weight.shape[0]} K={HIDDEN}", max(e for e, _ in errs),
               all(ok for _, ok in errs), us, ref_us, gbps(weight.numel() * weight.element_size(), us))


def check_argmax(kn: Kernels, rows: int, device: torch.device) -> Row:
    """Greedy argmax over float32 logits; it must pick exactly torch's token."""
    logits = torch.randn(rows, VOCAB, device=device)
    same = torch.equal(kn.sampling.argmax(logits), kn.ref.argmax(logits))
    us = graph_us(lambda: kn.sampling.argmax(logits))
    ref_us = graph_us(lambda: kn.ref.argmax(logits))
    return Row("argmax", f"B={rows} V={VOCAB}", 0.0 if same else float("inf"), same, us, ref_us,
               gbps(logits.numel() * logits.element_size(), us))


def graph_us(fn: Callable[[], object], calls: int = 20) -> float:
    """Mean µs of `fn` replayed from a CUDA graph of `calls` calls (no launch overhead, as in a captured step)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return bench_us(graph.replay, torch.device("cuda")) / calls


def print_row(row: Row) -> None:
    speedup = row.ref_us / row.us if row.us == row.us and row.ref_us == row.ref_us else float("nan")
    print(f"{row.kernel:26s} {row.shape:30s} {row.max_err:10.2e} {'ok' if row.ok else 'FAIL':>4s} "
          f"{row.us:10.1f} {row.ref_us:10.1f} {speedup:7.1f}x {row.rate}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--quick", action="store_true", help="one or two cases per kernel")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("kernels_check needs a CUDA device")
    import triton

    dtype = getattr(torch, args.dtype)
    device = torch.device("cuda")
    torch.manual_seed(0)
    kn = load_kernels()
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count
    print(f"{torch.cuda.get_device_name(device)} ({num_sms} SMs), torch {torch.__version__}, "
          f"triton {triton.__version__}, {args.dtype}; Llama-3-8B: Hq={NUM_HEADS} Hkv={NUM_KV_HEADS} "
          f"D={HEAD_DIM} block={BLOCK_SIZE}")
    pick = (lambda cases: cases[:1]) if args.quick else (lambda cases: cases)
    cases: list[tuple[str, Callable[[], Row]]] = []
    for batch in pick(DECODE_BATCHES):
        for ctx in pick(DECODE_CONTEXTS):
            cases.append((f"decode B={batch} ctx={ctx}", partial(check_decode, kn, batch, ctx, dtype, device, num_sms)))
    for cache in ("fp8", "int8"):
        for batch, ctx in pick(DECODE_8BIT_CASES):
            cases.append((f"decode {cache} KV B={batch} ctx={ctx}",
                          partial(check_decode, kn, batch, ctx, dtype, device, num_sms, cache=cache)))
    for batch, ctx in pick(DECODE_GRAPH_CASES):
        cases.append((f"decode graph B={batch} ctx={ctx}", partial(check_decode_graph, kn, batch, ctx, dtype, device)))
    for reqs, q_len, cached in PREFILL_CASES[:2] if args.quick else PREFILL_CASES:
        cases.append((f"prefill {reqs}x{q_len}+{cached}",
                      partial(check_prefill, kn, reqs, q_len, cached, dtype, device)))
    for t in TOKEN_COUNTS[:2] if args.quick else TOKEN_COUNTS:
        for with_residual in (False, True):
            cases.append((f"rms_norm T={t} residual={with_residual}",
                          partial(check_rms_norm, kn, t, with_residual, dtype, device)))
        cases.append((f"silu_and_mul T={t}", partial(check_silu_and_mul, kn, t, dtype, device)))
        for qk_norm in (False, True):
            cases.append((f"rotary_write_kv T={t} qk_norm={qk_norm}",
                          partial(check_rotary_write_kv, kn, t, qk_norm, dtype, device)))

    for name, out_features, in_features in pick(LINEAR_SHAPES) if args.quick else LINEAR_SHAPES:
        for rows in LINEAR_ROWS:
            cases.append((f"skinny_linear {name} M={rows}",
                          partial(check_linear, kn, name, out_features, in_features, rows, dtype, device)))

    for rows in LINEAR_ROWS:
        cases.append((f"skinny_linear gate_up+silu M={rows}", partial(check_gated_linear, kn, rows, dtype, device)))
        cases.append((f"skinny_linear qkv+rotary M={rows}", partial(check_qkv_rotary, kn, rows, dtype, device)))
    for rows in ARGMAX_ROWS:
        cases.append((f"argmax B={rows}", partial(check_argmax, kn, rows, device)))

    print(f"{'kernel':26s} {'shape':30s} {'max |err|':>10s} {'chk':>4s} {'µs':>10s} {'ref µs':>10s} "
          f"{'speedup':>8s} throughput")
    failures = []
    for name, run in cases:
        try:
            row = run()
            torch.cuda.synchronize()
        except Exception as exc:  # report and go on: one broken case must not hide the others
            print(f"{name:57s} ERROR {type(exc).__name__}: {exc}", flush=True)
            traceback.print_exc()
            failures.append(name)
            continue
        print_row(row)
        if not row.ok:
            failures.append(name)
        torch.cuda.empty_cache()
    print(f"\n{len(cases) - len(failures)}/{len(cases)} cases ok" + (f"; failed: {', '.join(failures)}" if failures
                                                                      else ""))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
