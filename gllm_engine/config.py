"""Engine configuration: frozen dataclasses, resolved and validated once in `EngineConfig.create`.

Nothing below this module reads argv or environment variables; every default lives here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from gllm_engine.kernels import flash
from gllm_engine.loader.model_files import ModelFiles, resolve_model_files

_DTYPES = {
    "float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
}
LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
ATTENTION_BACKENDS = ("auto", "triton", "flash-attn")
# "auto": the model dtype; "fp8" (= "fp8_e4m3"): float8 e4m3, unscaled, values beyond +-448 saturate;
# "int8": int8 with one float32 scale per token and KV head (its largest |value| becomes 127)
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "int8")
KV_CACHE_TORCH_DTYPES = {  # the 8-bit caches; "auto" is the model dtype
    "fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "int8": torch.int8}
DEFAULT_BLOCK_SIZE = 16
# Default KV-cache budget on the CPU, in GiB (the CPU has no memory profiling pass).
DEFAULT_CPU_KV_CACHE_GIB = 4.0
# Sequences per step when not given: a GPU step reads all the weights once whatever its batch, so more
# sequences per step raise throughput (ShareGPT on an H200: +10% from 256 to 512, +7% more at 1,024;
# benchmarks/RESULTS.md).
DEFAULT_MAX_NUM_SEQS = 256
GPU_MAX_NUM_SEQS = 1024


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the option and the reason."""


@dataclass(frozen=True)
class ModelConfig:
    """The model to serve: where its files are, its HF config, dtype and context length."""

    files: ModelFiles
    hf_config: Any
    dtype: torch.dtype
    max_model_len: int
    load_format: str
    seed: int
    skip_tokenizer_init: bool = False

    @property
    def architecture(self) -> str:
        archs = getattr(self.hf_config, "architectures", None) or []
        return archs[0] if archs else ""

    @property
    def name(self) -> str:
        return self.files.name


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache: block size and how much memory it may take."""

    block_size: int = DEFAULT_BLOCK_SIZE
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: int | None = None
    cpu_kv_cache_gib: float = DEFAULT_CPU_KV_CACHE_GIB
    enable_prefix_caching: bool = True
    kv_cache_dtype: torch.dtype | None = None  # None: the model's dtype

    def dtype_for(self, model_dtype: torch.dtype) -> torch.dtype:
        """The dtype the KV cache is stored in for a model computing in `model_dtype`."""
        return self.kv_cache_dtype or model_dtype


@dataclass(frozen=True)
class ThrottleConfig:
    """Token-throttling knobs (names and defaults from the gLLM reference implementation)."""

    maxd: int = 512  # decodes per micro-batch at most
    maxp: int = 8192  # prefill tokens per micro-batch at most
    minp: int = 32  # prefill tokens per micro-batch at least, while several sequences wait
    iterp: int = 8  # spread waiting prefill over about this many iterations
    init_new_token_ratio: float = 0.7  # share of remaining output tokens reserved for running decodes
    min_new_token_ratio: float = 0.1
    new_token_ratio_step: float = 0.05  # added after a preemption
    new_token_ratio_decay: float = 0.002  # subtracted every scheduling step


SCHEDULE_METHODS = ("auto", "chunked_prefill", "token_throttling")
SCHEDULING_POLICIES = ("fcfs", "longest_first")  # admission order: see core.waiting_queue
# longest_first holds no admission back while fewer than this many sequences run: about the decode batch
# whose matmuls take as long as streaming the weights (~230 rows for bf16 on an H100), so running that
# many costs a step little more than running one.
LONGEST_FIRST_MIN_RUNNING = 256


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits: sequences per step and the per-step token budget."""

    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    enable_chunked_prefill: bool = True
    # "chunked_prefill" (every ready decode, prefill fills the budget) or "token_throttling".
    schedule_method: str = "chunked_prefill"
    throttle: ThrottleConfig = field(default_factory=ThrottleConfig)
    # On one rank, plan and launch the next step while the device runs this one.
    async_scheduling: bool = True
    # "fcfs" or "longest_first" (most max_tokens first, admissions leveled over the longest one's steps).
    scheduling_policy: str = "fcfs"
    longest_first_min_running: int = LONGEST_FIRST_MIN_RUNNING


@dataclass(frozen=True)
class ParallelConfig:
    """Ranks = tensor x pipeline parallel, spread over `nnodes` machines joined at master_addr:port.

    `expert_parallel_size` adds no ranks: it spreads the routed experts of MoE layers over each
    stage's tensor-parallel ranks (see layers/moe.py): ep == tp gives every rank whole experts,
    1 < ep < tp makes groups of tp / ep ranks that split their experts as tensor parallelism does.
    """

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    pp_layer_split: tuple[int, ...] | None = None  # layers per stage; None = even split
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int | None = None  # None: a free port (single node only)
    expert_parallel_size: int = 1  # divides tensor_parallel_size

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


@dataclass(frozen=True)
class DeviceConfig:
    """Where the model runs and which kernels it runs with."""

    device: torch.device
    enforce_eager: bool = False
    # Force the pure-torch reference kernels even where Triton kernels exist (debugging aid).
    use_reference_kernels: bool = False
    attention_backend: str = "triton"  # or "flash-attn" (resolve_attention_backend)


@dataclass(frozen=True)
class EngineConfig:
    """Every setting of an engine, resolved and validated: build it with `EngineConfig.create`."""

    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    device: DeviceConfig = field(default_factory=lambda: DeviceConfig(torch.device("cpu")))

    @classmethod
    def create(
        cls,
        model: str | None = None,
        *,
        tokenizer: str | None = None,
        dtype: str = "auto",
        device: str = "auto",
        max_model_len: int | None = None,
        block_size: int | None = None,
        gpu_memory_utilization: float = 0.9,
        num_gpu_blocks_override: int | None = None,
        cpu_kv_cache_gib: float = DEFAULT_CPU_KV_CACHE_GIB,
        enable_prefix_caching: bool = True,
        kv_cache_dtype: str = "auto",
        max_num_seqs: int | None = None,
        max_num_batched_tokens: int | None = None,
        enable_chunked_prefill: bool = True,
        enforce_eager: bool = False,
        use_reference_kernels: bool = False,
        attention_backend: str = "auto",
        load_format: str = "auto",
        seed: int = 0,
        skip_tokenizer_init: bool = False,
        tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
        expert_parallel_size: int = 1,
        pp_layer_split: list[int] | None = None,
        schedule_method: str = "auto",
        scheduling_policy: str = "fcfs",
        longest_first_min_running: int = LONGEST_FIRST_MIN_RUNNING,
        throttle: ThrottleConfig | None = None,
        async_scheduling: bool = True,
        nnodes: int = 1,
        node_rank: int = 0,
        master_addr: str = "127.0.0.1",
        master_port: int | None = None,
    ) -> EngineConfig:
        """Resolve defaults (device, dtype, context length, token budget) and validate every option."""
        if load_format not in LOAD_FORMATS:
            raise ConfigError(f"load_format must be one of {', '.join(LOAD_FORMATS)}, got {load_format!r}")
        torch_device = _resolve_device(device)
        if attention_backend not in ATTENTION_BACKENDS:
            raise ConfigError(f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, "
                              f"got {attention_backend!r}")
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {kv_cache_dtype!r}")
        cache_dtype = KV_CACHE_TORCH_DTYPES.get(kv_cache_dtype)
        if max_num_seqs is None:
            max_num_seqs = GPU_MAX_NUM_SEQS if torch_device.type == "cuda" else DEFAULT_MAX_NUM_SEQS
        for name, value in (("block_size", DEFAULT_BLOCK_SIZE if block_size is None else block_size),
                            ("max_num_seqs", max_num_seqs),
                            ("longest_first_min_running", longest_first_min_running),
                            ("tensor_parallel_size", tensor_parallel_size),
                            ("pipeline_parallel_size", pipeline_parallel_size),
                            ("expert_parallel_size", expert_parallel_size)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        if not 0.0 < gpu_memory_utilization <= 1.0:
            raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        if num_gpu_blocks_override is not None and num_gpu_blocks_override < 1:
            raise ConfigError(f"num_gpu_blocks_override must be >= 1, got {num_gpu_blocks_override}")
        if cpu_kv_cache_gib <= 0:
            raise ConfigError(f"cpu_kv_cache_gib must be > 0, got {cpu_kv_cache_gib}")
        if schedule_method not in SCHEDULE_METHODS:
            raise ConfigError(f"schedule_method must be one of {', '.join(SCHEDULE_METHODS)}, got {schedule_method!r}")
        if scheduling_policy not in SCHEDULING_POLICIES:
            raise ConfigError(f"scheduling_policy must be one of {', '.join(SCHEDULING_POLICIES)}, "
                              f"got {scheduling_policy!r}")
        if schedule_method == "auto":
            schedule_method = "token_throttling" if pipeline_parallel_size > 1 else "chunked_prefill"
        world = tensor_parallel_size * pipeline_parallel_size
        if nnodes < 1 or not 0 <= node_rank < nnodes:
            raise ConfigError(f"node_rank must be in [0, nnodes) = [0, {nnodes}), got {node_rank}")
        if world % nnodes:
            raise ConfigError(f"tensor_parallel_size x pipeline_parallel_size ({world}) must be divisible by "
                              f"nnodes ({nnodes})")
        if nnodes > 1 and master_port is None:
            raise ConfigError("master_port is required when nnodes > 1 (every node must use the same one)")

        files = resolve_model_files(model, tokenizer=tokenizer, load_format=load_format)
        hf_config = files.load_hf_config()
        _check_parallel_fit(hf_config, tensor_parallel_size, pipeline_parallel_size, pp_layer_split)
        _check_expert_parallel_fit(hf_config, tensor_parallel_size, expert_parallel_size)
        torch_dtype = _resolve_dtype(dtype, hf_config, torch_device)
        attention_backend = resolve_attention_backend(attention_backend, torch_device, torch_dtype,
                                                      use_reference_kernels, flash.is_available(),
                                                      cache_dtype=cache_dtype)
        block_size = _resolve_block_size(block_size, attention_backend)

        derived_len = _derived_max_model_len(hf_config)
        if max_model_len is None:
            max_model_len = derived_len
        elif max_model_len < 1 or max_model_len > derived_len:
            raise ConfigError(f"max_model_len must be in [1, {derived_len}] for this model "
                              f"(its max_position_embeddings), got {max_model_len}")
        if max_num_batched_tokens is None:
            max_num_batched_tokens = 8192 if enable_chunked_prefill else max(max_model_len, 8192)
        if max_num_batched_tokens < 1:
            raise ConfigError(f"max_num_batched_tokens must be >= 1, got {max_num_batched_tokens}")
        if not enable_chunked_prefill and max_num_batched_tokens < max_model_len:
            raise ConfigError(f"max_num_batched_tokens ({max_num_batched_tokens}) must be >= max_model_len "
                              f"({max_model_len}) when chunked prefill is disabled")
        max_num_batched_tokens = max(max_num_batched_tokens, max_num_seqs) if enable_chunked_prefill \
            else max_num_batched_tokens

        return cls(
            model=ModelConfig(files=files, hf_config=hf_config, dtype=torch_dtype,
                              max_model_len=max_model_len, load_format=files.load_format, seed=seed,
                              skip_tokenizer_init=skip_tokenizer_init),
            cache=CacheConfig(block_size=block_size, gpu_memory_utilization=gpu_memory_utilization,
                              num_gpu_blocks_override=num_gpu_blocks_override,
                              cpu_kv_cache_gib=cpu_kv_cache_gib,
                              enable_prefix_caching=enable_prefix_caching, kv_cache_dtype=cache_dtype),
            scheduler=SchedulerConfig(max_num_seqs=max_num_seqs,
                                      max_num_batched_tokens=max_num_batched_tokens,
                                      max_model_len=max_model_len,
                                      enable_chunked_prefill=enable_chunked_prefill,
                                      schedule_method=schedule_method, throttle=throttle or ThrottleConfig(),
                                      async_scheduling=async_scheduling, scheduling_policy=scheduling_policy,
                                      longest_first_min_running=longest_first_min_running),
            parallel=ParallelConfig(tensor_parallel_size, pipeline_parallel_size,
                                    tuple(pp_layer_split) if pp_layer_split else None,
                                    nnodes=nnodes, node_rank=node_rank, master_addr=master_addr,
                                    master_port=master_port, expert_parallel_size=expert_parallel_size),
            device=DeviceConfig(torch_device, enforce_eager=enforce_eager,
                                use_reference_kernels=use_reference_kernels, attention_backend=attention_backend),
        )


def _check_parallel_fit(hf_config: Any, tp: int, pp: int, split: list[int] | None) -> None:
    """Heads must divide over tensor-parallel ranks and layers over pipeline stages."""
    heads = getattr(hf_config, "num_attention_heads", tp)
    if heads % tp:
        raise ConfigError(f"tensor_parallel_size ({tp}) must divide the model's {heads} attention heads")
    kv_heads = getattr(hf_config, "num_key_value_heads", heads) or heads
    if kv_heads % tp and tp % kv_heads:
        raise ConfigError(f"tensor_parallel_size ({tp}) and the model's {kv_heads} KV heads must divide one another")
    layers = getattr(hf_config, "num_hidden_layers", pp)
    if split is not None:
        if len(split) != pp or sum(split) != layers or min(split) < 1:
            raise ConfigError(f"pp_layer_split {list(split)} must have {pp} positive entries summing to the "
                              f"model's {layers} layers")
    elif layers < pp:
        raise ConfigError(f"pipeline_parallel_size ({pp}) is larger than the model's {layers} layers")


def _routed_experts(hf_config: Any) -> tuple[int, int] | None:
    """(number of routed experts, intermediate size of one) of an MoE model; None for a dense one."""
    for key in ("num_experts", "num_local_experts", "n_routed_experts"):
        num = getattr(hf_config, key, None)
        if isinstance(num, int) and num > 0:
            inter = getattr(hf_config, "moe_intermediate_size", None) or hf_config.intermediate_size
            return num, inter
    return None


def _check_expert_parallel_fit(hf_config: Any, tp: int, ep: int) -> None:
    """ep must split each stage's TP ranks, the model must have experts, and they must split over ep groups."""
    if ep == 1:
        return
    if tp % ep:
        raise ConfigError(f"expert_parallel_size ({ep}) must divide tensor_parallel_size ({tp}): experts are "
                          f"spread over each stage's tensor-parallel ranks (e.g. --tp {ep} --ep {ep})")
    experts = _routed_experts(hf_config)
    if experts is None:
        archs = getattr(hf_config, "architectures", None) or [getattr(hf_config, "model_type", "this model")]
        raise ConfigError(f"expert_parallel_size ({ep}) > 1 needs a mixture-of-experts model; {archs[0]} has no "
                          f"routed experts")
    num_experts, inter = experts
    if num_experts % ep:
        raise ConfigError(f"expert_parallel_size ({ep}) must divide the model's {num_experts} experts")
    if inter % (tp // ep):
        raise ConfigError(f"the experts' intermediate size ({inter}) must divide over the {tp // ep} "
                          f"tensor-parallel ranks that share each expert (tensor_parallel_size / "
                          f"expert_parallel_size)")


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}") from e
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for, but no CUDA device is available (try --device cpu)")
    return dev


def resolve_attention_backend(requested: str, device: torch.device, dtype: torch.dtype,
                              use_reference_kernels: bool, flash_attn_installed: bool,
                              cache_dtype: torch.dtype | None = None) -> str:
    """"triton" or "flash-attn" for `requested` ("auto": flash-attn where it can run and is installed).

    flash-attn runs on CUDA in float16/bfloat16 with a cache of that dtype (`cache_dtype` None), and not
    with the reference kernels forced; off CUDA, "triton" means the engine's own kernels, i.e. the torch
    references there.
    """
    usable = (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and not use_reference_kernels
              and cache_dtype is None)
    if requested == "flash-attn":
        if not usable:
            cache = f", a {str(cache_dtype).removeprefix('torch.')} KV cache" if cache_dtype else ""
            raise ConfigError("attention_backend flash-attn needs a CUDA device, float16 or bfloat16, a KV cache "
                              f"of that dtype and the Triton kernels (got {device.type}, "
                              f"{str(dtype).removeprefix('torch.')}{cache}"
                              f"{', reference kernels' if use_reference_kernels else ''})")
        if not flash_attn_installed:
            raise ConfigError("attention_backend flash-attn needs the flash-attn package "
                              "(pip install 'gllm[flash-attn]')")
        return "flash-attn"
    return "flash-attn" if requested == "auto" and usable and flash_attn_installed else "triton"


def _resolve_block_size(block_size: int | None, attention_backend: str) -> int:
    """The KV block size: given, or the backend's default (flash-attn's pages are multiples of 256 tokens)."""
    if attention_backend != "flash-attn":
        return DEFAULT_BLOCK_SIZE if block_size is None else block_size
    if block_size is None:
        return flash.FLASH_ATTN_BLOCK_SIZE
    if block_size % flash.FLASH_ATTN_BLOCK_SIZE:
        raise ConfigError(f"block_size must be a multiple of {flash.FLASH_ATTN_BLOCK_SIZE} with the flash-attn "
                          f"attention backend, got {block_size} (or choose attention_backend triton)")
    return block_size


def _resolve_dtype(dtype: str | torch.dtype, hf_config: Any, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cpu":
            # float32 on the CPU: exact parity with transformers and no slow bf16 matmuls.
            return torch.float32
        cfg_dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
        if isinstance(cfg_dtype, str):
            cfg_dtype = _DTYPES.get(cfg_dtype)
        return torch.bfloat16 if cfg_dtype in (None, torch.float32) else cfg_dtype
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype must be one of auto, float32, bfloat16, float16, got {dtype!r}")
    return _DTYPES[dtype]


def _derived_max_model_len(hf_config: Any) -> int:
    """The model's context length; with sliding-window attention (not implemented), the window."""
    length = 2048
    for key in ("max_position_embeddings", "max_sequence_length", "seq_length"):
        value = getattr(hf_config, key, None)
        if isinstance(value, int) and value > 0:
            length = value
            break
    window = getattr(hf_config, "sliding_window", None)
    uses_window = getattr(hf_config, "use_sliding_window", hf_config.model_type == "mistral")
    if uses_window and isinstance(window, int) and 0 < window < length:
        length = window
    return length
