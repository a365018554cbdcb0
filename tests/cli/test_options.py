"""The shared engine options: they map onto EngineConfig.create, reach every subcommand, and bad values
stop with one line naming the flag."""

from __future__ import annotations

import inspect
from typing import Annotated

import pytest
import typer
from typer.testing import CliRunner

from gllm_cli.main import app
from gllm_cli.options import ENGINE_OPTIONS, FLAGS, with_engine_options
from gllm_engine.config import EngineConfig

CREATE = inspect.signature(EngineConfig.create).parameters


def test_every_option_is_an_engine_config_keyword_with_the_same_default():
    for name, (_, default, kwarg) in ENGINE_OPTIONS.items():
        assert kwarg in CREATE, name
        assert CREATE[kwarg].default == default, f"--{name} defaults to {default}, EngineConfig to {CREATE[kwarg]}"


def test_options_reach_the_command_as_engine_kwargs():
    seen = {}

    @with_engine_options
    def command(model: Annotated[str | None, typer.Argument()] = None, *, engine_kwargs: dict) -> None:
        seen.update(engine_kwargs, model=model)

    cli = typer.Typer()
    cli.command()(command)
    cli.command("other")(lambda: None)  # two commands, so that typer expects a command name
    args = ["command", "m", "--tp", "2", "--pp", "3", "--gpu-memory-util", "0.5", "--no-enable-prefix-caching",
            "--pp-layer-split", "1,2,3", "--max-model-len", "64", "--device", "cpu", "--enforce-eager"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert seen["model"] == "m"
    assert {k: seen[k] for k in ("tensor_parallel_size", "pipeline_parallel_size", "gpu_memory_utilization",
                                 "enable_prefix_caching", "pp_layer_split", "max_model_len", "device",
                                 "enforce_eager", "max_num_seqs")} == {
        "tensor_parallel_size": 2, "pipeline_parallel_size": 3, "gpu_memory_utilization": 0.5,
        "enable_prefix_caching": False, "pp_layer_split": [1, 2, 3], "max_model_len": 64, "device": "cpu",
        "enforce_eager": True, "max_num_seqs": None}
    assert set(seen) == {kwarg for _, _, kwarg in ENGINE_OPTIONS.values()} | {"model"}
    bad = CliRunner().invoke(cli, ["command", "--pp-layer-split", "1,x"])
    assert bad.exit_code == 2 and "--pp-layer-split" in bad.output


@pytest.mark.parametrize("command", ["serve", "chat"])
def test_help_lists_every_flag_in_its_panel(command):
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "250", "NO_COLOR": "1"})
    assert result.exit_code == 0
    for panel in ("Engine", "Parallelism"):
        assert f"─ {panel} ─" in result.output
    for flag in [*FLAGS.values(), "--tp", "--pp", "--gpu-memory-util"]:
        assert flag in result.output, flag
    if command == "serve":
        for flag in ("--host", "--port", "--served-model-name", "--api-key", "--chat-template",
                     "--max-waiting-requests", "--shutdown-grace"):
            assert flag in result.output, flag


@pytest.mark.parametrize("args,line", [
    (["serve", "--max-num-seqs", "abc"], "error: Invalid value for '--max-num-seqs'"),
    (["serve", "--bogus"], "error: No such option: --bogus"),
    (["serve", "--max-num-seqs", "0"], "error: --max-num-seqs must be an integer >= 1, got 0"),
    (["chat", "--tp", "0"], "error: --tensor-parallel-size must be an integer >= 1, got 0"),
    (["serve", "--load-format", "pickle"], "error: --load-format must be one of"),
    (["chat", "--kv-cache-dtype", "int4"], "error: --kv-cache-dtype must be one of auto, fp8, fp8_e4m3, int8"),
    (["serve", "--scheduling-policy", "lifo"], "error: --scheduling-policy must be one of fcfs, longest_first"),
])
def test_bad_values_stop_with_one_line_naming_the_flag(args, line, capsys):
    with pytest.raises(SystemExit) as exit_:
        app(args=args, prog_name="gllm")
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(line), err
