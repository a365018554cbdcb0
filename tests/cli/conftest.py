"""Fixtures of the CLI tests: the `gllm` app run in this process, and one tiny model for all of them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from gllm_cli.main import app

ENV = {"COLUMNS": "200", "NO_COLOR": "1"}


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_dir: Callable[..., Path]) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer (see tests.helpers), made once per session."""
    return tiny_model_dir("LlamaForCausalLM")


@pytest.fixture
def gllm() -> Callable[..., Result]:
    """`gllm(*args)`: run the CLI in this process, 200 columns wide, without colour."""
    return lambda *args: CliRunner().invoke(app, [str(a) for a in args], env=ENV)


@pytest.fixture
def gllm_error(capsys: pytest.CaptureFixture) -> Callable[..., tuple[int, list[str]]]:
    """`gllm_error(*args)`: run the CLI as its entry point does; (exit code, stderr lines)."""

    def run(*args: object) -> tuple[int, list[str]]:
        with pytest.raises(SystemExit) as exit_:
            app(args=[str(a) for a in args], prog_name="gllm")
        return exit_.value.code, capsys.readouterr().err.strip().splitlines()

    return run
