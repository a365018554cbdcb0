"""A GGUF file: its metadata, tensor table and dequantized tensors with HF names and layouts.

The metadata is parsed with `struct` straight from a memory map (a 100 MB file with a 49k-token
vocabulary takes ~0.1 s, against ~3 s for `gguf.GGUFReader`); tensor data stays in the map until
`dequantize` reads it. Block formats are decoded by the `gguf` package.

Names and layouts follow transformers' GGUF loading for the dense Llama family (llama, mistral as
"llama", qwen2, qwen3): llama.cpp stores the q/k rows of "llama" models interleaved for its rotary
kernel, and `_unpermute_rows` undoes that exactly as transformers does.
"""

from __future__ import annotations

import mmap
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import gguf
import numpy as np
import torch
import transformers.integrations.ggml as hf_ggml
from transformers import PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

_MAGIC = b"GGUF"
_STRING, _ARRAY = 8, 9
# GGUF value type -> (struct format, numpy dtype) for scalar types.
_SCALARS: dict[int, tuple[str, Any]] = {
    0: ("B", np.uint8), 1: ("b", np.int8), 2: ("H", np.uint16), 3: ("h", np.int16),
    4: ("I", np.uint32), 5: ("i", np.int32), 6: ("f", np.float32), 7: ("?", np.bool_),
    10: ("Q", np.uint64), 11: ("q", np.int64), 12: ("d", np.float64),
}
_DEFAULT_ALIGNMENT = 32

# GGUF tensor name (without ".weight"/".bias") -> HF module name; "{}" is the layer index.
_HF_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "blk.{}.attn_norm": "model.layers.{}.input_layernorm",
    "blk.{}.ffn_norm": "model.layers.{}.post_attention_layernorm",
    "blk.{}.attn_q": "model.layers.{}.self_attn.q_proj",
    "blk.{}.attn_k": "model.layers.{}.self_attn.k_proj",
    "blk.{}.attn_v": "model.layers.{}.self_attn.v_proj",
    "blk.{}.attn_output": "model.layers.{}.self_attn.o_proj",
    "blk.{}.attn_q_norm": "model.layers.{}.self_attn.q_norm",
    "blk.{}.attn_k_norm": "model.layers.{}.self_attn.k_norm",
    "blk.{}.ffn_gate": "model.layers.{}.mlp.gate_proj",
    "blk.{}.ffn_up": "model.layers.{}.mlp.up_proj",
    "blk.{}.ffn_down": "model.layers.{}.mlp.down_proj",
}
# GGUF architecture -> HF model_type, where they differ.
_MODEL_TYPES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}
# Tensors llama.cpp keeps for itself (precomputed rope frequencies); HF models have no such weight.
_SKIPPED = {"rope_freqs"}
_LAYER = re.compile(r"^blk\.(\d+)\.")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order (GGUF lists dimensions fastest-moving first)
    ggml_type: int
    offset: int  # absolute byte offset of the data in the file


class GGUFFile:
    """A parsed GGUF file (little-endian, version 2 or 3). Raises ValueError if it is not one."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            self._buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        if self._buf[:4] != _MAGIC:
            raise ValueError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
        self.metadata: dict[str, Any] = {}
        self.tensors: list[TensorInfo] = []
        try:
            self._parse()
        except struct.error as e:
            raise ValueError(f"{path} is truncated or corrupt ({e})") from e

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def arch_value(self, key: str, default: Any = None) -> Any:
        """An architecture-scoped metadata value, e.g. arch_value("attention.head_count")."""
        return self.metadata.get(f"{self.architecture}.{key}", default)

    def hf_config(self) -> PretrainedConfig:
        """The HF config transformers builds from this file's metadata, plus `architectures`.

        Uses transformers' own key tables (GGUF_CONFIG_MAPPING), so it matches
        `AutoConfig.from_pretrained(dir, gguf_file=...)` without reparsing the file.
        """
        arch = self.architecture
        model_type = _MODEL_TYPES.get(arch, arch)
        tables = hf_ggml.GGUF_CONFIG_MAPPING
        if model_type not in tables:
            raise ValueError(f"{self.path}: GGUF architecture {arch!r} is not supported "
                             f"(gLLM reads dense llama, qwen2 and qwen3 GGUF files)")
        values: dict[str, Any] = {}
        for key, value in self.metadata.items():
            section, _, rest = key.partition(".")
            table = tables.get(model_type if section == arch else section, {})
            if section in ("general", "tokenizer", arch) and table.get(rest) not in (None, -1):
                values[table[rest]] = value
        values["model_type"] = model_type
        for key, value in getattr(hf_ggml, "GGUF_CONFIG_DEFAULTS_MAPPING", {}).get(model_type, {}).items():
            values.setdefault(key, value)
        values["tie_word_embeddings"] = all(t.name != "output.weight" for t in self.tensors)
        if "vocab_size" not in values and "tokenizer.ggml.tokens" in self.metadata:
            values["vocab_size"] = len(self.metadata["tokenizer.ggml.tokens"])
        if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            values.setdefault("architectures", [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]])
        return CONFIG_MAPPING[model_type].from_dict(values)

    def dequantize(self, info: TensorInfo) -> torch.Tensor:
        """The tensor as float32, shaped `info.shape`, in a fresh (writable) CPU tensor."""
        qtype = gguf.GGMLQuantizationType(info.ggml_type)
        block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        row_elems = info.shape[-1]
        row_bytes = row_elems // block_elems * block_bytes
        num_bytes = int(np.prod(info.shape)) // row_elems * row_bytes
        raw = np.frombuffer(self._buf, dtype=np.uint8, count=num_bytes, offset=info.offset)
        values = gguf.dequantize(raw.reshape(-1, row_bytes), qtype)  # [rows, row_elems]
        if not values.flags.writeable:  # F32 data is a view of the read-only map
            values = values.copy()
        return torch.from_numpy(values).reshape(info.shape)

    def iter_hf_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF parameter name, float32 tensor in HF layout) for every weight, one at a time."""
        unpermute = self.architecture == "llama"
        heads = self.arch_value("attention.head_count")
        kv_heads = self.arch_value("attention.head_count_kv", heads)
        for info in self.tensors:
            name = hf_tensor_name(info.name)
            if name is None:
                continue
            tensor = self.dequantize(info)
            if unpermute and ".self_attn.q_proj." in name:
                tensor = _unpermute_rows(tensor, heads)
            elif unpermute and ".self_attn.k_proj." in name:
                tensor = _unpermute_rows(tensor, kv_heads)
            yield name, tensor

    def num_hf_weight_bytes(self) -> int:
        """Bytes of the float32 tensors `iter_hf_weights` yields."""
        return sum(4 * int(np.prod(t.shape)) for t in self.tensors if t.name.split(".")[0] not in _SKIPPED)

    # ---- parsing -------------------------------------------------------------------------------

    def _parse(self) -> None:
        version, num_tensors, num_kv = struct.unpack_from("<IQQ", self._buf, 4)
        if version not in (2, 3):
            raise ValueError(f"{self.path}: GGUF version {version} is not supported (only little-endian v2 and v3)")
        self._pos = 24
        for _ in range(num_kv):
            key = self._string()
            self.metadata[key] = self._value(self._unpack("I"))
        table = []
        for _ in range(num_tensors):
            name = self._string()
            dims = struct.unpack_from(f"<{self._unpack('I')}Q", self._buf, self._pos)
            self._pos += 8 * len(dims)
            ggml_type, offset = self._unpack("I"), self._unpack("Q")
            table.append((name, tuple(reversed(dims)), ggml_type, offset))
        alignment = int(self.metadata.get("general.alignment", _DEFAULT_ALIGNMENT))
        data_start = -(-self._pos // alignment) * alignment
        self.tensors = [TensorInfo(name, shape, t, data_start + off) for name, shape, t, off in table]

    def _unpack(self, fmt: str) -> Any:
        (value,) = struct.unpack_from("<" + fmt, self._buf, self._pos)
        self._pos += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        n = self._unpack("Q")
        text = self._buf[self._pos:self._pos + n].decode("utf-8", errors="replace")
        self._pos += n
        return text

    def _value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self._string()
        if vtype == _ARRAY:
            item_type, count = self._unpack("I"), self._unpack("Q")
            if item_type in _SCALARS:  # numeric arrays (scores, token types) in one read
                dtype = np.dtype(_SCALARS[item_type][1]).newbyteorder("<")
                values = np.frombuffer(self._buf, dtype=dtype, count=count, offset=self._pos)
                self._pos += values.nbytes
                return values.tolist()
            return [self._value(item_type) for _ in range(count)]
        if vtype not in _SCALARS:
            raise ValueError(f"{self.path}: unknown GGUF metadata value type {vtype}")
        return self._unpack(_SCALARS[vtype][0])


def hf_tensor_name(gguf_name: str) -> str | None:
    """The HF parameter name of a GGUF tensor; None for llama.cpp-only tensors. ValueError if unknown."""
    stem, _, suffix = gguf_name.rpartition(".")
    if stem in _SKIPPED:
        return None
    match = _LAYER.match(stem)
    key = _LAYER.sub("blk.{}.", stem) if match else stem
    if key not in _HF_NAMES:
        raise ValueError(f"GGUF tensor {gguf_name!r} has no counterpart in gLLM's dense Llama-family models")
    module = _HF_NAMES[key].format(match.group(1)) if match else _HF_NAMES[key]
    return f"{module}.{suffix}"


def _unpermute_rows(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order. `w` is [heads * 2 * half, ...].

    Per head, HF keeps the two rotary halves one after the other; llama.cpp interleaves them
    (row i of the first half, then row i of the second), so rows view as [heads, half, 2, ...].
    """
    half = w.shape[0] // num_heads // 2
    return w.reshape(num_heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()


@lru_cache(maxsize=4)
def open_gguf(path: str) -> GGUFFile:
    """The parsed file at `path`, shared by config, tokenizer and weight loading."""
    return GGUFFile(path)
