"""`gllm profile` on the tiny model: a trace that loads as JSON and names every engine phase, and the tables."""

from __future__ import annotations

import json

from gllm_cli.profile import PHASES
from tests.helpers import table_cells


def test_profile_writes_a_trace_and_times_each_phase(gllm, tiny_llama, tmp_path):
    out = tmp_path / "prof"
    result = gllm("profile", tiny_llama, "--device", "cpu", "--cpu-kv-cache-gib", "0.01", "--batch-size", "3",
                  "--input-len", "20", "--output-len", "4", "--top", "5", "--output", out)
    assert result.exit_code == 0, result.output
    trace = json.loads((out / "trace.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert set(PHASES) <= names
    assert "aten::mm" in names or "aten::matmul" in names or "aten::linear" in names
    assert "3 requests, 60 prompt and 12 generated tokens" in result.output
    rows = {cells[0]: cells[1:] for cells in map(table_cells, result.output.splitlines()) if cells[0] in PHASES}
    assert set(rows) == set(PHASES)
    # 4 tokens each: one prefill step and three decode steps, and each phase ran once per step; the
    # scheduler ran once more, finding nothing left, before the last step's outputs were built
    assert {name: int(row[0]) for name, row in rows.items()} == {**dict.fromkeys(PHASES, 4), "schedule": 5}, rows
    assert "Top 5 operators by self CPU time" in result.output and "CUDA" not in result.output


def test_bad_input_is_one_line(gllm_error, tmp_path):
    (tmp_path / "f").write_text("")
    assert gllm_error("profile", "--output", tmp_path / "f") == (2, [f"error: --output {tmp_path / 'f'} is a file, "
                                                                     "not a directory"])
    assert gllm_error("profile", "--batch-size", "0") == (2, ["error: --batch-size must be >= 1, got 0"])
    assert gllm_error("profile", "--input-len", "8", "--dataset", "sharegpt") == (
        2, ["error: --input-len is for --dataset random, not --dataset sharegpt"])
