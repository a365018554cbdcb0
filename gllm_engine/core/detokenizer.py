"""Incremental detokenization and stop strings.

Text is decoded over a short window of recent tokens: the window's earlier part gives context
(leading spaces, merged bytes) and only what extends past it is new. Text ending in the Unicode
replacement character is held back until the following tokens complete the character.
"""

from __future__ import annotations

from typing import Any

from gllm_engine.core.request import Sequence


def decode_new_text(tokenizer: Any, seq: Sequence) -> str:
    """Append the text of `seq`'s newest output tokens to `seq.text` and return the added part."""
    out = seq.output_token_ids
    skip = seq.params.skip_special_tokens
    prefix = tokenizer.decode(out[seq.prefix_offset:seq.read_offset], skip_special_tokens=skip)
    full = tokenizer.decode(out[seq.prefix_offset:], skip_special_tokens=skip)
    if len(full) <= len(prefix) or full.endswith("\ufffd"):
        return ""
    new_text = full[len(prefix):]
    seq.prefix_offset, seq.read_offset = seq.read_offset, len(out)
    seq.text += new_text
    return new_text


def find_stop_string(seq: Sequence, num_new_chars: int) -> str | None:
    """If a stop string appears in the newest text, cut `seq.text` before it and return the string."""
    stops = seq.params.stop
    if not stops or num_new_chars == 0:
        return None
    longest = max(len(s) for s in stops)
    search_from = max(0, len(seq.text) - num_new_chars - longest + 1)
    hits = [(seq.text.find(s, search_from), s) for s in stops]
    hits = [(i, s) for i, s in hits if i >= 0]
    if not hits:
        return None
    index, stop = min(hits)
    seq.text = seq.text[:index]
    return stop
