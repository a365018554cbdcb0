"""An `AsyncLLM` over a tiny random Llama (SmolLM2's tokenizer) for in-process server tests."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gllm_engine.config import EngineConfig
from gllm_engine.entrypoints.async_llm import AsyncLLM


@pytest.fixture(scope="session")
def tiny_config(tiny_model_dir: Callable[..., Path]) -> EngineConfig:
    return EngineConfig.create(str(tiny_model_dir("LlamaForCausalLM")), device="cpu", cpu_kv_cache_gib=0.01)


@pytest.fixture
def make_llm(tiny_config: EngineConfig) -> Iterator[Callable[..., AsyncLLM]]:
    """Factory of AsyncLLMs on the tiny model; each is shut down after the test."""
    made: list[AsyncLLM] = []

    def make(**kwargs) -> AsyncLLM:
        made.append(AsyncLLM(tiny_config, show_progress=False, **kwargs))
        return made[-1]

    yield make
    for llm in made:
        llm.shutdown(grace_s=0)


class StepGate:
    """Wraps an engine's `step`: lets `after` steps through, then holds each until `open()`;
    with `fail`, the first held step raises it instead of stepping."""

    def __init__(self, llm: AsyncLLM, *, closed: bool = False, fail: BaseException | None = None, after: int = 0):
        self.step, self.fail, self.after = llm.engine.step, fail, after
        self.opened = threading.Event()
        self.entered = threading.Event()
        if not closed:
            self.opened.set()
        llm.engine.step = self

    def __call__(self):
        if self.after > 0:
            self.after -= 1
            return self.step()
        self.entered.set()
        self.opened.wait()
        if self.fail is not None:
            error, self.fail = self.fail, None
            raise error
        return self.step()

    def open(self) -> None:
        self.opened.set()


def slow_down_steps(llm: AsyncLLM, seconds: float) -> None:
    """Make every engine step of `llm` take at least `seconds` longer (to outlast a deadline)."""
    step = llm.engine.step

    def slow_step():
        time.sleep(seconds)
        return step()

    llm.engine.step = slow_step
