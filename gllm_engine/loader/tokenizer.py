"""Tokenizers (transformers) from a directory or a .gguf file, and chat templates as token ids."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from gllm_engine.loader import ModelLoadError
from gllm_engine.loader.gguf_file import open_gguf

# Tokenizer attribute -> the GGUF metadata key holding its token id.
_GGUF_SPECIAL_TOKENS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """The tokenizer in a directory (tokenizer.json, ...) or converted from a .gguf file's metadata.

    A GGUF tokenizer gets the chat template stored in the file.
    """
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"tokenizer path '{path}' does not exist")
    if p.is_file() and p.suffix != ".gguf":
        raise ModelLoadError(f"tokenizer path '{path}' is a file but not a .gguf: pass a directory with "
                             f"tokenizer files or a .gguf file")
    try:
        if p.is_file():
            return _load_gguf_tokenizer(p)
        return AutoTokenizer.from_pretrained(str(p))
    except (OSError, ValueError, KeyError, TypeError, ImportError) as e:
        raise ModelLoadError(f"cannot load a tokenizer from '{path}': {e}") from e


def _load_gguf_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    # The fast-tokenizer class directly: AutoTokenizer would first parse the whole GGUF for a config.
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path.parent), gguf_file=path.name)
    # The file's special-token ids are authoritative (transformers 5.17 takes SmolLM2's
    # <|im_start|> for its eos token).
    metadata = open_gguf(str(path)).metadata
    for attr, key in _GGUF_SPECIAL_TOKENS.items():
        token = tokenizer.convert_ids_to_tokens(int(metadata[key])) if key in metadata else None
        if token is not None:
            setattr(tokenizer, attr, token)
    return tokenizer


def apply_chat_template(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping[str, Any]],
                        chat_template: str | None = None, add_generation_prompt: bool = True) -> list[int]:
    """Token ids of one conversation rendered with `chat_template` (default: the tokenizer's own).

    Raises ValueError when neither a template is given nor the tokenizer has one.
    """
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model's tokenizer has no chat template: pass chat_template (a Jinja template), "
                         "or send a plain prompt instead of chat messages")
    ids: Any = tokenizer.apply_chat_template([dict(m) for m in messages], chat_template=chat_template,
                                             add_generation_prompt=add_generation_prompt, tokenize=True)
    if isinstance(ids, Mapping):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    return [int(t) for t in ids]
