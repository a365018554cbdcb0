"""Benchmark scripts at toy size on the CPU, so they keep working; the numbers are not the point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.decode_replay import decode_contexts
from benchmarks.matmul_rows import matmul_bound
from benchmarks.schedule_roofline import (
    DenseShapes,
    MeasuredCosts,
    schedule_bound,
    step_bound,
    step_estimate_parts,
)
from benchmarks.single_gpu import print_report
from gllm_engine.runner.cuda_graph import MAX_GRAPH_PREFILLS
from tests.helpers import make_tiny_model_dir, table_cells


def run_offline_throughput(model, out, *extra: str) -> dict:
    subprocess.run([sys.executable, "benchmarks/offline_throughput.py", "--config", str(model), "--device", "cpu",
                    "--dtype", "float32", "--output-json", str(out), *extra], check=True, timeout=600)
    return json.loads(out.read_text())


def test_offline_throughput_runs_both_engines(tmp_path):
    model = make_tiny_model_dir("LlamaForCausalLM", tmp_path / "m", with_tokenizer=False, vocab_size=49152)
    res = run_offline_throughput(model, tmp_path / "result.json", "--num-prompts", "6", "--max-output-len", "4")
    rows, workload = res["results"], res["workload"]
    assert workload["requests"] == 6 and workload["output_tokens"] == 6 * 4  # ShareGPT outputs are >= 4 tokens
    assert [r["engine"].split()[0] for r in rows] == ["gLLM", "transformers"]
    for r in rows:
        assert "error" not in r and r["note"] is None
        assert r["requests"] == r["completed"] == 6 and r["output_tokens"] == 24  # ignore_eos: every token made
        assert r["input_tokens"] == workload["prompt_tokens"]
        assert r["total_tokens_per_s"] == pytest.approx((r["input_tokens"] + r["output_tokens"]) / r["seconds"])
        assert r["requests_per_s"] == pytest.approx(6 / r["seconds"])


def test_offline_throughput_reports_a_stopped_baseline_as_partial(tmp_path):
    model = make_tiny_model_dir("LlamaForCausalLM", tmp_path / "m", with_tokenizer=False, vocab_size=49152)
    res = run_offline_throughput(model, tmp_path / "result.json", "--engines", "transformers", "--num-prompts", "8",
                                 "--num-prompts-transformers", "3", "--max-output-len", "64",
                                 "--transformers-timeout", "0")
    [row] = res["results"]
    assert "error" not in row and row["note"].startswith("partial")
    assert row["requests"] == 3 and row["completed"] == 0  # stopped before waiting for any result
    assert row["output_tokens"] <= res["workload"]["output_tokens"]
    assert row["output_tokens_per_s"] == pytest.approx(row["output_tokens"] / row["seconds"])


def test_prefix_caching_benchmark_reports_hits(tmp_path):
    model = make_tiny_model_dir("Qwen3ForCausalLM", tmp_path / "m", with_tokenizer=False)
    res = subprocess.run([sys.executable, "benchmarks/prefix_caching.py", "--model", str(model), "--device", "cpu",
                          "--requests", "4", "--system-len", "64", "--question-len", "8", "--output-len", "4"],
                         check=True, timeout=600, capture_output=True, text=True)
    assert "caching on vs off" in res.stdout and "0.0%" in res.stdout


def test_single_gpu_script_runs_every_workload_at_toy_size(tmp_path):
    large = make_tiny_model_dir("LlamaForCausalLM", tmp_path / "large", with_tokenizer=False, vocab_size=49152)
    small = make_tiny_model_dir("Qwen3ForCausalLM", tmp_path / "small", with_tokenizer=False)
    out = tmp_path / "single.json"
    res = subprocess.run([sys.executable, "benchmarks/single_gpu.py", "--config", str(large), "--small-config",
                          str(small), "--device", "cpu", "--dtype", "float32", "--num-prompts", "3",
                          "--num-prompts-transformers", "2", "--uniform-requests", "3", "--uniform-range", "4", "12",
                          "--batch1", "8", "6", "--sweep", "1", "2", "--max-output-len", "4",
                          "--also-kv-cache-dtype", "fp8", "int8", "--output-json", str(out)],
                         check=True, timeout=600, capture_output=True, text=True)
    report = json.loads(out.read_text())
    large_run, small_run = report["gllm_large"], report["gllm_small"]
    assert large_run["sharegpt"]["completed"] == 3 and large_run["sharegpt"]["output_tokens"] == 3 * 4
    assert large_run["batch1"]["output_tokens"] == 6
    assert [r["batch"] for r in large_run["sweep"]] == [1, 2]
    assert small_run["completed"] == 3 and small_run["output_tokens"] <= 3 * 4
    for key in ("transformers_large", "transformers_small"):
        assert "error" not in report[key] and report[key]["completed"] == report[key]["requests"]
    assert report["params"]["large"] > report["params"]["small"] > 0
    for cache in ("fp8", "int8"):
        other_large, other_small = report[f"gllm_large_{cache}"], report[f"gllm_small_{cache}"]
        assert other_large["sharegpt"]["output_tokens"] == 3 * 4 and other_large["batch1"]["output_tokens"] == 6
        assert not other_large.get("sweep") and other_small["completed"] == 3
        assert res.stdout.count(f"KV cache {cache}") == 3  # its ShareGPT, uniform and batch-1 rows
    assert "Single-GPU workloads" in res.stdout and "Latency vs batch" in res.stdout
    assert "stopped at its time limit" not in res.stdout  # both baselines ran to completion
    # "vs transformers": ShareGPT in total tok/s, uniform (nano-vllm's benchmark) in output tok/s
    rows = {(r[0], r[1]): r for r in map(table_cells, res.stdout.splitlines()) if len(r) == 7}
    for workload, model, key in (("sharegpt", "large", "total_tokens_per_s"),
                                 ("uniform", "small", "output_tokens_per_s")):
        ours = report[f"gllm_{model}"]["sharegpt"] if model == "large" else report[f"gllm_{model}"]
        assert rows[workload, "gLLM"][5] == f"{ours[key] / report[f'transformers_{model}'][key]:.1f}x"


def test_single_gpu_report_gives_sharegpt_as_a_share_of_its_schedule_roofline(capsys):
    row = {"requests_per_s": 50.0, "output_tokens_per_s": 17000.0, "total_tokens_per_s": 24000.0}
    report = {"device": "GPU", "dtype": "bfloat16", "kv_cache_dtype": "auto", "also_kv_cache_dtypes": ["fp8"],
              "config": "llama3-8b", "small_config": "qwen3-0.6b", "params": {"large": 8e9, "small": 6e8},
              "weight_bytes": 16e9, "batch1_shape": [128, 256], "ceilings": {"flops": 7e14, "bandwidth": 3e12},
              "gllm_large": {"sharegpt": row}, "gllm_large_fp8": {"sharegpt": {**row, "total_tokens_per_s": 25000.0}},
              "transformers_large": {**row, "total_tokens_per_s": 800.0},
              "schedule_roofline": {"auto": 30000.0, "fp8": 31250.0}}
    print_report(report)
    out = capsys.readouterr().out
    assert "its schedule's roofline with KV cache auto: 30,000 total tok/s; gLLM at 80%" in out
    assert "its schedule's roofline with KV cache fp8: 31,250 total tok/s; gLLM at 80%" in out


def test_single_gpu_report_says_how_far_a_stopped_baseline_got(tmp_path):
    small = make_tiny_model_dir("Qwen3ForCausalLM", tmp_path / "small", with_tokenizer=False)
    out = tmp_path / "single.json"
    res = subprocess.run([sys.executable, "benchmarks/single_gpu.py", "--models", "small", "--small-config",
                          str(small), "--device", "cpu", "--dtype", "float32", "--uniform-requests", "3",
                          "--uniform-range", "4", "12", "--max-output-len", "64", "--transformers-timeout", "0",
                          "--output-json", str(out)],
                         check=True, timeout=600, capture_output=True, text=True)
    base = json.loads(out.read_text())["transformers_small"]
    assert base["note"].startswith("partial") and base["completed"] < base["requests"] == 3
    assert (f"uniform: transformers stopped at its time limit with {base['completed']} of 3 requests done; its "
            f"rates are over those {base['seconds']:.0f} s") in res.stdout


def test_step_kinds_charges_every_step_to_a_kind(tmp_path):
    model = make_tiny_model_dir("LlamaForCausalLM", tmp_path / "m", with_tokenizer=False, vocab_size=49152)
    res = subprocess.run([sys.executable, "benchmarks/step_kinds.py", "--config", str(model), "--device", "cpu",
                          "--dtype", "float32", "--num-prompts", "5", "--max-output-len", "4"],
                         check=True, timeout=600, capture_output=True, text=True,
                         env={**os.environ, "COLUMNS": "200"})  # one line per table row
    assert "5 requests in" in res.stdout and "Steps by kind" in res.stdout
    steps = {line.split("│")[1].strip(): int(line.split("│")[2]) for line in res.stdout.splitlines()
             if line.startswith("│") and line.split("│")[1].strip() in ("decode 1-16", "prefill <= 512")}
    # One prefill step takes all five prompts, then three decode steps give tokens 2 to 4.
    assert steps == {"prefill <= 512": 1, "decode 1-16": 3}, res.stdout


def record_two_requests(tmp_path: Path) -> tuple[Path, Path]:
    """Two requests (39 + 5 and 3 + 2 tokens) and their schedule from `decode_replay.py record`."""
    requests = tmp_path / "requests.json"
    requests.write_text(json.dumps([{"prompt_token_ids": list(range(1, 40)), "output_len": 5},
                                    {"prompt_token_ids": [6, 7, 8], "output_len": 2}]))
    schedule = tmp_path / "steps.json"
    subprocess.run([sys.executable, "benchmarks/decode_replay.py", "record", "--requests-file", str(requests),
                    "--num-blocks", "64", "--max-model-len", "64", "--out", str(schedule)], check=True, timeout=600)
    return requests, schedule


def test_step_kinds_sets_each_kind_beside_its_schedule_bound(tmp_path):
    model = make_tiny_model_dir("LlamaForCausalLM", tmp_path / "m", with_tokenizer=False, vocab_size=49152)
    requests, schedule = record_two_requests(tmp_path)
    run = [sys.executable, "benchmarks/step_kinds.py", "--config", str(model), "--device", "cpu", "--dtype",
           "float32", "--requests-file", str(requests), "--schedule", str(schedule), "--bandwidth", "1e-9",
           "--tflops", "1e-9"]
    res = subprocess.run(run, check=True, timeout=600, capture_output=True, text=True,
                         env={**os.environ, "COLUMNS": "250"})
    rows = {cells[0]: cells[1:] for cells in map(table_cells, res.stdout.splitlines()) if len(cells) == 11}
    # the run's steps are the recorded ones (four decode-only, one with prefill), bounded as schedule_roofline does
    assert rows["decode 1-16"][0] == rows["decode 1-16"][6] == "4"
    bounds = schedule_bound(json.loads(schedule.read_text())["steps"], DenseShapes.from_config(str(model)), 1e3, 1e3)
    assert rows["decode 1-16"][7] == f"{bounds['decode 1-16'].seconds:.2f}"
    assert "with prefill: " in res.stdout and "all: " in res.stdout and "ceilings: 0.00 TB/s" in res.stdout
    other = subprocess.run([*run[:-6], "--num-prompts", "1", *run[-6:]], timeout=600, capture_output=True,
                           text=True)
    assert other.returncode != 0 and "recorded for other requests" in other.stderr


def test_decode_replay_records_every_step_and_the_context_length_of_each_decode(tmp_path):
    requests = tmp_path / "requests.json"
    requests.write_text(json.dumps([{"prompt_token_ids": [1, 2, 3, 4, 5], "output_len": 3},
                                    {"prompt_token_ids": [6, 7, 8], "output_len": 2}]))
    out = tmp_path / "steps.json"
    subprocess.run([sys.executable, "benchmarks/decode_replay.py", "record", "--requests-file", str(requests),
                    "--num-blocks", "64", "--max-model-len", "64", "--out", str(out)], check=True, timeout=600)
    recorded = json.loads(out.read_text())
    # one prefill step samples each first token; then each decode reads its prompt and outputs so far
    assert recorded["steps"] == [[0, [[0, 5], [0, 3]]], [2, [[5, 1], [3, 1]]], [1, [[6, 1]]]]
    assert decode_contexts(recorded["steps"]) == [[6, 4], [7]]
    assert recorded["settings"]["max_num_seqs"] == 1024 and recorded["requests"] == 2
    assert (recorded["prompt_tokens"], recorded["output_tokens"]) == (8, 5)


def test_step_bound_takes_the_slower_of_bytes_and_flops_per_phase():
    # 100 body + 10 head parameters of 2 bytes; K and V of a token 8 bytes; 2 layers, query width 4
    shapes = DenseShapes(body_params=100, head_params=10, layers=2, q_width=4, kv_token_bytes=8, weight_bytes=2)
    # two decodes over contexts of 9 and 4 tokens: weights (220 bytes) and KV (13 tokens: 104 bytes) bound
    decode = step_bound([[8, 1], [3, 1]], shapes, bandwidth=10.0, flops=1e9)
    assert (decode.steps, decode.tokens) == (1, 2)
    assert decode.linear_s == pytest.approx(22.0) and decode.attention_s == pytest.approx(10.4)
    # a 6-token prompt chunk after 2 cached tokens: FLOPs bound both phases at a slow matmul rate
    chunk = step_bound([[2, 6]], shapes, bandwidth=1e9, flops=10.0)
    assert chunk.linear_s == pytest.approx(2 * (100 * 6 + 10 * 1) / 10.0)
    pairs = 6 * 2 + 6 * 7 / 2  # each new token sees the cached ones and itself and those before it
    assert chunk.attention_s == pytest.approx(4 * 2 * 4 * pairs / 10.0)


def test_step_estimate_charges_measured_matmul_times_attention_elementwise_traffic_and_overhead():
    shapes = DenseShapes(body_params=100, head_params=10, layers=2, q_width=4, kv_token_bytes=8, weight_bytes=2)
    us = {name: [1.0, 4.0] for name in ("qkv", "o", "gate_up", "down")} | {"lm_head": [10.0, 40.0]}
    features = {"qkv": (12, 8), "o": (8, 8), "gate_up": (32, 8), "down": (8, 16), "lm_head": (100, 8)}
    costs = MeasuredCosts(rows=[1, 4], matmul_us=us, shapes=features, attention_bandwidth=10.0, step_overhead_s=0.5)
    # per token and layer: norms 2 x 4 x 8, SiLU-and-mul 3 x 16, rotary and KV store 2 x 12 values of 2 bytes
    assert costs.elementwise_token_bytes(layers=2) == 2 * 2 * (64 + 48 + 24)
    # two decodes over 13 context tokens: 4 projections at 2 rows (2 µs each, interpolated) in 2 layers, the
    # LM head at 2 rows, KV bytes at the attention rate, 2 tokens' elementwise bytes at the copy bandwidth
    parts = step_estimate_parts([[8, 1], [3, 1]], shapes, costs, bandwidth=1e3, flops=1e9)
    assert parts == pytest.approx({"projections": 2 * 4 * 2e-6, "LM head": 20e-6, "attention": 13 * 8 / 10.0,
                                   "elementwise": 2 * 544 / 1e3, "step overhead": 0.5})
    estimate = sum(parts.values())
    # beyond the rows measured: the larger of the last time and the FLOPs at the matmul rate
    assert costs.matmul_s("qkv", 8, flops=1e3) == pytest.approx(2 * 8 * 12 * 8 / 1e3)
    assert costs.matmul_s("qkv", 8, flops=1e12) == pytest.approx(4e-6)
    # a schedule sums its steps' estimates; the next step reads 2 more context tokens
    bounds = schedule_bound([[2, [[8, 1], [3, 1]]], [2, [[9, 1], [4, 1]]]], shapes, 1e3, 1e9, costs)
    assert bounds["all"].estimate_s == pytest.approx(2 * estimate + 2 * 8 / 10.0)
    assert bounds["all"].estimate_parts["attention"] == pytest.approx(2 * parts["attention"] + 2 * 8 / 10.0)


def test_decode_replay_records_longest_first_filling_the_rows_of_the_gpu_graphs(tmp_path):
    lengths = (12, 6, 6, 3, 3, 3)  # 33 tokens over the longest one's 12 steps: 3 at a time
    requests = tmp_path / "requests.json"
    requests.write_text(json.dumps([{"prompt_token_ids": [1, 2], "output_len": n} for n in lengths]))
    costs = tmp_path / "costs.json"  # flat: every capture size is kept (1, 2, 4, 8, ...)
    costs.write_text(json.dumps({"rows": [16, 1024], "shapes": {k: [8, 8] for k in ("qkv", "o", "gate_up", "down")},
                                 "us": {k: [1.0, 1.0] for k in ("qkv", "o", "gate_up", "down")}}))
    first_steps = []
    for graphs in ([], ["--matmul-costs", str(costs), "--tflops", "1"]):
        out = tmp_path / "steps.json"
        subprocess.run([sys.executable, "benchmarks/decode_replay.py", "record", "--requests-file", str(requests),
                        "--num-blocks", "64", "--max-model-len", "64", "--scheduling-policy", "longest_first",
                        "--longest-first-min-running", "1", *graphs, "--out", str(out)], check=True, timeout=600)
        first_steps.append(json.loads(out.read_text())["steps"][0])
    # leveled: the three longest prefill first; with graphs of 1, 2, 4, ... rows the step pads to 4, so 4 run
    assert first_steps == [[0, [[0, 2]] * 3], [0, [[0, 2]] * 4]]


def test_graph_padding_runs_a_step_at_the_rows_of_the_graph_the_engine_would_replay():
    # a layer's projections are slow at 32 rows: 5 µs against 2 at 48, so the engine pads 17-32 rows to 48
    us = {"qkv": [1.0, 5.0, 2.0, 2.5]} | {name: [0.0] * 4 for name in ("o", "gate_up", "down", "lm_head")}
    features = {"qkv": (12, 8), "o": (8, 8), "gate_up": (32, 8), "down": (8, 16), "lm_head": (100, 8)}
    flat = MeasuredCosts(rows=[16, 32, 48, 64], matmul_us=us, shapes=features, attention_bandwidth=10.0,
                         step_overhead_s=0.0)
    costs = flat.with_graphs(max_num_seqs=64, max_num_batched_tokens=64, flops=1e12)
    assert costs.graph_sizes == {False: [1, 2, 4, 8, 16, 48, 64], True: [16, 48, 64]}
    assert [costs.step_rows(t, 0) for t in (3, 16, 20, 40, 64)] == [4, 16, 48, 48, 64]  # decode-only: by requests
    assert costs.step_rows(20, 1) == 48 and costs.step_rows(70, 1) == 70  # mixed: by tokens, eager past 64
    assert costs.step_rows(20, MAX_GRAPH_PREFILLS + 1) == 20  # more prefill chunks than a graph holds: eager
    assert flat.step_rows(20, 0) == 20  # without graphs: unpadded
    shapes = DenseShapes(body_params=100, head_params=10, layers=2, q_width=4, kv_token_bytes=8, weight_bytes=2)
    # 24 decodes run as 48 rows: qkv 2 µs instead of 3 (interpolated) in 2 layers, 24 more rows of elementwise bytes
    padded, unpadded = (sum(step_estimate_parts([[5, 1]] * 24, shapes, c, bandwidth=1e3, flops=1e12).values())
                        for c in (costs, flat))
    assert padded - unpadded == pytest.approx(2 * (2.0 - 3.0) * 1e-6 + 24 * 544 / 1e3)


def test_schedule_roofline_bounds_every_recorded_step(tmp_path):
    model = make_tiny_model_dir("LlamaForCausalLM", tmp_path / "m", with_tokenizer=False)
    _, schedule = record_two_requests(tmp_path)
    res = subprocess.run([sys.executable, "benchmarks/schedule_roofline.py", str(schedule), "--config", str(model),
                          "--bandwidth", "1", "--tflops", "1", "--measured-tok-s", "1e6"], check=True, timeout=600,
                         capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    rows = {cells[0]: cells[1:] for cells in map(table_cells, res.stdout.splitlines()) if len(cells) == 7}
    # one step prefills both prompts, one decodes both, three decode the longer request alone
    assert rows["with prefill"][:2] == ["1", "42"] and rows["decode 1-16"][:2] == ["4", "5"]
    assert rows["all"][:2] == ["5", "47"] and rows["all"][-1] == "100%"
    assert "bound:" in res.stdout and "of this bound" in res.stdout

    # with per-call times from matmul_rows.py (a CPU smoke run), every kind of step gets an estimate too
    costs = tmp_path / "costs.json"
    subprocess.run([sys.executable, "benchmarks/matmul_rows.py", "--config", str(model), "--device", "cpu", "--dtype",
                    "float32", "--rows", "4", "1", "--bandwidth", "1", "--tflops", "1", "--output-json", str(costs)],
                   check=True, timeout=600, capture_output=True)
    saved = json.loads(costs.read_text())
    assert saved["rows"] == [4, 1] and all(len(saved["us"][k]) == 2 for k in ("qkv", "o", "gate_up", "down", "lm_head"))
    for padding in ([], ["--graph-padding"]):  # the schedule's steps padded to graph sizes or not
        res = subprocess.run([sys.executable, "benchmarks/schedule_roofline.py", str(schedule), "--config", str(model),
                              "--bandwidth", "1", "--tflops", "1", "--matmul-costs", str(costs), "--step-overhead-ms",
                              "1000", *padding], check=True, timeout=600, capture_output=True, text=True,
                             env={**os.environ, "COLUMNS": "200"})
        estimates = {cells[0]: float(cells[-1]) for cells in map(table_cells, res.stdout.splitlines())
                     if len(cells) == 8}
        # the kernels of a toy model take microseconds: the estimates are a second a step
        assert estimates == {"with prefill": 1.0, "decode 1-16": 4.0, "all": 5.0}
        assert f"estimate from {costs}" in res.stdout.replace("\n", "")
        assert "projections" in res.stdout and "step overhead" in res.stdout  # the estimate's parts


def test_kv_cache_accuracy_compares_every_run_with_the_first():
    res = subprocess.run([sys.executable, "benchmarks/kv_cache_accuracy.py", "--device", "cpu", "--num-prompts", "2",
                          "--output-len", "4", "--dtypes", "float32"], check=True, timeout=600, capture_output=True,
                         text=True)
    assert "KV-cache dtype vs greedy answers" in res.stdout
    rows = [table_cells(line) for line in res.stdout.splitlines() if line.startswith("│")]
    assert [r[:2] for r in rows] == [["float32", "model dtype"], ["float32", "fp8"], ["float32", "int8"]]
    assert rows[0][3:] == ["100.0%"] * 3  # the first run against itself
    float32_bytes, fp8_bytes, int8_bytes = (int(r[2].replace(",", "")) for r in rows)
    assert float32_bytes == 4 * fp8_bytes  # fp8: a byte a value
    assert int8_bytes * 64 == fp8_bytes * (64 + 4)  # int8: and a float32 scale per head of 64 (SmolLM2)


def test_sass_check_compiles_every_kernel_for_hopper_without_spills():
    """The attention and rotary kernels compile for sm_90 on the CPU, over each KV-cache dtype, and ptxas
    spills no register in any of them; the int8 scales cost no spill either. The attention kernels widen
    the 8-bit tiles by PTX, and int8 values then take no int-to-float conversion."""
    res = subprocess.run([sys.executable, "benchmarks/sass_check.py"], check=True, timeout=600, capture_output=True,
                         text=True)
    header = next(line for line in res.stdout.splitlines() if line.startswith("┃"))
    columns = [c.strip() for c in header.strip().strip("┃").split("┃")]
    rows = [dict(zip(columns, table_cells(line))) for line in res.stdout.splitlines() if line.startswith("│")]
    assert [(r["kernel"], r["KV cache"]) for r in rows] == [
        (kernel, cache) for cache in ("bf16", "fp8", "int8")
        for kernel in ("decode", "decode split", "prefill", "rotary + KV store")]
    assert all(r["spill bytes"] == "0" for r in rows), rows
    by_case = {(r["kernel"], r["KV cache"]): r for r in rows}
    for kernel in ("decode", "decode split", "prefill"):
        assert by_case[kernel, "fp8"]["widened by"] == by_case[kernel, "int8"]["widened by"] == "PTX"
        assert by_case[kernel, "int8"]["I2F"] == by_case[kernel, "bf16"]["I2F"]  # only the bf16 kernel's own
        assert int(by_case[kernel, "bf16"]["in loop"]) > 0  # a loop over context tiles was found


def test_matmul_bound_takes_the_slower_of_moving_the_operands_and_the_flops():
    # 4 rows through a 10 x 6 weight, 2-byte values: 60 + 24 + 40 elements moved, 480 FLOPs
    assert matmul_bound(4, 10, 6, bandwidth=248.0, flops=1e9) == pytest.approx(1.0)
    assert matmul_bound(4, 10, 6, bandwidth=1e9, flops=48.0) == pytest.approx(10.0)


def test_matmul_rows_times_every_projection_at_every_row_count(tmp_path):
    model = make_tiny_model_dir("LlamaForCausalLM", tmp_path / "m", with_tokenizer=False)
    config = json.loads((model / "config.json").read_text())
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    res = subprocess.run([sys.executable, "benchmarks/matmul_rows.py", "--config", str(model), "--device", "cpu",
                          "--rows", "2", "8", "--bandwidth", "1", "--tflops", "1"], check=True, timeout=600,
                         capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    rows = {cells[0]: cells[1:] for cells in map(table_cells, res.stdout.splitlines()) if len(cells) == 3}
    qkv = (config["num_attention_heads"] + 2 * config["num_key_value_heads"]) * head_dim
    assert list(rows) == [f"qkv ({qkv} x {config['hidden_size']})",
                          f"o ({config['hidden_size']} x {config['hidden_size']})",
                          f"gate_up ({2 * config['intermediate_size']} x {config['hidden_size']})",
                          f"down ({config['hidden_size']} x {config['intermediate_size']})",
                          f"lm_head ({config['vocab_size']} x {config['hidden_size']})",
                          "layer (qkv + o + gate_up + down)"]
    assert all(cell.endswith("%)") for cells in rows.values() for cell in cells)
    us = {name: [float(cell.split(" (")[0].replace(",", "")) for cell in cells] for name, cells in rows.items()}
    projections = [cells for name, cells in us.items() if not name.startswith(("lm_head", "layer"))]
    assert us["layer (qkv + o + gate_up + down)"] == pytest.approx([sum(c) for c in zip(*projections)], abs=0.3)
    cpu_blas = subprocess.run([sys.executable, "benchmarks/matmul_rows.py", "--config", str(model), "--device", "cpu",
                               "--blas", "tunable", "--bandwidth", "1", "--tflops", "1"], timeout=600,
                              capture_output=True, text=True)
    assert cpu_blas.returncode != 0 and "needs a GPU" in cpu_blas.stderr
