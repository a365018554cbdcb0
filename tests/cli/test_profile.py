"""`gllm profile` on the tiny model: a trace that loads as JSON and names every engine phase, and the tables."""

from __future__ import annotations

import json
from types import SimpleNamespace

from torch.autograd import DeviceType

from gllm_cli.profile import OTHER_KERNELS, PHASES, kernel_kind, kind_table
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
    assert gllm_error("profile", "--dataset", "jsonl") == (2, ["error: --dataset jsonl needs --jsonl PATH"])
    assert gllm_error("profile", "--jsonl", tmp_path / "missing.jsonl") == (
        2, [f"error: --jsonl {tmp_path / 'missing.jsonl'}: no such file"])


def test_profile_takes_jsonl_prompts_with_their_own_output_lengths(gllm, tiny_llama, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt_token_ids": [5, 6, 7], "output_len": 2}\n'
                       '{"prompt_token_ids": [8, 9], "output_len": 5}\n')
    result = gllm("profile", tiny_llama, "--device", "cpu", "--cpu-kv-cache-gib", "0.01", "--jsonl", prompts,
                  "--output", tmp_path / "prof")
    assert result.exit_code == 0, result.output
    assert "2 requests, 5 prompt and 7 generated tokens" in result.output
    result = gllm("profile", tiny_llama, "--device", "cpu", "--cpu-kv-cache-gib", "0.01", "--jsonl", prompts,
                  "--output-len", "3", "--output", tmp_path / "prof")
    assert "2 requests, 5 prompt and 6 generated tokens" in result.output, result.output


def test_kernels_are_sorted_by_kind():
    assert kernel_kind("nvjet_sm90_tst_128x32_64x10_2x1_v_bz_TNT") == "matmul"
    assert kernel_kind("void cublasLt::splitKreduce_kernel<32, 16, int, float>") == "matmul"
    assert kernel_kind("_qkv_rotary_kernel") == "matmul"  # the projection with its rotary fused in
    assert kernel_kind("_split_reduce_kernel") == kernel_kind("flash_fwd_splitkv_kernel") == "attention"
    assert kernel_kind("_rms_norm_kernel") == "norm, activation, rotary"
    assert kernel_kind("_chunk_argmax_kernel") == "sampling"
    assert kernel_kind("Memcpy HtoD (Pinned -> Device)") == "memory copies and sets"
    assert kernel_kind("void at::native::vectorized_elementwise_kernel<4>") == OTHER_KERNELS


def test_kind_table_sums_kernels_by_kind_and_shows_the_idle_time():
    def event(key, count, us, device=DeviceType.CUDA, annotation=False):
        return SimpleNamespace(key=key, count=count, self_device_time_total=us, device_type=device,
                               is_user_annotation=annotation)

    averages = [event("_decode_kernel", 10, 300_000.0), event("_split_reduce_kernel", 10, 100_000.0),
                event("nvjet_sm90_tst_64x16", 40, 500_000.0), event("forward", 10, 900_000.0),  # a phase range
                event("aten::mm", 40, 7.0, device=DeviceType.CPU)]
    rows = {cells[0]: cells[1:] for cells in map(table_cells, _render(kind_table(averages, wall_s=1.0)))}
    assert rows["matmul"] == ["40", "500.00", "50.0%"]
    assert rows["attention"] == ["20", "400.00", "40.0%"]
    assert rows["GPU idle (wall clock - all kernels)"] == ["", "100.00", "10.0%"]
    assert not {"norm, activation, rotary", OTHER_KERNELS} & set(rows)


def _render(table) -> list[str]:
    from rich.console import Console

    console = Console(width=200)
    with console.capture() as capture:
        console.print(table)
    return capture.get().splitlines()
