"""The decode, prefill and rotary kernels compiled for a Hopper GPU on a machine without one: registers,
spills and the instructions that widen an 8-bit KV cache, per cache dtype, in one table.

Triton compiles for a target it is told of, and its wheel carries ptxas and cuobjdump, so this runs on
the CPU. Arguments are specialized as a launch specializes them: pointers 16-byte aligned, strides
multiples of 16 (a scale row's stride, Hkv = 8, excepted). Shapes: Llama-3-8B heads (32 q, 8 KV of 128),
16-token blocks, the shipped tiles. SASS counts are of the whole kernel: F2F/F2FP and I2F are the
conversion pipe (16 per clock and SM on sm_90), the rest issues at up to 4 warp-instructions a clock. "in loop"
counts the longest loop body: per warp, the work of one context tile.

    python benchmarks/sass_check.py
    python benchmarks/sass_check.py --triton-widen             # the 8-bit tiles widened by Triton's conversions
    python benchmarks/sass_check.py --product-dtype bfloat16   # the 8-bit caches widened to bf16
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from typing import Any

from rich.console import Console
from rich.table import Table

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
# (name, Triton pointer type, torch dtype) of each KV cache
CACHES = (("bf16", "*bf16", "bfloat16"), ("fp8", "*fp8e4nv", "float8_e4m3fn"), ("int8", "*i8", "int8"))
COUNTED = {"F2F": r"\bF2FP?\.", "I2F": r"\bI2F\b", "PRMT": r"\bPRMT\b", "loads": r"\bLDG(STS)?\."}  # SASS


def longest_loop(lines: list[tuple[int, str]]) -> int:
    """Instructions in the longest loop body of a SASS listing (address, text): from a backward branch's
    target to the branch; 0 without a loop. In the attention kernels, the work of one context tile."""
    longest = 0
    for at, text in lines:
        target = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) < at:
            start = int(target.group(1), 16)
            longest = max(longest, sum(1 for a, _ in lines if start <= a <= at))
    return longest


def compile_sass(fn: Any, pointer_types: dict[str, str], constexprs: dict[str, Any], num_warps: int,
                 num_stages: int, arch: int) -> dict[str, int]:
    """Compile `fn` for sm_`arch`; its registers, local (spill) bytes and SASS instruction counts."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    signature = {}
    for name in names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointer_types:
            signature[name] = pointer_types[name]
        elif name.endswith("_ptr"):
            signature[name] = "*bf16"
        else:
            signature[name] = "fp32" if name in ("qk_scale", "eps") else "i32"
    aligned = [n for n in names if signature[n].startswith("*") or (n.startswith("stride_") and n != "stride_st")]
    source = ASTSource(fn, signature, constexprs={(names.index(k),): v for k, v in constexprs.items()},
                       attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned})
    kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                            options=dict(num_warps=num_warps, num_stages=num_stages))
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([os.path.join(tools, "cuobjdump"), "-res-usage", cubin.name], check=True,
                               capture_output=True, text=True).stdout
        sass = subprocess.run([os.path.join(tools, "cuobjdump"), "-sass", cubin.name], check=True,
                              capture_output=True, text=True).stdout
    registers, stack = re.search(r"REG:(\d+).*?STACK:(\d+)", usage).groups()
    lines = re.findall(r"^\s+/\*([0-9a-f]{4})\*/\s+(.*?);", sass, re.M)
    instructions = [text for _, text in lines]
    row = dict(registers=int(registers), stack=int(stack), instructions=len(instructions),
               loop=longest_loop([(int(at, 16), text) for at, text in lines]))
    for name, pattern in COUNTED.items():
        row[name] = sum(1 for text in instructions if re.search(pattern, text))
    return row


def kernel_cases(cache_type: str, product: str, quantized: bool,
                 ptx_widen: bool) -> list[tuple[str, Any, dict, dict, int, int]]:
    """(name, kernel, pointer types, constexprs, warps, stages) of the three kernels over one cache dtype."""
    import torch
    import triton.language as tl

    from gllm_engine.kernels import attention, rotary

    scale_type = "*fp32" if quantized else cache_type
    pointers = {"k_cache_ptr": cache_type, "v_cache_ptr": cache_type, "k_scale_ptr": scale_type,
                "v_scale_ptr": scale_type, "block_tables_ptr": "*i32", "seq_lens_ptr": "*i32",
                "query_start_loc_ptr": "*i32", "tiles_ptr": "*i32", "part_out_ptr": "*fp32",
                "part_lse_ptr": "*fp32", "pos_ptr": "*i64", "slot_ptr": "*i64", "cos_sin_ptr": "*fp32"}
    products = dict(UPCAST_DOT=False, DOT_PRECISION="tf32", PRODUCT_DTYPE=getattr(tl, product), QUANT=quantized,
                    PTX_WIDEN=ptx_widen)
    decode = attention.decode_config(HEAD_DIM, torch.bfloat16)  # tiles follow the model dtype, bf16 here
    prefill = attention.prefill_config(HEAD_DIM, torch.bfloat16)
    cases = []
    for split in (False, True):
        cases.append((f"decode{' split' if split else ''}", attention._decode_kernel, pointers,
                      dict(GROUP=NUM_HEADS // NUM_KV_HEADS, BLOCK_G=16, HEAD_DIM=HEAD_DIM, BLOCK_D=HEAD_DIM,
                           BLOCK_N=decode.block_n, PAGE_SIZE=BLOCK_SIZE, SPLIT=split, PDL=True, **products),
                      decode.num_warps, decode.num_stages))
    cases.append(("prefill", attention._prefill_kernel, pointers,
                  dict(GROUP=NUM_HEADS // NUM_KV_HEADS, HEAD_DIM=HEAD_DIM, BLOCK_D=HEAD_DIM, BLOCK_M=prefill.block_m,
                       BLOCK_N=prefill.block_n, PAGE_SIZE=BLOCK_SIZE, **products),
                  prefill.num_warps, prefill.num_stages))
    cases.append(("rotary + KV store", rotary._rotary_write_kv_kernel, pointers,
                  dict(NUM_Q_HEADS=NUM_HEADS, NUM_KV_HEADS=NUM_KV_HEADS, HALF=HEAD_DIM // 2,
                       BLOCK_H=rotary.ROPE_BLOCK_H, BLOCK_HALF=HEAD_DIM // 2, PAGE_SIZE=BLOCK_SIZE, HAS_NORM=False,
                       QUANT=quantized, PDL=True),
                  rotary.ROPE_NUM_WARPS, 3))  # Triton's default stages, as it is launched
    return cases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, help="compute capability to compile for (90: Hopper)")
    ap.add_argument("--product-dtype", choices=("bfloat16", "float16"),
                    help="the 8-bit caches' product dtype (default: attention.product_dtype's choice)")
    ap.add_argument("--triton-widen", action="store_true",
                    help="widen the 8-bit tiles by Triton's conversions of the loaded bytes, not by PTX from words")
    args = ap.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)  # compile for the target (read when the kernels are decorated)
    import torch

    from gllm_engine.kernels.attention import product_dtype

    table = Table(title=f"Kernels compiled for sm_{args.arch} (Llama-3-8B heads; SASS instruction counts)")
    for col in ("kernel", "KV cache", "products", "widened by", "registers", "spill bytes", "instructions", "in loop",
                *COUNTED):
        table.add_column(col, justify="left" if col in ("kernel", "KV cache", "products", "widened by") else "right")
    for cache, cache_type, torch_name in CACHES:
        product = str(product_dtype(torch.bfloat16, getattr(torch, torch_name))).removeprefix("torch.")
        if args.product_dtype and cache != "bf16":
            product = args.product_dtype
        ptx_widen = cache != "bf16" and product == "float16" and not args.triton_widen
        widened_by = "-" if cache == "bf16" else "PTX" if ptx_widen else "Triton"
        for name, fn, pointers, constexprs, warps, stages in kernel_cases(cache_type, product, cache == "int8",
                                                                          ptx_widen):
            row = compile_sass(fn, pointers, constexprs, warps, stages, args.arch)
            table.add_row(name, cache, product, "-" if name.startswith("rotary") else widened_by,
                          str(row["registers"]), str(row["stack"]), str(row["instructions"]), str(row["loop"] or "-"),
                          *(str(row[k]) for k in COUNTED))
    Console(width=150).print(table)


if __name__ == "__main__":
    main()
