"""`gllm bench` in-process and against a live `gllm serve`, on the tiny model: the JSON's figures must agree with
each other (token counts add up, percentiles are ordered, rates are counts over the duration)."""

from __future__ import annotations

import asyncio
import json
import signal

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from gllm_cli.serve import spawn_server
from gllm_engine.loader import ModelLoadError
from gllm_engine.loader.tokenizer import load_tokenizer
from tests.helpers import serve_app, table_cells

STATS = ("mean", "median", "p90", "p99")
SHARED = " ".join(["the quick brown fox jumps over the lazy dog"] * 8)  # ~72 tokens: several full KV blocks


def check_figures(res: dict, num_requests: int) -> list[dict]:
    """Assert that the figures of one run are consistent; the successful requests' records."""
    records = res["requests"]
    ok = [r for r in records if r["error"] is None]
    assert len(records) == num_requests == res["num_prompts"]
    assert res["successful_requests"] == len(ok) and res["failed_requests"] == num_requests - len(ok)
    assert res["total_input_tokens"] == sum(r["prompt_tokens"] for r in ok)
    assert res["total_output_tokens"] == sum(r["output_tokens"] for r in ok)
    seconds = res["duration_s"]
    assert res["request_throughput"] == pytest.approx(len(ok) / seconds)
    assert res["input_token_throughput"] == pytest.approx(res["total_input_tokens"] / seconds)
    assert res["output_token_throughput"] == pytest.approx(res["total_output_tokens"] / seconds)
    assert res["total_token_throughput"] == pytest.approx(
        (res["total_input_tokens"] + res["total_output_tokens"]) / seconds)
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        s = res[key]
        if s["median"] is None:  # no gap at all: each request's tokens came in one update (a fast engine)
            assert key == "itl_ms" and not any(r["itl_ms"] for r in ok)
            continue
        assert s["median"] <= s["p90"] <= s["p99"], key
    assert res["e2el_ms"]["p99"] <= seconds * 1000
    ttfts, e2els = [r["ttft_ms"] for r in ok], [r["e2el_ms"] for r in ok]
    assert min(ttfts) <= res["ttft_ms"]["mean"] <= max(ttfts) and res["ttft_ms"]["p99"] <= max(ttfts)
    assert res["e2el_ms"]["mean"] == pytest.approx(sum(e2els) / len(e2els))
    for r in ok:
        assert 0 < r["ttft_ms"] <= r["e2el_ms"]
        assert len(r["itl_ms"]) <= r["output_tokens"] - 1
        assert r["ttft_ms"] + sum(r["itl_ms"]) <= r["e2el_ms"] + 1e-6
    return ok


def write_sharegpt_cut_short(path, num: int) -> None:
    """`num` conversations and the start of one more, as a file that ends mid-record (like the packaged one)."""
    convs = [{"id": str(i), "conversations": [
        {"from": "human", "value": f"Question number {i}: " + " ".join(["why is the sky blue"] * (2 + i))},
        {"from": "gpt", "value": " ".join(["because of scattering"] * (3 + i))}]} for i in range(num + 1)]
    text = json.dumps(convs, indent=1)
    path.write_text(text[: text.rindex('"from": "gpt"')])


def test_offline_sharegpt_truncated(gllm, tiny_llama, tmp_path):
    data, out = tmp_path / "sharegpt.json", tmp_path / "bench.json"
    write_sharegpt_cut_short(data, 8)
    result = gllm("bench", tiny_llama, "--device", "cpu", "--cpu-kv-cache-gib", "0.01", "--sharegpt", data,
                  "--num-prompts", "5", "--output-len", "6", "--ignore-eos", "--slo-ttft-ms", "1e6",
                  "--slo-tpot-ms", "1e6", "--output-json", out)
    assert result.exit_code == 0, result.output
    assert f"ShareGPT: 8 complete records read from {data} (the file ends inside a record" in result.output
    for row in ("Successful requests", "Total token throughput (tok/s)", "Goodput (req/s, TTFT <= 1e+06 ms, TPOT <= "
                "1e+06 ms)", "Prefix-cache hit rate", "TTFT", "TPOT", "ITL", "E2E latency"):
        assert row in result.output, row
    res = json.loads(out.read_text())
    ok = check_figures(res, 5)
    assert res["mode"] == "offline" and res["dataset"] == {"name": "sharegpt", "path": str(data), "records_read": 8,
                                                           "truncated": True}
    assert len(ok) == 5 and all(r["output_tokens"] == 6 for r in ok)  # --ignore-eos: every token generated
    assert res["goodput"] == pytest.approx(res["request_throughput"])  # SLOs nobody misses
    prefix = res["prefix_cache"]
    assert prefix["queries"] == res["total_input_tokens"] and 0 <= prefix["hits"] <= prefix["queries"]


def test_token_id_jsonl_needs_no_tokenizer(gllm, tiny_model_dir, tmp_path):
    model = tiny_model_dir("LlamaForCausalLM", with_tokenizer=False)
    prompts, out = tmp_path / "ids.jsonl", tmp_path / "bench.json"
    prompts.write_text("\n".join(json.dumps({"prompt_token_ids": [3 + i, 9, 27, 81], "output_len": 3})
                                 for i in range(3)) + "\n")
    result = gllm("bench", model, "--device", "cpu", "--cpu-kv-cache-gib", "0.01", "--jsonl", prompts,
                  "--ignore-eos", "--output-json", out)
    assert result.exit_code == 0, result.output
    ok = check_figures(json.loads(out.read_text()), 3)
    assert [r["prompt_tokens"] for r in ok] == [4, 4, 4] and all(r["output_tokens"] == 3 for r in ok)
    prompts.write_text(json.dumps({"prompt": "words need a tokenizer"}) + "\n")
    result = gllm("bench", model, "--device", "cpu", "--cpu-kv-cache-gib", "0.01", "--jsonl", prompts)
    assert result.exit_code != 0 and "JSONL dataset's text prompts needs a tokenizer" in result.output


def test_offline_random_paced_and_capped(gllm, tiny_llama, tmp_path):
    out = tmp_path / "bench.json"
    result = gllm("bench", tiny_llama, "--device", "cpu", "--cpu-kv-cache-gib", "0.01", "--random-input-len", "24",
                  "--random-output-len", "5", "--random-range-ratio", "0.5", "--num-prompts", "6",
                  "--request-rate", "50", "--max-concurrency", "2", "--ignore-eos", "--warmup", "0",
                  "--slo-ttft-ms", "0.001", "--output-json", out)
    assert result.exit_code == 0, result.output
    res = json.loads(out.read_text())
    ok = check_figures(res, 6)
    assert res["dataset"]["name"] == "random" and res["request_rate"] == 50 and res["max_concurrency"] == 2
    assert all(12 <= r["prompt_tokens"] <= 36 and 2 <= r["output_tokens"] <= 7 for r in ok)
    assert res["goodput"] == 0  # nothing reaches its first token within a microsecond


@pytest.fixture(scope="module")
def server(tiny_llama):
    proc, url = spawn_server(str(tiny_llama), "--cpu-kv-cache-gib", "0.01", "--no-access-log")
    yield url
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_online_against_gllm_serve(gllm, server, tiny_llama, tmp_path, endpoint):
    prompts, out = tmp_path / "prompts.jsonl", tmp_path / "bench.json"
    lines = [{"prompt": f"{SHARED} and then number {i}", "output_len": 4} for i in range(4)]
    lines.insert(2, {"prompt": "word " * 600})  # longer than the tiny model's 512-token context: fails
    prompts.write_text("not json\n" + "\n".join(json.dumps(x) for x in lines) + "\n")
    result = gllm("bench", "--url", f"{server}/v1", "--endpoint", endpoint, "--tokenizer", tiny_llama,
                  "--jsonl", prompts, "--max-concurrency", "1", "--ignore-eos", "--output-json", out)
    assert result.exit_code == 0, result.output
    assert f"{prompts}: 1 malformed line(s) skipped: line 1 (not JSON" in result.output
    assert "1 of 5 requests failed; the first error: the server answered 400:" in result.output
    res = json.loads(out.read_text())
    ok = check_figures(res, 5)
    assert res["mode"] == "online" and res["endpoint"] == endpoint and res["model"] == tiny_llama.name
    assert res["requests"][2]["error"].startswith("the server answered 400")
    assert len(ok) == 4 and all(r["output_tokens"] == 4 for r in ok)  # from the server's usage report
    # One at a time with a long shared prefix: later requests find its blocks in the cache, as /metrics says.
    prefix = res["prefix_cache"]
    assert 0 < prefix["hits"] <= prefix["queries"] and prefix["hit_rate"] == prefix["hits"] / prefix["queries"]
    rows = {cells[0]: cells[1:] for cells in map(table_cells, result.output.splitlines()) if cells[0]}
    assert rows["Prefix-cache hit rate"][0].startswith(f"{prefix['hit_rate']:.1%} ({prefix['hits']:,} of")


@pytest.fixture(scope="module")
def server_without_tokenizer(tiny_model_dir):
    model = tiny_model_dir("LlamaForCausalLM", with_tokenizer=False)
    proc, url = spawn_server(str(model), "--cpu-kv-cache-gib", "0.01", "--no-access-log")
    yield url
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)


def test_online_token_ids_without_any_tokenizer(gllm, server_without_tokenizer, tmp_path, monkeypatch):
    """As on a GPU box with dummy weights: no tokenizer anywhere, token-id prompts, a server that streams no text."""

    def not_installed() -> str:
        raise ModelLoadError("the default model is not installed")

    monkeypatch.setattr("gllm_engine.loader.default_model.default_model_path", not_installed)
    prompts, out = tmp_path / "ids.jsonl", tmp_path / "bench.json"
    prompts.write_text("\n".join(json.dumps({"prompt_token_ids": [11 + i, 12, 13], "output_len": 24})
                                 for i in range(3)) + "\n")
    result = gllm("bench", "--url", f"{server_without_tokenizer}/v1", "--jsonl", prompts, "--ignore-eos",
                  "--max-concurrency", "1", "--output-json", out)
    assert result.exit_code == 0, result.output
    ok = check_figures(json.loads(out.read_text()), 3)
    assert all(r["prompt_tokens"] == 3 and r["output_tokens"] == 24 for r in ok)  # the server's usage report
    # Text-less chunks still time the tokens: the first token comes before the end, then more follow.
    assert all(r["ttft_ms"] < r["e2el_ms"] and r["itl_ms"] for r in ok)


def streaming_server(words: list[str]) -> Starlette:
    """An OpenAI-style server that streams `words` as completion chunks, with no usage report and no /metrics."""

    async def models(request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": "streamer", "object": "model"}]})

    async def completions(request: Request) -> StreamingResponse:
        async def events():
            for word in words:
                await asyncio.sleep(0.01)
                yield f"data: {json.dumps({'choices': [{'index': 0, 'text': word, 'finish_reason': None}]})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/models", models), Route("/v1/completions", completions, methods=["POST"])])


def test_online_without_usage_or_metrics(gllm, tiny_llama, tmp_path):
    words = [" one", " two", " three", " four", " five"]
    out = tmp_path / "bench.json"
    with serve_app(streaming_server(words)) as url:
        result = gllm("bench", "--url", f"{url}/v1", "--tokenizer", tiny_llama, "--dataset", "random",
                      "--num-prompts", "3", "--random-input-len", "8", "--output-json", out)
    assert result.exit_code == 0, result.output
    rows = {cells[0]: cells[1:] for cells in map(table_cells, result.output.splitlines()) if cells[0]}
    assert rows["Prefix-cache hit rate"] == ["n/a"]  # the server has no /metrics
    res = json.loads(out.read_text())
    ok = check_figures(res, 3)
    assert res["model"] == "streamer" and res["prefix_cache"] is None
    expected = len(load_tokenizer(str(tiny_llama)).encode("".join(words), add_special_tokens=False))
    assert all(r["output_tokens"] == expected and len(r["itl_ms"]) == len(words) - 1 for r in ok)
    assert all(r["prompt_tokens"] == 8 for r in ok)  # no usage: the prompts' own lengths


@pytest.mark.parametrize("args,message", [
    (["--num-prompts", "0"], "error: --num-prompts must be >= 1, got 0"),
    (["--request-rate", "0"], "error: --request-rate must be > 0 (inf: all at once), got 0.0"),
    (["--random-range-ratio", "1"], "error: --random-range-ratio must be in [0, 1), got 1.0"),
    (["--random-input-len", "0"], "error: --random-input-len must be >= 1, got 0"),
    (["--jsonl", "p.jsonl", "--random-input-len", "8"],
     "error: --jsonl and --random-input-len belong to different datasets; use one"),
    (["--dataset", "random", "--sharegpt", "s.json"], "error: --sharegpt is for --dataset sharegpt, not --dataset "
                                                      "random"),
    (["--sharegpt", "missing.json"], "error: --sharegpt missing.json: no such file"),
    (["--dataset", "jsonl"], "error: --dataset jsonl needs --jsonl PATH"),
    (["--dataset", "poems"], "error: Invalid value for '--dataset'"),
    (["--url", "http://127.0.0.1:1/v1"], "error: cannot reach http://127.0.0.1:1/v1"),
])
def test_bad_input_is_one_line(gllm_error, args, message):
    code, err = gllm_error("bench", *args)
    assert code == 2 and len(err) == 1 and err[0].startswith(message), err


@pytest.mark.parametrize("command", [["bench"], ["eval", "mmlu-pro"], ["profile"]])
def test_new_commands_take_the_engine_options(gllm, command):
    from gllm_cli.options import FLAGS

    result = gllm(*command, "--help")
    assert result.exit_code == 0 and "─ Engine ─" in result.output and "─ Parallelism ─" in result.output
    assert all(flag in result.output for flag in FLAGS.values())
