"""Benchmark scripts at toy size on the CPU, so they keep working; the numbers are not the point."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers import make_tiny_model_dir


def test_offline_throughput_runs_both_engines(tmp_path):
    model = make_tiny_model_dir("LlamaForCausalLM", tmp_path / "m", with_tokenizer=False, vocab_size=49152)
    out = tmp_path / "result.json"
    subprocess.run([sys.executable, "benchmarks/offline_throughput.py", "--config", str(model), "--device", "cpu",
                    "--dtype", "float32", "--num-prompts", "6", "--max-output-len", "4", "--output-json", str(out)],
                   check=True, timeout=600)
    rows = json.loads(out.read_text())
    assert [r["engine"].split()[0] for r in rows] == ["gLLM", "transformers"]
    for r in rows:
        assert r["requests"] == 6 and r["output_tokens"] > 0
        assert r["total_tokens_per_s"] > r["output_tokens_per_s"] > 0
    assert rows[0]["output_tokens"] == rows[1]["output_tokens"]  # same workload, ignore_eos


def test_prefix_caching_benchmark_reports_hits(tmp_path):
    model = make_tiny_model_dir("Qwen3ForCausalLM", tmp_path / "m", with_tokenizer=False)
    res = subprocess.run([sys.executable, "benchmarks/prefix_caching.py", "--model", str(model), "--device", "cpu",
                          "--requests", "4", "--system-len", "64", "--question-len", "8", "--output-len", "4"],
                         check=True, timeout=600, capture_output=True, text=True)
    assert "caching on vs off" in res.stdout and "0.0%" in res.stdout
