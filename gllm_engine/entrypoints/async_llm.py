"""`AsyncLLM`: per-request async output streams over an engine loop, with abort and a waiting limit.

The engine loop (`engine_loop`) runs in an engine process of its own (the default on GPUs and with
several ranks) or on a thread of this process (the default on a CPU with one rank); see
`engine_client`. Either way the event loops never run engine work: commands go to the engine
through a queue, and each batch of engine outputs comes back as one `call_soon_threadsafe` per
event loop.

The engine reports deltas (new token ids, text, logprobs), and each request's stream merges them
as they arrive, so the work per token is the same however long a request grows. A consumer gets
what its `output_kind` asks for: DELTA what is new since its previous output, CUMULATIVE all so
far, FINAL_ONLY one output at the end. A slow consumer gets fewer, larger outputs instead of a
backlog. A request whose consumer goes away (client disconnect, task cancelled) is aborted and its
blocks return to the pool.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from gllm_engine.config import EngineConfig
from gllm_engine.core.engine_core import EngineStats
from gllm_engine.entrypoints.engine_client import ProcessEngineClient, ThreadEngineClient
from gllm_engine.entrypoints.engine_loop import Delta, EngineBatch, EngineStepError, EngineUnavailableError
from gllm_engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from gllm_engine.sampling_params import RequestOutputKind, SamplingParams

__all__ = ["AsyncLLM", "EngineStepError", "EngineUnavailableError", "QueueFullError"]

_DELTA, _FINAL_ONLY = RequestOutputKind.DELTA, RequestOutputKind.FINAL_ONLY


class QueueFullError(RuntimeError):
    """The waiting queue is at its limit; the client may retry later."""


class _Choice:
    """One of a request's outputs as merged so far: since the consumer's last read (DELTA), or all."""

    __slots__ = ("index", "texts", "token_ids", "logprobs", "finish_reason", "stop_reason", "fresh")

    def __init__(self, index: int, with_logprobs: bool):
        self.index = index
        self.texts: list[str] = []
        self.token_ids: list[int] = []
        self.logprobs: list | None = [] if with_logprobs else None
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.fresh = False  # changed since the consumer's last read


class _Stream:
    """One request on its caller's event loop: engine deltas merged in, outputs handed out on demand.

    `put` and `fail` run on `loop` (called from the engine's thread through call_soon_threadsafe).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, request_id: str, prompt: str | None,
                 prompt_token_ids: list[int], params: SamplingParams):
        self.loop = loop
        self.request_id, self.prompt, self.prompt_token_ids = request_id, prompt, prompt_token_ids
        self.kind = params.output_kind
        self.with_logprobs = params.logprobs is not None
        self.choices: dict[int, _Choice] = {}
        self.num_cached_tokens = 0
        self.finished = False
        self.ended = False  # the engine is done with the request: finished or failed
        self.error: Exception | None = None
        self.metrics = RequestMetrics(arrival_time=time.monotonic())
        self.ready = asyncio.Event()

    def put(self, delta: Delta) -> None:
        _, finished, self.num_cached_tokens, choices = delta
        for index, text, token_ids, finish_reason, stop_reason, logprobs in choices:
            choice = self.choices.get(index)
            if choice is None:
                choice = self.choices[index] = _Choice(index, self.with_logprobs)
            if text:
                choice.texts.append(text)
            choice.token_ids += token_ids
            if logprobs:
                choice.logprobs += logprobs
            choice.finish_reason, choice.stop_reason = finish_reason, stop_reason
            choice.fresh = True
            if token_ids and self.metrics.first_token_time is None:
                self.metrics.first_token_time = time.monotonic()
        if finished:
            self.finished = self.ended = True
        if finished or self.kind is not _FINAL_ONLY:
            self.ready.set()

    def fail(self, error: Exception) -> None:
        self.error, self.ended = error, True
        self.ready.set()

    async def get(self) -> RequestOutput:
        """The next output the consumer's kind asks for; raises the request's error instead, if any."""
        await self.ready.wait()
        self.ready.clear()
        if self.error is not None:
            raise self.error
        outputs = []
        choices = self.choices.values() if len(self.choices) < 2 else sorted(self.choices.values(),
                                                                             key=lambda c: c.index)
        for c in choices:
            if self.kind is _DELTA and not c.fresh:
                continue
            c.fresh = False
            text = c.texts[0] if len(c.texts) == 1 else "".join(c.texts)
            if self.kind is RequestOutputKind.CUMULATIVE:  # copies: later merges must not change this output
                c.texts = [text] if text else []
                outputs.append(CompletionOutput(c.index, text, list(c.token_ids), c.finish_reason, c.stop_reason,
                                                list(c.logprobs) if c.logprobs is not None else None))
            else:  # the gathered lists change hands; a delta starts afresh
                outputs.append(CompletionOutput(c.index, text, c.token_ids, c.finish_reason, c.stop_reason,
                                                c.logprobs))
                c.texts, c.token_ids = [], []
                c.logprobs = [] if c.logprobs is not None else None
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, self.num_cached_tokens,
                             self.finished, outputs, self.metrics)


def _deliver(items: list[tuple[_Stream, Delta | Exception]]) -> None:
    for stream, item in items:
        if isinstance(item, Exception):
            stream.fail(item)
        else:
            stream.put(item)


def _hand_over(by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, Delta | Exception]]]) -> None:
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_deliver, items)
        except RuntimeError:  # that loop is closed: nobody is waiting any more
            pass


def default_engine_process(config: EngineConfig) -> bool:
    """Whether the engine gets a process of its own by default: on a GPU, or with several ranks."""
    return config.device.device.type == "cuda" or config.parallel.world_size > 1


class AsyncLLM:
    """Asynchronous front end of one engine, safe to use from any number of coroutines and event loops.

    `engine_process` runs the engine in a process of its own (None: `default_engine_process`).
    `max_waiting_requests` bounds the requests queued but not yet scheduled (QueueFullError beyond).
    `engine` is the `EngineCore` when it runs on a thread of this process, else None; `engine_pid`
    is the engine process's id, else None.
    """

    def __init__(self, config: EngineConfig, *, max_waiting_requests: int | None = None,
                 show_progress: bool = True, engine_process: bool | None = None):
        self.config = config
        self.max_waiting_requests = max_waiting_requests
        self._streams: dict[str, _Stream] = {}
        self._num_pending = 0  # adds sent to the engine, not yet taken by it
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # notified when the last stream ends
        self._accepting = True
        self._dead: str | None = None  # why the engine cannot serve any more
        use_process = default_engine_process(config) if engine_process is None else engine_process
        client = ProcessEngineClient if use_process else ThreadEngineClient
        self._client = client(config, show_progress=show_progress, on_batch=self._on_batch, on_lost=self._on_lost)
        self._stats: EngineStats = self._client.stats
        self.engine = self._client.engine
        self.engine_pid = self._client.pid
        self.tokenizer: Any = self._client.tokenizer
        self.max_model_len: int = self._client.max_model_len

    # ---- the engine's side (its loop thread, or the thread receiving from the engine process) --------
    def _on_batch(self, batch: EngineBatch) -> None:
        """Statistics first, then the batch's news to its streams: one wake-up per event loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, Delta | Exception]]] = {}
        with self._lock:
            self._stats = batch.stats
            self._num_pending -= batch.num_added
            if batch.dead:
                self._dead = batch.dead
            streams = self._streams
            for delta in batch.deltas:
                stream = streams.pop(delta[0], None) if delta[1] else streams.get(delta[0])
                if stream is not None:
                    by_loop.setdefault(stream.loop, []).append((stream, delta))
            for request_id, error in batch.errors:
                stream = streams.pop(request_id, None)
                if stream is not None:
                    by_loop.setdefault(stream.loop, []).append((stream, error))
            if not streams:
                self._idle.notify_all()
        _hand_over(by_loop)

    def _on_lost(self, reason: str) -> None:
        """The engine is gone: every request in flight fails, and no new one is taken."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, Delta | Exception]]] = {}
        with self._lock:
            self._dead = reason
            for stream in self._streams.values():
                by_loop.setdefault(stream.loop, []).append((stream, EngineUnavailableError(reason)))
            self._streams.clear()
            self._num_pending = 0
            self._idle.notify_all()
        _hand_over(by_loop)

    # ---- the caller's side ---------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        """Engine statistics as of its last reported round of commands or step."""
        return self._stats

    @property
    def dead(self) -> str | None:
        """Why the engine can no longer serve (a rank or the engine process died), or None while it can."""
        return self._dead

    async def generate(self, prompt: str | list[int], params: SamplingParams, request_id: str, *,
                       prompt_token_ids: list[int] | None = None,
                       cache_salt: str | None = None) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as the engine produces them, shaped by `params.output_kind`; the last
        has `finished`. Each carries `metrics` (arrival and first-token times).

        `prompt` is text (tokenized here, on the caller's thread, unless `prompt_token_ids` already
        holds its ids) or token ids. Raises ValueError for a request the engine rejects,
        QueueFullError when the waiting queue is full, EngineUnavailableError when the engine takes
        no requests (or goes away meanwhile), EngineStepError if an engine step fails meanwhile.
        Leaving the iteration early (break, cancellation) aborts the request. `cache_salt`: share cached
        prefix blocks only with requests of the same salt.
        """
        if isinstance(prompt, str):
            text, token_ids = prompt, prompt_token_ids if prompt_token_ids is not None else self._encode(prompt)
        else:
            text, token_ids = None, list(prompt)
        stream = _Stream(asyncio.get_running_loop(), request_id, text, token_ids, params)
        with self._lock:
            if self._dead:
                raise EngineUnavailableError(self._dead)
            if not self._accepting:
                raise EngineUnavailableError("the server is shutting down")
            waiting = self._stats.num_waiting + self._num_pending
            if self.max_waiting_requests is not None and waiting >= self.max_waiting_requests:
                raise QueueFullError(f"{waiting} requests are waiting, the limit is {self.max_waiting_requests}")
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._streams[request_id] = stream
            self._num_pending += 1
        # The engine always reports deltas; the stream shapes them for the consumer.
        self._client.send(("add", (request_id, token_ids, replace(params, output_kind=_DELTA), None, cache_salt)))
        try:
            while True:
                out = await stream.get()
                yield out
                if out.finished:
                    break
        finally:
            if not stream.ended:  # the consumer left early: free the request's blocks
                with self._lock:
                    self._streams.pop(request_id, None)
                    if not self._streams:
                        self._idle.notify_all()
                self._client.send(("abort", request_id))

    def _encode(self, prompt: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: send token ids")
        return self.tokenizer.encode(prompt)

    def shutdown(self, grace_s: float = 10.0) -> None:
        """Stop accepting, let requests in flight finish for up to `grace_s`, abort the rest, stop the engine."""
        with self._lock:
            self._accepting = False
            self._idle.wait_for(lambda: not self._streams, timeout=grace_s)
        self._client.stop(timeout_s=max(grace_s, 30.0))
        if self._streams:  # the engine had to be killed, or its thread never stopped
            self._on_lost("the engine stopped before its requests ended")
