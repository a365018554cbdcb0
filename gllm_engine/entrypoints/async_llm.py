"""`AsyncLLM`: the engine loop on its own thread, per-request async output streams, abort.

The event loop never runs engine steps: commands reach the engine thread through a queue, and each
step's outputs go back to the waiting coroutines with one `call_soon_threadsafe` per event loop.
Outputs are cumulative, so a stream keeps only the newest unread one: a slow consumer gets fewer,
larger updates instead of a growing backlog. A request whose consumer goes away (client
disconnect, task cancelled) is aborted and its blocks return to the pool.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from gllm_engine.config import EngineConfig
from gllm_engine.core.engine_core import EngineCore, EngineStats
from gllm_engine.executor.comm import RankDiedError
from gllm_engine.outputs import RequestOutput
from gllm_engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The waiting queue is at its limit; the client may retry later."""


class EngineUnavailableError(RuntimeError):
    """The engine takes no requests: it is shutting down, or a rank died."""


class EngineStepError(RuntimeError):
    """An engine step failed while this request was in flight (the engine itself goes on)."""


class _Stream:
    """The newest unread output (or error) of one request, handed from the engine thread to one loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.latest: RequestOutput | Exception | None = None
        self.ready = asyncio.Event()

    def put(self, item: RequestOutput | Exception) -> None:  # runs on `loop`
        self.latest = item
        self.ready.set()

    async def get(self) -> RequestOutput | Exception:
        await self.ready.wait()
        self.ready.clear()
        item, self.latest = self.latest, None
        return item


def _put_all(batch: list[tuple[_Stream, RequestOutput | Exception]]) -> None:
    for stream, item in batch:
        stream.put(item)


class AsyncLLM:
    """Asynchronous front end of one `EngineCore`, safe to use from any number of coroutines and loops.

    `max_waiting_requests` bounds the requests queued but not yet scheduled (QueueFullError beyond).
    """

    def __init__(self, config: EngineConfig, *, max_waiting_requests: int | None = None,
                 show_progress: bool = True):
        self.config = config
        self.engine = EngineCore(config, show_progress=show_progress)
        self.tokenizer = self.engine.tokenizer
        self.max_model_len = self.engine.max_seq_len
        self.max_waiting_requests = max_waiting_requests
        self._inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._num_pending = 0  # adds sent to the engine thread, not yet queued in the engine
        self._lock = threading.Lock()
        self._stats = self.engine.stats()
        self._accepting = True
        self._dead: str | None = None  # why the engine cannot serve any more
        self._thread = threading.Thread(target=self._run, name="gllm-engine", daemon=True)
        self._thread.start()

    # ---- the engine thread -------------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        while True:
            idle = not engine.has_unfinished_requests()
            commands = [self._inbox.get()] if idle else []  # sleep until there is work
            while True:  # then take everything queued before stepping
                try:
                    commands.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            for kind, payload in commands:
                if kind == "stop":
                    self._abort(list(engine.requests))
                    return
                if kind == "add":
                    self._add(*payload)
                else:
                    self._abort([payload])
            if engine.has_unfinished_requests():
                self._step()

    def _add(self, request_id: str, token_ids: list[int], params: SamplingParams, prompt: str | None) -> None:
        error: Exception | None = None
        try:
            if self._dead:
                raise EngineUnavailableError(self._dead)
            self.engine.add_request(request_id, token_ids, params, prompt)
        except (ValueError, EngineUnavailableError) as e:
            error = e
        except Exception as e:
            logger.exception("the engine could not take request %s", request_id)
            error = EngineStepError(f"the engine could not take the request: {e}")
        self._stats = self.engine.stats()
        with self._lock:
            self._num_pending -= 1
        if error is not None:
            self._publish([(request_id, error)])

    def _abort(self, request_ids: list[str]) -> None:
        try:
            outputs = self.engine.abort_requests(request_ids)
        except Exception:
            logger.exception("aborting requests failed")
            outputs = []
        self._stats = self.engine.stats()
        self._publish([(out.request_id, out) for out in outputs])

    def _step(self) -> None:
        """One engine step; statistics are updated before anyone hears of its outputs."""
        in_flight = list(self.engine.requests)
        try:
            outputs = self.engine.step()
        except RankDiedError as e:
            logger.exception("a rank died; the engine stops serving")
            self._dead = f"the engine stopped: {e}"
            items: list[tuple[str, RequestOutput | Exception]] = [
                (rid, EngineUnavailableError(self._dead)) for rid in in_flight]
        except Exception as e:  # keep serving: end what was in flight, log the cause
            logger.exception("engine step failed")
            try:
                self.engine.abort_requests(in_flight)
            except Exception:
                logger.exception("aborting requests after a failed step failed")
            items = [(rid, EngineStepError(f"the engine failed: {e}")) for rid in in_flight]
        else:
            items = [(out.request_id, out) for out in outputs]
        self._stats = self.engine.stats()
        self._publish(items)

    def _publish(self, items: list[tuple[str, RequestOutput | Exception]]) -> None:
        """Hand items to their streams: one wake-up per event loop; a final item closes its stream."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, RequestOutput | Exception]]] = {}
        with self._lock:
            for rid, item in items:
                final = isinstance(item, Exception) or item.finished
                stream = self._streams.pop(rid, None) if final else self._streams.get(rid)
                if stream is not None:
                    by_loop.setdefault(stream.loop, []).append((stream, item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # that loop is closed: nobody is waiting any more
                pass

    # ---- the caller's side -------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        """Engine statistics as of the last command or step."""
        return self._stats

    @property
    def dead(self) -> str | None:
        """Why the engine can no longer serve (a rank died), or None while it can."""
        return self._dead

    async def generate(self, prompt: str | list[int], params: SamplingParams, request_id: str, *,
                       prompt_token_ids: list[int] | None = None) -> AsyncIterator[RequestOutput]:
        """Cumulative outputs of one request as the engine produces them; the last has `finished`.

        `prompt` is text (tokenized here, on the caller's thread, unless `prompt_token_ids` already
        holds its ids) or token ids. Raises ValueError for a request the engine rejects,
        QueueFullError when the waiting queue is full, EngineUnavailableError when the engine takes
        no requests, EngineStepError if an engine step fails meanwhile. Leaving the iteration early
        (break, cancellation) aborts the request.
        """
        if self._dead:
            raise EngineUnavailableError(self._dead)
        if not self._accepting:
            raise EngineUnavailableError("the server is shutting down")
        if isinstance(prompt, str):
            text, token_ids = prompt, prompt_token_ids if prompt_token_ids is not None else self._encode(prompt)
        else:
            text, token_ids = None, list(prompt)
        stream = _Stream(asyncio.get_running_loop())
        with self._lock:
            waiting = self._stats.num_waiting + self._num_pending
            if self.max_waiting_requests is not None and waiting >= self.max_waiting_requests:
                raise QueueFullError(f"{waiting} requests are waiting, the limit is {self.max_waiting_requests}")
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._streams[request_id] = stream
            self._num_pending += 1
        self._inbox.put(("add", (request_id, token_ids, params, text)))
        finished = False
        try:
            while not finished:
                item = await stream.get()
                if isinstance(item, Exception):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:  # the consumer left early: free the request's blocks
                with self._lock:
                    self._streams.pop(request_id, None)
                self._inbox.put(("abort", request_id))

    def _encode(self, prompt: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: send token ids")
        return self.tokenizer.encode(prompt)

    def shutdown(self, grace_s: float = 10.0) -> None:
        """Stop accepting, let requests in flight finish for up to `grace_s`, abort the rest, stop."""
        self._accepting = False
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            with self._lock:
                if not self._streams:
                    break
            time.sleep(0.02)
        self._inbox.put(("stop", None))
        self._thread.join(timeout=max(grace_s, 30.0))
        if self._thread.is_alive():  # a step that never returns: leave the daemon thread to the exit
            logger.error("the engine thread did not stop")
            return
        self.engine.shutdown()
