"""gLLM: a small, fast LLM inference engine with a vLLM-shaped API."""

from gllm_engine.entrypoints.llm import LLM
from gllm_engine.outputs import CompletionOutput, Logprob, RequestOutput
from gllm_engine.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "__version__"]
