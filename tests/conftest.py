"""Fixtures shared by every test suite."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import make_tiny_model_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory: `tiny_model_dir("Qwen3ForCausalLM", **kw)` writes a fresh tiny model dir (see tests.helpers)."""

    def make(arch: str = "LlamaForCausalLM", **kwargs) -> Path:
        return make_tiny_model_dir(arch, tmp_path_factory.mktemp(arch), **kwargs)

    return make
