"""The kernel set a model runs with: Triton kernels on CUDA, their pure-torch references elsewhere.

Chosen once per engine and handed to every layer at construction, so no layer decides on its own
and a debugging run can force the references on the GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gllm_engine.kernels import reference


@dataclass(frozen=True)
class KernelOps:
    """Callables with the signatures of `gllm_engine.kernels.reference` (`linear`: of `F.linear`)."""

    name: str
    linear: Callable
    paged_prefill_attention: Callable
    prefill_block_m: Callable
    paged_decode_attention: Callable
    rms_norm: Callable
    linear_silu_and_mul: Callable
    qkv_rotary_write_kv: Callable
    argmax: Callable


REFERENCE_OPS = KernelOps(
    name="torch",
    linear=F.linear,
    paged_prefill_attention=reference.paged_prefill_attention,
    prefill_block_m=reference.prefill_block_m,
    paged_decode_attention=reference.paged_decode_attention,
    rms_norm=reference.rms_norm,
    linear_silu_and_mul=reference.linear_silu_and_mul,
    qkv_rotary_write_kv=reference.qkv_rotary_write_kv,
    argmax=reference.argmax,
)


def select_ops(device: torch.device, use_reference_kernels: bool = False, attention_backend: str = "triton"
               ) -> KernelOps:
    """Triton kernels on CUDA unless references are forced; references (and `F.linear`) on every other device.

    With `attention_backend="flash-attn"` (`config.resolve_attention_backend` decides), the paged
    attention comes from the flash-attn package and the rest from Triton.
    """
    if device.type != "cuda" or use_reference_kernels:
        return REFERENCE_OPS
    from gllm_engine.kernels import attention, flash, linear, norm, sampling

    flash_attn = attention_backend == "flash-attn"
    return KernelOps(
        name="flash-attn" if flash_attn else "triton",
        linear=linear.linear,
        paged_prefill_attention=flash.paged_prefill_attention if flash_attn else attention.paged_prefill_attention,
        prefill_block_m=attention.prefill_block_m,
        paged_decode_attention=flash.paged_decode_attention if flash_attn else attention.paged_decode_attention,
        rms_norm=norm.rms_norm,
        linear_silu_and_mul=linear.linear_silu_and_mul,
        qkv_rotary_write_kv=linear.qkv_rotary_write_kv,
        argmax=sampling.argmax,
    )
