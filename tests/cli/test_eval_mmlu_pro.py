"""`gllm eval mmlu-pro` on small MMLU-Pro-format files made here: against a fake OpenAI server whose replies each
question chooses (so the arithmetic is known), and in-process on the tiny model."""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections.abc import Iterator

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from gllm_cli.eval_mmlu_pro import extract_answer
from tests.helpers import serve_app, table_cells

REPLY = re.compile(r"<<(.*?)>>")  # a test question carries the reply the fake server gives to it
FAIL = "FAIL"  # ... or this, for a server error
CATEGORIES = ("math", "law", "overall")


def record(qid: int, category: str, answer: str, reply: str = "", cot: str = "", options: int = 4) -> dict:
    opts = [f"option {i}" for i in range(options)] + ["N/A"] * (10 - options)
    return {"question_id": qid, "question": f"Question {qid} about {category}? <<{reply}>>", "options": opts,
            "answer": answer, "answer_index": "ABCDEFGHIJ".index(answer), "cot_content": cot, "category": category,
            "src": "test"}


def write_jsonl(path, lines: list) -> None:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")


class FakeServer:
    """/v1/models and /v1/completions; a completion answers what the last question asks for, and remembers its
    prompt."""

    def __init__(self):
        self.prompts: list[str] = []
        self.url = ""  # the API base, once served
        self.app = Starlette(routes=[Route("/v1/models", self.models),
                                     Route("/v1/completions", self.completions, methods=["POST"])])

    async def models(self, request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": "fake", "object": "model", "max_model_len": 100000}]})

    async def completions(self, request: Request) -> JSONResponse:
        body = await request.json()
        assert body["temperature"] == 0 and body["stop"] == ["Question:"]
        prompt = body["prompt"]
        self.prompts.append(prompt)
        reply = REPLY.findall(prompt)[-1]
        if reply == FAIL:
            return JSONResponse({"error": {"message": "boom", "type": "internal_server_error"}}, status_code=500)
        return JSONResponse({"choices": [{"index": 0, "text": reply, "finish_reason": "stop"}]})


@pytest.fixture(scope="module")
def fake_server() -> Iterator[FakeServer]:
    fake = FakeServer()
    with serve_app(fake.app) as url:
        fake.url = f"{url}/v1"
        yield fake


@pytest.fixture
def data_dir(tmp_path):
    """test.jsonl: 3 math and 3 law questions among 4 malformed lines; validation.jsonl: 2 worked math examples."""
    cot = "A: Let's think step by step. Reasoning {}. The answer is (A)."
    write_jsonl(tmp_path / "validation.jsonl", [record(900 + i, "math", "A", cot=cot.format(i)) for i in range(2)])
    write_jsonl(tmp_path / "test.jsonl", [
        record(1, "math", "B", "Some steps. So the answer is (B)."),  # right, first pattern
        "{not json",  # line 2
        record(2, "math", "D", "Answer: C"),  # wrong, second pattern
        {**record(3, "math", "A"), "options": "A, B"},  # line 4: options not a list
        record(4, "math", "E", "I would pick E then.", options=6),  # right, last standalone letter
        record(5, "law", "A", "the answer is A"),  # right
        {**record(6, "law", "B"), "answer_index": 3},  # line 7: answer and answer_index disagree
        record(7, "law", "C", "no idea at all"),  # no answer found: wrong
        record(8, "law", "A", FAIL),  # the request fails: wrong
        {**record(9, "law", "A"), "question_id": "x"},  # line 10
    ])
    return tmp_path


def test_extraction_follows_the_protocol_order():
    assert extract_answer("answer: B ... so the answer is (C)") == ("C", "answer is")
    assert extract_answer("the answer is D.") == ("D", "answer is")
    assert extract_answer("Answer: B, no wait, answer: C\nAnswer: D") == ("C", "answer:")
    assert extract_answer("Between A and\nB I choose G.") == ("G", "last letter")
    assert extract_answer("ABC is not a letter; nor is k") == (None, None)


def test_accuracy_per_category_against_a_server(gllm, fake_server, data_dir, tmp_path):
    out = tmp_path / "result.json"
    result = gllm("eval", "mmlu-pro", "--url", fake_server.url, "--data", data_dir,
                  "--output-json", out)
    assert result.exit_code == 0, result.output
    text = result.output
    for line in (4, 7, 10):
        assert f"skipped {data_dir / 'test.jsonl'}:{line}:" in text
    assert f"skipped {data_dir / 'test.jsonl'}:2: not JSON" in text
    assert "fewer shots where the validation split has fewer: math (2)" in text
    assert "0-shot for categories without validation questions: law" in text
    rows = {cells[0]: cells[1:] for cells in map(table_cells, text.splitlines()) if cells[0] in CATEGORIES}
    #            questions, correct, accuracy, no answer, failed
    assert rows == {"math": ["3", "2", "66.67%", "0", "0"], "law": ["3", "1", "33.33%", "1", "1"],
                    "overall": ["6", "3", "50.00%", "1", "1"]}
    assert "overall (micro) accuracy: 50.00% (3 of 6)" in text
    assert "the first failure: the server answered 500: boom" in text

    res = json.loads(out.read_text())
    acc = res["accuracy"]
    assert acc["overall"] == {"questions": 6, "correct": 3, "accuracy": 0.5, "no_answer": 1, "failed": 1}
    assert acc["overall"]["correct"] == acc["math"]["correct"] + acc["law"]["correct"]
    assert [s["where"].rsplit(":", 1)[1] for s in res["skipped_records"]] == ["2", "4", "7", "10"]
    by_id = {q["question_id"]: q for q in res["questions"]}
    assert {i: (q["prediction"], q["gold"], q["correct"], q["extracted_by"]) for i, q in by_id.items()} == {
        1: ("B", "B", True, "answer is"), 2: ("C", "D", False, "answer:"), 4: ("E", "E", True, "last letter"),
        5: ("A", "A", True, "answer is"), 7: (None, "C", False, None), 8: (None, "A", False, None)}
    assert by_id[8]["error"].endswith("boom") and by_id[7]["error"] is None
    assert {q["num_shots"] for q in res["questions"] if q["category"] == "math"} == {2}
    assert {q["num_shots"] for q in res["questions"] if q["category"] == "law"} == {0}

    # The prompts are the protocol's: k shots of the category with their worked answers, options lettered, N/A gone.
    prompts = {REPLY.findall(p)[-1]: p for p in fake_server.prompts}
    math = prompts["Some steps. So the answer is (B)."]
    assert math.startswith("You are an expert in math. Below is a series of example questions")
    assert math.count("Question:\n") == 3
    assert "Answer: Let's think step by step. Reasoning 1. The answer is (A).\n\n" in math
    assert math.endswith("Options:\nA. option 0\nB. option 1\nC. option 2\nD. option 3\n"
                         "Answer: Let's think step by step.")
    assert "N/A" not in math and "Reasoning" not in prompts["the answer is A"]
    assert by_id[1]["prompt_sha256"] == hashlib.sha256(math.encode()).hexdigest()


def test_subjects_limit_and_no_validation(gllm, fake_server, data_dir, tmp_path):
    (data_dir / "validation.jsonl").unlink()
    out = tmp_path / "r.json"
    result = gllm("eval", "mmlu-pro", "--url", fake_server.url, "--data",
                  data_dir / "test.jsonl", "--subjects", "MATH", "--limit", "2", "--output-json", out)
    assert result.exit_code == 0, result.output
    assert "0-shot: no validation data given" in result.output
    res = json.loads(out.read_text())
    assert [q["question_id"] for q in res["questions"]] == [1, 2]
    assert res["accuracy"]["overall"]["accuracy"] == 0.5 and set(res["accuracy"]) == {"math", "overall"}


@pytest.mark.parametrize("args,message", [
    (["--subjects", "astrology"], "error: --subjects: no category astrology in the test data; it has law, math"),
    (["--num-shots", "-1"], "error: --num-shots must be >= 0, got -1"),
    (["--data", "missing.jsonl"], "error: --data missing.jsonl: no such file or directory"),
])
def test_bad_input_is_one_line(gllm_error, data_dir, args, message):
    code, err = gllm_error("eval", "mmlu-pro", "--url", "http://127.0.0.1:1/v1", "--data", data_dir / "test.jsonl",
                           *args)
    assert code == 2 and err == [message]


def test_parquet_without_pyarrow_is_one_line(gllm_error, tmp_path, monkeypatch):
    for name in ("pyarrow", "pyarrow.parquet", "pandas"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails, installed or not
    path = tmp_path / "test-00000-of-00001.parquet"
    path.write_bytes(b"PAR1")
    code, err = gllm_error("eval", "mmlu-pro", "--data", path)
    assert code == 2 and err == [f"error: {path}: reading parquet needs pyarrow (pip install pyarrow), or give the "
                                 f"data as JSON/JSONL"]


def test_parquet_and_json_arrays_read_alike(tmp_path):
    import pyarrow as pa  # a dev dependency: CI reads parquet for real
    import pyarrow.parquet as pq

    from gllm_cli.eval_mmlu_pro import read_split

    records = [record(1, "math", "B"), record(2, "law", "C", options=10)]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "test.parquet")
    (tmp_path / "test.json").write_text(json.dumps(records))
    from_parquet = read_split([tmp_path / "test.parquet"])
    assert from_parquet == read_split([tmp_path / "test.json"])
    assert len(from_parquet.questions) == 2, from_parquet


def test_in_process_on_the_tiny_model(gllm, tiny_llama, data_dir, tmp_path):
    out = tmp_path / "r.json"
    result = gllm("eval", "mmlu-pro", tiny_llama, "--device", "cpu", "--cpu-kv-cache-gib", "0.01", "--data", data_dir,
                  "--max-tokens", "6", "--num-shots", "1", "--output-json", out)
    assert result.exit_code == 0, result.output
    res = json.loads(out.read_text())
    questions, overall = res["questions"], res["accuracy"]["overall"]
    assert len(questions) == overall["questions"] == 6 and overall["failed"] == 0
    assert overall["correct"] == sum(q["correct"] for q in questions)
    assert overall["no_answer"] == sum(q["prediction"] is None for q in questions)
    assert all(q["correct"] == (q["prediction"] == q["gold"]) for q in questions)
    assert all(extract_answer(q["response"])[0] == q["prediction"] for q in questions)
    assert {q["num_shots"] for q in questions if q["category"] == "math"} == {1}
    assert f"overall (micro) accuracy: {overall['accuracy']:.2%}" in result.output
