"""What a model argument means: which files, which format, where the tokenizer comes from.

`resolve_model_files` turns a user's model argument (None for the embedded default, a Hugging Face
model directory, a .gguf file, or a directory holding one) into a `ModelFiles`, checking what
exists; `ModelFiles` reads the config, tokenizer, EOS ids and weights from it. Only local paths:
there is no Hub access.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig, PreTrainedTokenizerBase

from gllm_engine.loader import ModelLoadError
from gllm_engine.loader.default_model import default_model_path
from gllm_engine.loader.gguf_file import GGUFFile, open_gguf
from gllm_engine.loader.tokenizer import load_tokenizer

__all__ = ["LOAD_FORMATS", "ModelFiles", "ModelLoadError", "resolve_model_files"]

LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
SAFETENSORS_INDEX = "model.safetensors.index.json"
# GGUF keys whose token ends a generation (llama.cpp also stops at end-of-turn / end-of-message).
_GGUF_EOS_KEYS = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelFiles:
    """A resolved model on disk. `load_format` is "safetensors", "gguf" or "dummy" (random weights)."""

    name: str  # display / served name: the directory's basename, or the GGUF file's stem
    path: str  # absolute path of the HF directory, or of the .gguf file
    load_format: str
    tokenizer_path: str | None  # directory or .gguf file of the tokenizer; None if there is none

    @property
    def is_gguf(self) -> bool:
        return self.path.endswith(".gguf")

    def load_hf_config(self) -> PretrainedConfig:
        """config.json, or the GGUF metadata as an HF config; `architectures` is always set."""
        if self.is_gguf:
            try:
                return self._gguf().hf_config()
            except ValueError as e:
                raise ModelLoadError(str(e)) from e
        try:
            config = AutoConfig.from_pretrained(self.path)
        except (OSError, ValueError, KeyError) as e:
            raise ModelLoadError(f"cannot read {Path(self.path) / 'config.json'}: {e}") from e
        if not getattr(config, "architectures", None):
            raise ModelLoadError(f"{Path(self.path) / 'config.json'} names no `architectures`: add e.g. "
                                 f'"architectures": ["LlamaForCausalLM"]')
        return config

    def load_tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer, with its chat template (a GGUF's comes from its metadata)."""
        if self.tokenizer_path is None:
            raise ModelLoadError(f"model '{self.name}' has no tokenizer files ({', '.join(TOKENIZER_FILES)}) in "
                                 f"{self.path}: pass a tokenizer path, or skip the tokenizer and send token ids")
        return load_tokenizer(self.tokenizer_path)

    def eos_token_ids(self, tokenizer: PreTrainedTokenizerBase | None = None) -> tuple[int, ...]:
        """Token ids that end a generation: the model's own (generation_config.json, else config.json;
        GGUF: its eos/eot/eom metadata), then the tokenizer's eos_token_id. No duplicates."""
        if self.is_gguf:
            metadata = self._gguf().metadata
            ids = [metadata[key] for key in _GGUF_EOS_KEYS if key in metadata]
        else:
            generation = Path(self.path) / "generation_config.json"
            source = generation if generation.is_file() else Path(self.path) / "config.json"
            ids = _as_list(_read_json(source).get("eos_token_id"))
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        return tuple(dict.fromkeys(int(i) for i in ids))

    def iter_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF parameter name, CPU tensor) for every checkpoint tensor, one at a time.

        Safetensors: the shards named by model.safetensors.index.json, else every *.safetensors.
        GGUF: dequantized to float32, in HF names and layouts.
        """
        if self.load_format == "dummy":
            raise ModelLoadError(f"model '{self.name}' uses load_format 'dummy': it has no weights to read")
        if self.is_gguf:
            try:
                yield from self._gguf().iter_hf_weights()
            except (ValueError, NotImplementedError) as e:
                raise ModelLoadError(f"cannot read weights from {self.path}: {e}") from e
            return
        for file in self._safetensors_files():
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)

    def num_weight_bytes(self) -> int:
        """Total bytes of the tensors `iter_weights` yields (roughly, for safetensors: file sizes)."""
        if self.load_format == "dummy":
            return 0
        if self.is_gguf:
            return self._gguf().num_hf_weight_bytes()
        return sum(file.stat().st_size for file in self._safetensors_files())

    def _gguf(self) -> GGUFFile:
        try:
            return open_gguf(self.path)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"cannot read GGUF file {self.path}: {e}") from e

    def _safetensors_files(self) -> list[Path]:
        root = Path(self.path)
        index = root / SAFETENSORS_INDEX
        if not index.is_file():
            return sorted(root.glob("*.safetensors"))
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"{index} has no weight_map: re-save the model, or delete the index to read "
                                 f"every *.safetensors file")
        files = [root / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{index} names shards that are not in {root}: {', '.join(missing[:5])}; "
                                 f"copy the complete model")
        return files


def resolve_model_files(model: str | None, tokenizer: str | None = None, load_format: str = "auto") -> ModelFiles:
    """Decide what `model` is and check that what `load_format` needs exists.

    model: None (the embedded default GGUF), an HF directory (config.json + *.safetensors), a .gguf
    file, or a directory holding exactly one .gguf and no safetensors. load_format "auto" picks
    "gguf" or "safetensors" from that; "dummy" needs only a config (config.json or a GGUF).
    tokenizer: a tokenizer directory or .gguf; by default the model path if it has tokenizer files
    or is a GGUF.
    """
    if load_format not in LOAD_FORMATS:
        raise ModelLoadError(f"load_format must be one of {', '.join(LOAD_FORMATS)}, got {load_format!r}")
    given = default_model_path() if model is None else str(model)
    path = Path(given).expanduser()
    if not path.exists():
        raise ModelLoadError(_missing_model_message(given))
    path = path.resolve()

    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        has_safetensors = any(path.glob("*.safetensors"))
        if load_format == "gguf" or (load_format == "auto" and ggufs and not has_safetensors):
            path = _single_gguf(path, ggufs)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"model path '{given}' is a file but not a .gguf: pass a model directory "
                                 f"(config.json + *.safetensors) or a .gguf file")
        if load_format == "safetensors":
            raise ModelLoadError(f"load_format 'safetensors' was asked for, but '{given}' is a GGUF file: use "
                                 f"load_format 'gguf' (or 'auto')")
        fmt = "dummy" if load_format == "dummy" else "gguf"
        name, default_tokenizer = path.stem, str(path)
    else:
        fmt = "safetensors" if load_format == "auto" else load_format
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"no config.json in '{given}': a model directory needs the Hugging Face "
                                 f"config.json next to its *.safetensors")
        if fmt == "safetensors" and not has_safetensors:
            raise ModelLoadError(f"no weights in '{given}': expected *.safetensors files (PyTorch .bin "
                                 f"checkpoints are not supported; convert them), or use load_format 'dummy' "
                                 f"for random weights")
        has_tokenizer = any((path / f).is_file() for f in TOKENIZER_FILES)
        name, default_tokenizer = path.name, (str(path) if has_tokenizer else None)

    tokenizer_path = default_tokenizer
    if tokenizer is not None:
        tok = Path(tokenizer).expanduser()
        if not tok.exists():
            raise ModelLoadError(f"tokenizer path '{tokenizer}' does not exist: pass a directory with "
                                 f"tokenizer files or a .gguf file")
        tokenizer_path = str(tok.resolve())
    return ModelFiles(name=name, path=str(path), load_format=fmt, tokenizer_path=tokenizer_path)


def _single_gguf(directory: Path, ggufs: list[Path]) -> Path:
    if len(ggufs) == 1:
        return ggufs[0]
    if not ggufs:
        raise ModelLoadError(f"load_format 'gguf' was asked for, but there is no .gguf file in '{directory}'")
    names = ", ".join(p.name for p in ggufs[:5])
    raise ModelLoadError(f"'{directory}' holds {len(ggufs)} .gguf files ({names}): pass the one to load")


def _missing_model_message(given: str) -> str:
    message = f"model path '{given}' does not exist"
    if _HUB_ID.match(given):
        local = given.rsplit("/", 1)[1]
        return (f"{message}: gLLM loads local paths only (it has no Hugging Face Hub access). Download the "
                f"model first, e.g. `hf download {given} --local-dir {local}`, then pass that directory")
    return f"{message}: pass a model directory (config.json + *.safetensors) or a .gguf file"


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot parse {path}: {e}") from e
    return data if isinstance(data, dict) else {}


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]
