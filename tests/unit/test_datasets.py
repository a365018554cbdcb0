"""Benchmark workloads: the ShareGPT reader on truncated files, its filter, random and JSONL prompts."""

from __future__ import annotations

import json

import pytest

from gllm_cli import datasets
from gllm_cli.datasets import (
    load_requests,
    random_requests,
    read_jsonl_prompts,
    read_sharegpt,
    sample_sharegpt,
    save_requests,
    uniform_requests,
)


class WordTokenizer:
    """One token per whitespace-separated word: lengths are easy to craft. Counts its calls."""

    def __init__(self):
        self.calls = 0

    def encode(self, text: str) -> list[int]:
        self.calls += 1
        return [len(w) for w in text.split()]


def conv(prompt_words: int, reply_words: int, first: str = "human") -> dict:
    return {"conversations": [{"from": first, "value": " ".join(["w"] * prompt_words)},
                              {"from": "gpt", "value": " ".join(["r"] * reply_words)}]}


@pytest.fixture(params=[7, 1 << 22], ids=["tiny-chunks", "default-chunks"])
def chunk_chars(request, monkeypatch):
    monkeypatch.setattr(datasets, "READ_CHUNK_CHARS", request.param)
    return request.param


def test_complete_file_reads_every_record(tmp_path, chunk_chars):
    records = [conv(5, 5), {"id": "ü→", "conversations": []}, conv(7, 7), 12345, "x, ]"]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(records, indent=1, ensure_ascii=False), encoding="utf-8")
    data = read_sharegpt(path)
    assert data.records == records and not data.truncated


def test_truncated_file_yields_every_complete_record(tmp_path, chunk_chars):
    records = [conv(5, 5), conv(6, 6), conv(7, 7)]
    text = json.dumps(records, indent=2)
    last = text.rindex("{", 0, text.rindex('"conversations"'))  # where the third record starts
    path = tmp_path / "sharegpt.json"
    for cut in range(last, len(text) - 2):  # every cut from the third record's start to just before its end
        path.write_text(text[:cut])
        data = read_sharegpt(path)
        assert data.truncated and data.records == records[:2], cut
    path.write_text(text[:-1])  # all three records, no closing bracket
    data = read_sharegpt(path)
    assert data.truncated and data.records == records


def test_malformed_record_before_the_end_is_an_error(tmp_path, chunk_chars):
    path = tmp_path / "bad.json"
    path.write_text('[{"a": 1}, {"a": nope}, {"a": 3}]')
    with pytest.raises(ValueError, match="element 2"):
        read_sharegpt(path)
    path.write_text('{"not": "an array"}')
    with pytest.raises(ValueError, match="not a JSON array"):
        read_sharegpt(path)


def test_packaged_file_is_read_and_reported_truncated():
    data = read_sharegpt()
    assert data.truncated and len(data.records) > 10_000
    assert all(isinstance(r, dict) and "conversations" in r for r in data.records[:100])


@pytest.mark.parametrize("record,kept", [
    (conv(10, 10), True),
    (conv(4, 4), True),  # both at the minimum
    (conv(3, 10), False),  # prompt < 4 tokens
    (conv(10, 3), False),  # output < 4 tokens
    (conv(1025, 10), False),  # prompt > 1024
    (conv(1024, 1024), True),  # prompt at the limit, total at the limit
    (conv(1000, 1049), False),  # prompt + output > 2048
    (conv(1000, 1048), True),
    (conv(10, 10, first="gpt"), False),  # must start with a human turn
    ({"conversations": [{"from": "human", "value": "a b c d e"}]}, False),  # no reply
    ({"conversations": [{"from": "human", "value": "a b c d e"}, {"from": "gpt", "value": None}]}, False),
    ({"id": "no conversations"}, False),
    ("not a record", False),
])
def test_filter_rules(record, kept):
    picked = sample_sharegpt([record], WordTokenizer(), 5)
    assert len(picked) == int(kept)
    if kept:
        turns = record["conversations"]
        assert picked[0].prompt == turns[0]["value"]
        assert len(picked[0].prompt_token_ids) == len(turns[0]["value"].split())
        assert picked[0].output_len == len(turns[1]["value"].split())


def test_output_len_override_still_filters():
    assert [r.output_len for r in sample_sharegpt([conv(10, 1)], WordTokenizer(), 1, output_len=12)] == [12]
    assert sample_sharegpt([conv(1000, 10)], WordTokenizer(), 1, output_len=1049) == []


def test_tokenizes_lazily():
    tok = WordTokenizer()
    sample_sharegpt([conv(8, 8) for _ in range(50)], tok, 1)
    assert tok.calls == 2  # one prompt and its reply: the first record visited passes
    tok = WordTokenizer()
    sample_sharegpt([conv(2, 8)], tok, 1)
    assert tok.calls == 1  # a prompt under the minimum: its reply is never tokenized


def test_sampling_is_seeded_and_stops_at_the_count():
    records = [conv(4 + i, 4 + i) for i in range(50)]
    a = sample_sharegpt(records, WordTokenizer(), 10, seed=0)
    b = sample_sharegpt(records, WordTokenizer(), 10, seed=0)
    c = sample_sharegpt(records, WordTokenizer(), 10, seed=1)
    assert len(a) == 10 and [r.output_len for r in a] == [r.output_len for r in b]
    assert [r.output_len for r in a] != [r.output_len for r in c]
    assert all(len(r.prompt_token_ids) == r.output_len for r in a)
    assert len(sample_sharegpt(records, WordTokenizer(), 80)) == 50  # fewer when the data runs out


def test_random_lengths_stay_in_range():
    reqs = random_requests(200, 100, 50, range_ratio=0.5, vocab_size=1000, seed=3)
    in_lens, out_lens = [len(r.prompt_token_ids) for r in reqs], [r.output_len for r in reqs]
    assert all(50 <= n <= 150 for n in in_lens) and all(25 <= n <= 75 for n in out_lens)
    assert max(in_lens) - min(in_lens) > 50  # the range is used, not just its middle
    assert all(0 <= t < 1000 for r in reqs for t in r.prompt_token_ids)
    fixed = random_requests(20, 30, 7, vocab_size=100)
    assert {len(r.prompt_token_ids) for r in fixed} == {30} and {r.output_len for r in fixed} == {7}
    assert [r.prompt_token_ids for r in random_requests(5, 8, 4, seed=1)] == \
        [r.prompt_token_ids for r in random_requests(5, 8, 4, seed=1)]
    uni = uniform_requests(100, 100, 1024, vocab_size=500)
    assert all(100 <= len(r.prompt_token_ids) <= 1024 and 100 <= r.output_len <= 1024 for r in uni)
    with pytest.raises(ValueError, match="range_ratio"):
        random_requests(1, 10, 10, range_ratio=1.5)
    with pytest.raises(ValueError, match="input_len"):
        random_requests(1, 0, 10)


def test_jsonl_reports_malformed_lines(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"prompt": "hi"}\nnot json\n{"prompt": ""}\n\n{"prompt": "x", "output_len": 0}\n'
                     b'{"prompt": "ok", "output_len": 7}\n\xff\xfe\n{"prompt": "y", "output_len": true}\n[1]\n'
                 b'{"prompt_token_ids": [5, 6], "output_len": 3}\n{"prompt_token_ids": []}\n'
                 b'{"prompt_token_ids": [1, -2]}\n')
    out = read_jsonl_prompts(path)
    assert out.prompts == [{"prompt": "hi", "prompt_token_ids": None, "output_len": None},
                           {"prompt": "ok", "prompt_token_ids": None, "output_len": 7},
                           {"prompt": None, "prompt_token_ids": [5, 6], "output_len": 3}]
    assert [n for n, _ in out.bad_lines] == [2, 3, 5, 7, 8, 9, 11, 12]
    reasons = dict(out.bad_lines)
    assert "not JSON" in reasons[2] and "prompt" in reasons[3] and "output_len" in reasons[5]
    assert "UTF-8" in reasons[7] and "output_len" in reasons[8] and "prompt" in reasons[9]
    assert "token ids" in reasons[11] and "token ids" in reasons[12]


def test_requests_round_trip(tmp_path):
    reqs = random_requests(5, 8, 4, vocab_size=100)
    save_requests(reqs, tmp_path / "r.json")
    back = load_requests(tmp_path / "r.json")
    assert [(r.prompt_token_ids, r.output_len) for r in back] == [(r.prompt_token_ids, r.output_len) for r in reqs]
