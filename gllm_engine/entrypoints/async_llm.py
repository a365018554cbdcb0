"""`AsyncLLM`: the engine loop on its own thread, per-request async output streams, abort.

The event loop never runs engine steps: requests reach the engine thread through a queue, and
each step's outputs come back to the waiting coroutines with `call_soon_threadsafe`. A request
whose consumer goes away (client disconnect, task cancelled) is aborted and its blocks freed.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from gllm_engine.config import EngineConfig
from gllm_engine.core.engine_core import EngineCore, EngineStats
from gllm_engine.outputs import RequestOutput
from gllm_engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The waiting queue is at its limit; try again later."""


class EngineDeadError(RuntimeError):
    """The engine failed while this request was in flight."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)


class AsyncLLM:
    """Asynchronous front end of one `EngineCore`, safe to use from any number of coroutines."""

    def __init__(self, config: EngineConfig, *, max_waiting_requests: int | None = None,
                 show_progress: bool = True):
        self.config = config
        self.engine = EngineCore(config, show_progress=show_progress)
        self.tokenizer = self.engine.tokenizer
        self.max_waiting_requests = max_waiting_requests
        self._inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._stats = self.engine.stats()
        self._accepting = True
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gllm-engine", daemon=True)
        self._thread.start()

    # ---- the engine thread -------------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        while not self._stop.is_set():
            try:
                kind, payload = self._inbox.get(timeout=0.05 if not engine.has_unfinished_requests() else 0)
                self._handle(kind, payload)
                continue  # drain the inbox before stepping
            except queue.Empty:
                pass
            if not engine.has_unfinished_requests():
                continue
            try:
                outputs = engine.step()
            except Exception as e:  # keep serving: fail what was in flight, log the cause
                logger.exception("engine step failed")
                self._fail_all(EngineDeadError(f"the engine failed: {e}"))
                continue
            self._stats = engine.stats()
            for out in outputs:
                self._deliver(out.request_id, out, done=out.finished)

    def _handle(self, kind: str, payload: Any) -> None:
        if kind == "add":
            rid, token_ids, params, prompt = payload
            try:
                self.engine.add_request(rid, token_ids, params, prompt)
            except ValueError as e:
                self._deliver(rid, e, done=True)
        elif kind == "abort":
            for out in self.engine.abort_requests([payload]):
                self._deliver(out.request_id, out, done=True)
        self._stats = self.engine.stats()

    def _deliver(self, request_id: str, item: RequestOutput | Exception, *, done: bool) -> None:
        with self._lock:
            stream = self._streams.pop(request_id, None) if done else self._streams.get(request_id)
        if stream is not None:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)

    def _fail_all(self, error: Exception) -> None:
        self.engine.abort_requests(list(self.engine.requests))
        with self._lock:
            streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, error)

    # ---- the caller's side -------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        """Engine statistics as of the last step."""
        return self._stats

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str,
                       prompt: str | None = None) -> AsyncIterator[RequestOutput]:
        """Cumulative outputs of one request as the engine produces them; the last has `finished`.

        Raises ValueError for a request the engine rejects, QueueFullError when the waiting queue
        is full, EngineDeadError if the engine fails meanwhile.
        """
        if not self._accepting:
            raise QueueFullError("the server is shutting down")
        if self.max_waiting_requests is not None and self._stats.num_waiting >= self.max_waiting_requests:
            raise QueueFullError(f"{self._stats.num_waiting} requests are waiting, the limit is "
                                 f"{self.max_waiting_requests}")
        stream = _Stream(asyncio.get_running_loop())
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._streams[request_id] = stream
        self._inbox.put(("add", (request_id, prompt_token_ids, params, prompt)))
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, Exception):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:  # the consumer left early: free the request's blocks
                with self._lock:
                    self._streams.pop(request_id, None)
                self._inbox.put(("abort", request_id))

    def shutdown(self, grace_s: float = 10.0) -> None:
        """Stop accepting, let running requests finish for up to `grace_s`, abort the rest, stop."""
        self._accepting = False
        deadline = time.monotonic() + grace_s
        while self.engine.has_unfinished_requests() and time.monotonic() < deadline:
            time.sleep(0.05)
        for rid in list(self.engine.requests):
            self._inbox.put(("abort", rid))
        time.sleep(0.1)
        self._stop.set()
        self._thread.join(timeout=5)
        self.engine.shutdown()
