"""completions/ holds exactly what Typer generates for `gllm`, and the bash script completes through the real app."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gllm_cli.completions import SHELLS, main, scripts

COMPLETIONS = Path(__file__).resolve().parents[2] / "completions"


def test_committed_scripts_are_what_the_generator_writes(tmp_path):
    assert sorted(p.name for p in COMPLETIONS.iterdir()) == sorted(SHELLS.values())
    for name, text in scripts().items():
        assert (COMPLETIONS / name).read_text() == text, f"{name} is stale: run python -m gllm_cli.completions"
    assert main(["--check", "--directory", str(COMPLETIONS)]) == 0
    assert main(["--check", "--directory", str(tmp_path)]) == 1  # missing files are reported
    assert main(["--directory", str(tmp_path)]) == 0 and main(["--check", "--directory", str(tmp_path)]) == 0
    (tmp_path / "_gllm").write_text("stale")
    assert main(["--check", "--directory", str(tmp_path)]) == 1


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_bash_completes_subcommands_and_choices(tmp_path):
    # `gllm` as the installed entry point runs it (program name "gllm"), with this interpreter.
    (tmp_path / "gllm").write_text(f'#!/bin/sh\nexec "{sys.executable}" -c "import sys; sys.argv[0] = \'gllm\'; '
                                   f'from gllm_cli.main import app; app()" "$@"\n')
    (tmp_path / "gllm").chmod(0o755)
    script = (f"source {COMPLETIONS / 'gllm.bash'}\n"
              "COMP_WORDS=(gllm eval m); COMP_CWORD=2; _gllm_completion gllm; echo \"${COMPREPLY[*]}\"\n"
              "COMP_WORDS=(gllm bench --dataset ''); COMP_CWORD=3; _gllm_completion gllm; echo \"${COMPREPLY[*]}\"\n")
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.splitlines() == ["mmlu-pro", "sharegpt random jsonl"], out.stderr


def test_the_cli_starts_without_torch():
    """Each <Tab> runs `gllm`: the app and its --help must not import torch or transformers."""
    code = ("import sys; from gllm_cli.main import app; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
