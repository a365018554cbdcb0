"""gLLM: a small, fast LLM inference engine with a vLLM-shaped API.

`LLM` is imported on first use, so that importing the package (the CLI's --help and shell
completion do) does not pay for torch and transformers.
"""

from typing import Any

from gllm_engine.outputs import CompletionOutput, Logprob, RequestOutput
from gllm_engine.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from gllm_engine.entrypoints.llm import LLM

        return LLM
    raise AttributeError(f"module 'gllm_engine' has no attribute {name!r}")
