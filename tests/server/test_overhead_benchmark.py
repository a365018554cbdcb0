"""benchmarks/server_overhead.py at toy size on the CPU, so that it keeps working; the numbers are not the point."""

from __future__ import annotations

import json
import subprocess
import sys

from gllm_cli.datasets import random_requests, save_requests


def test_server_overhead_benchmark_runs_both_paths(tiny_model_dir, tmp_path):
    model = tiny_model_dir("LlamaForCausalLM", with_tokenizer=False, vocab_size=49152)
    requests = random_requests(10, input_len=12, output_len=5, range_ratio=0.5, vocab_size=49152)
    save_requests(requests, tmp_path / "requests.json")
    out = tmp_path / "result.json"
    subprocess.run([sys.executable, "benchmarks/server_overhead.py", "--model", str(model), "--load-format", "auto",
                    "--device", "cpu", "--dtype", "float32", "--requests-file", str(tmp_path / "requests.json"),
                    "--concurrency", "4", "--client-procs", "2", "--output-json", str(out)],
                   check=True, timeout=300, capture_output=True)
    result = json.loads(out.read_text())
    expected = sum(r.output_len for r in requests)
    for path in (result["offline"], result["server"]):
        assert path["requests"] == 10 and path["wrong_or_failed"] == 0 and path["output_tokens"] == expected
        assert path["output_tokens_per_s"] == expected / path["seconds"]
    assert result["ratio"] == result["server"]["output_tokens_per_s"] / result["offline"]["output_tokens_per_s"]
