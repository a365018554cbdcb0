"""`LLM`: offline, blocking generation with vLLM's API shape."""

from __future__ import annotations

import itertools
from collections.abc import Sequence as SequenceABC
from dataclasses import replace
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from gllm_engine.config import EngineConfig
from gllm_engine.core.engine_core import EngineCore
from gllm_engine.loader.tokenizer import apply_chat_template
from gllm_engine.outputs import RequestOutput
from gllm_engine.sampling_params import RequestOutputKind, SamplingParams

PromptType = str | dict[str, Any]


class LLM:
    """Load a model once, then `generate` or `chat` over batches of prompts.

    `model=None` serves the embedded default model (SmolLM2-135M-Instruct). Every keyword is an
    `EngineConfig.create` option.
    """

    def __init__(self, model: str | None = None, *, dtype: str = "auto", device: str = "auto",
                 max_model_len: int | None = None, block_size: int | None = None, gpu_memory_utilization: float = 0.9,
                 num_gpu_blocks_override: int | None = None, enable_prefix_caching: bool = True,
                 max_num_seqs: int | None = None,
                 max_num_batched_tokens: int | None = None, enable_chunked_prefill: bool = True,
                 enforce_eager: bool = False, load_format: str = "auto", seed: int = 0,
                 tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1, show_progress: bool = True,
                 **kwargs: Any):
        self.config = EngineConfig.create(
            model, dtype=dtype, device=device, max_model_len=max_model_len, block_size=block_size,
            gpu_memory_utilization=gpu_memory_utilization, num_gpu_blocks_override=num_gpu_blocks_override,
            enable_prefix_caching=enable_prefix_caching,
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
            enable_chunked_prefill=enable_chunked_prefill, enforce_eager=enforce_eager,
            load_format=load_format, seed=seed, tensor_parallel_size=tensor_parallel_size,
            pipeline_parallel_size=pipeline_parallel_size, **kwargs)
        self.engine = EngineCore(self.config, show_progress=show_progress)
        self._ids = itertools.count()

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(self, prompts: PromptType | list[PromptType],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None, *,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Generate for each prompt (a string, or a dict of "prompt" or "prompt_token_ids" and an optional
        "cache_salt"); outputs in input order."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        # Offline callers only see finished requests: skip building per-step outputs.
        params = [replace(p, output_kind=RequestOutputKind.FINAL_ONLY)
                  for p in self._params_for(sampling_params, len(prompts))]
        request_ids = []
        try:
            for prompt, p in zip(prompts, params):
                text, token_ids = self._tokenize(prompt)
                rid = str(next(self._ids))
                salt = prompt.get("cache_salt") if isinstance(prompt, dict) else None
                self.engine.add_request(rid, token_ids, p, prompt=text, cache_salt=salt)
                request_ids.append(rid)
        except Exception:
            self.engine.abort_requests(request_ids)
            raise
        return self._run(request_ids, use_tqdm)

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | list[SamplingParams] | None = None, *,
             chat_template: str | None = None, add_generation_prompt: bool = True,
             use_tqdm: bool = False) -> list[RequestOutput]:
        """Apply the chat template to one conversation or a list of them, then `generate`."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [{"prompt_token_ids": apply_chat_template(self._require_tokenizer(), conv, chat_template,
                                                            add_generation_prompt)}
                   for conv in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    # ---- helpers ----------------------------------------------------------------------------------
    def _require_tokenizer(self) -> Any:
        if self.engine.tokenizer is None:
            raise ValueError("this LLM was created with skip_tokenizer_init=True: pass prompt_token_ids")
        return self.engine.tokenizer

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self._require_tokenizer().encode(prompt)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            return prompt.get("prompt"), list(prompt["prompt_token_ids"])
        if isinstance(prompt, dict) and "prompt" in prompt:
            return prompt["prompt"], self._require_tokenizer().encode(prompt["prompt"])
        raise ValueError("a prompt must be a string or a dict with 'prompt' or 'prompt_token_ids'")

    @staticmethod
    def _params_for(sampling_params: SamplingParams | list[SamplingParams] | None, n: int) -> list[SamplingParams]:
        if sampling_params is None:
            return [SamplingParams() for _ in range(n)]
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * n
        if isinstance(sampling_params, SequenceABC) and len(sampling_params) == n:
            return list(sampling_params)
        raise ValueError(f"sampling_params must be one SamplingParams or a list of {n} (one per prompt)")

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        results: dict[str, RequestOutput] = {}
        with Progress(TextColumn("Generating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      disable=not use_tqdm, transient=True) as progress:
            task = progress.add_task("generate", total=len(request_ids))
            try:
                while self.engine.has_unfinished_requests():
                    for out in self.engine.step():
                        if out.finished:
                            results[out.request_id] = out
                            progress.advance(task)
            except BaseException:
                # Interrupted (Ctrl-C) or failed: nothing stays queued and every block goes back.
                self.engine.abort_requests([rid for rid in request_ids if rid not in results])
                raise
        return [results[rid] for rid in request_ids]
