"""Benchmark workloads: the ShareGPT reader on truncated files, its filter, random and JSONL prompts."""

from __future__ import annotations

import json

import pytest

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
    """One token per whitespace-separated word: lengths are easy to craft."""

    def encode(self, text: str) -> list[int]:
        return [len(w) for w in text.split()]


def conv(prompt_words: int, reply_words: int, first: str = "human") -> dict:
    return {"conversations": [{"from": first, "value": " ".join(["w"] * prompt_words)},
                              {"from": "gpt", "value": " ".join(["r"] * reply_words)}]}


def test_truncated_file_yields_every_complete_record(tmp_path):
    records = [conv(5, 5), conv(6, 6), conv(7, 7)]
    text = json.dumps(records, indent=2)
    cut = text[: text.rindex('"from"')]  # inside the last record
    path = tmp_path / "sharegpt.json"
    path.write_text(cut)
    data = read_sharegpt(path)
    assert data.truncated and len(data.records) == 2
    path.write_text(text)
    whole = read_sharegpt(path)
    assert not whole.truncated and len(whole.records) == 3


def test_packaged_file_is_read_and_reported_truncated():
    data = read_sharegpt()
    assert data.truncated and len(data.records) > 10_000


@pytest.mark.parametrize("record,kept", [
    (conv(10, 10), True),
    (conv(3, 10), False),  # prompt < 4 tokens
    (conv(10, 3), False),  # output < 4 tokens
    (conv(1025, 10), False),  # prompt > 1024
    (conv(1000, 1049), False),  # prompt + output > 2048
    (conv(1000, 1048), True),
    (conv(10, 10, first="gpt"), False),  # must start with a human turn
    ({"conversations": [{"from": "human", "value": "a b c d e"}]}, False),  # no reply
])
def test_filter_rules(record, kept):
    assert len(sample_sharegpt([record], WordTokenizer(), 5)) == int(kept)


def test_sampling_is_seeded_and_stops_at_the_count():
    records = [conv(4 + i, 4 + i) for i in range(50)]
    a = sample_sharegpt(records, WordTokenizer(), 10, seed=0)
    b = sample_sharegpt(records, WordTokenizer(), 10, seed=0)
    c = sample_sharegpt(records, WordTokenizer(), 10, seed=1)
    assert len(a) == 10 and [r.output_len for r in a] == [r.output_len for r in b]
    assert [r.output_len for r in a] != [r.output_len for r in c]
    assert all(len(r.prompt_token_ids) == r.output_len for r in a)


def test_random_lengths_stay_in_range():
    reqs = random_requests(200, 100, 50, range_ratio=0.5, vocab_size=1000, seed=3)
    assert all(50 <= len(r.prompt_token_ids) <= 150 and 25 <= r.output_len <= 75 for r in reqs)
    assert all(0 <= t < 1000 for r in reqs for t in r.prompt_token_ids)
    uni = uniform_requests(100, 100, 1024, vocab_size=500)
    assert all(100 <= len(r.prompt_token_ids) <= 1024 and 100 <= r.output_len <= 1024 for r in uni)
    with pytest.raises(ValueError, match="range_ratio"):
        random_requests(1, 10, 10, range_ratio=1.5)


def test_jsonl_reports_malformed_lines(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "hi"}\nnot json\n{"prompt": ""}\n\n{"prompt": "x", "output_len": 0}\n'
                    '{"prompt": "ok", "output_len": 7}\n')
    out = read_jsonl_prompts(path)
    assert out.prompts == [{"prompt": "hi", "output_len": None}, {"prompt": "ok", "output_len": 7}]
    assert [n for n, _ in out.bad_lines] == [2, 3, 5]


def test_requests_round_trip(tmp_path):
    reqs = random_requests(5, 8, 4, vocab_size=100)
    save_requests(reqs, tmp_path / "r.json")
    back = load_requests(tmp_path / "r.json")
    assert [(r.prompt_token_ids, r.output_len) for r in back] == [(r.prompt_token_ids, r.output_len) for r in reqs]
