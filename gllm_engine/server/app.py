"""The OpenAI-compatible HTTP server: starlette routes over one `AsyncLLM`.

Handlers validate with `protocol`, run requests through `AsyncLLM.generate` and shape the answers;
there is no engine logic here. Every failure leaves as OpenAI's error JSON with its status.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from jinja2 import TemplateError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

import gllm_engine
from gllm_engine.entrypoints.async_llm import AsyncLLM, EngineStepError, EngineUnavailableError, QueueFullError
from gllm_engine.loader.tokenizer import apply_chat_template
from gllm_engine.outputs import RequestOutput
from gllm_engine.sampling_params import RequestOutputKind, SamplingParams
from gllm_engine.server import protocol as P
from gllm_engine.server.metrics import ServerMetrics

logger = logging.getLogger(__name__)
T = TypeVar("T")
Prompt = tuple[str | None, list[int]]  # (text if the client sent text, token ids)


class _ClientGone(Exception):
    """The client disconnected before its answer was ready."""


class OpenAIServer:
    """Routes and request handling; `app` is the ASGI application."""

    def __init__(self, llm: AsyncLLM, *, served_model_name: str | None = None, api_key: str | None = None,
                 chat_template: str | None = None):
        self.llm = llm
        self.model_name = served_model_name or llm.config.model.name
        self.api_key = api_key
        self.chat_template = chat_template
        self.vocab_size = llm.config.model.hf_config.vocab_size
        self.metrics = ServerMetrics(llm.stats, self.model_name)
        routes = [
            Route("/health", self.health), Route("/version", self.version), Route("/metrics", self.metrics_route),
            Route("/v1/models", self.models), Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/tokenize", self.tokenize, methods=["POST"]),
            Route("/detokenize", self.detokenize, methods=["POST"]),
        ]
        self.app = Starlette(routes=routes, exception_handlers={
            P.APIError: self._api_error, HTTPException: self._http_error, Exception: self._internal_error})

    # ---- errors ---------------------------------------------------------------------------------------
    @staticmethod
    async def _api_error(request: Request, exc: P.APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @staticmethod
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(P.APIError(exc.status_code, str(exc.detail), kind).body(), status_code=exc.status_code)

    @staticmethod
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.error("request failed", exc_info=exc)
        return JSONResponse(P.APIError(500, f"internal error: {exc}", "internal_server_error").body(),
                            status_code=500)

    # ---- helpers --------------------------------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        if self.api_key and request.headers.get("authorization") != f"Bearer {self.api_key}":
            raise P.APIError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                             "authentication_error", code="invalid_api_key")

    async def _body(self, request: Request) -> dict:
        self._authorize(request)
        body = P.parse_body(await request.body())
        model = P.field(body, "model", "str")
        if model is not None and model != self.model_name:
            raise P.APIError(404, f"the model '{model}' does not exist; this server serves '{self.model_name}'",
                             "not_found_error", "model", "model_not_found")
        return body

    def _tokenizer(self) -> Any:
        if self.llm.tokenizer is None:
            raise P.bad("this server runs without a tokenizer: send token ids")
        return self.llm.tokenizer

    def _prompt(self, prompt: str | list[int]) -> Prompt:
        """Tokenize (text) and check a prompt against the vocabulary and the context length."""
        text, ids = (prompt, self._tokenizer().encode(prompt)) if isinstance(prompt, str) else (None, prompt)
        limit = self.llm.max_model_len
        if not ids:
            raise P.bad("the prompt is empty", "prompt")
        if len(ids) >= limit:
            raise P.bad(f"this model's maximum context length is {limit} tokens, but the prompt has "
                        f"{len(ids)} tokens (at least one must be left to generate)", "prompt")
        if not all(0 <= t < self.vocab_size for t in ids):
            raise P.bad(f"token ids must be in [0, {self.vocab_size})", "prompt")
        return text, ids

    def _chat_ids(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        try:
            return apply_chat_template(self._tokenizer(), messages, self.chat_template, add_generation_prompt)
        except (ValueError, TemplateError) as e:
            raise P.bad(f"the chat template failed on these messages: {e}", "messages") from None

    @staticmethod
    async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
        """Await `work`, cancelling it (and raising _ClientGone) if the client disconnects first."""

        async def disconnected() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        task, watch = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not task.done():
                task.cancel()
        if task.cancelled():
            raise _ClientGone
        return task.result()

    async def _generate(self, prompt: Prompt, params: SamplingParams, request_id: str, salt: str | None
                        ) -> AsyncIterator[RequestOutput]:
        """Engine outputs of one request (DELTA or FINAL_ONLY), errors mapped to API errors, metrics recorded."""
        last = None
        num_tokens: dict[int, int] = {}  # output index -> tokens so far
        finish_reasons: dict[int, str | None] = {}
        text, ids = prompt
        refused = False
        try:
            async for out in self.llm.generate(ids if text is None else text, params, request_id,
                                               prompt_token_ids=ids, cache_salt=salt):
                for o in out.outputs:
                    num_tokens[o.index] = num_tokens.get(o.index, 0) + len(o.token_ids)
                    finish_reasons[o.index] = o.finish_reason
                last = out
                yield out
        except QueueFullError as e:
            refused = True
            raise P.APIError(429, str(e), "rate_limit_error", code="queue_full") from None
        except EngineUnavailableError as e:
            refused = True
            raise P.APIError(503, str(e), "service_unavailable") from None
        except EngineStepError as e:
            raise P.APIError(500, str(e), "internal_server_error") from None
        except ValueError as e:
            refused = True
            raise P.bad(str(e)) from None
        finally:
            if last is not None and last.finished:
                self.metrics.observe_request(last.metrics.arrival_time, last.metrics.first_token_time,
                                             time.monotonic(), max(num_tokens.values()), list(finish_reasons.values()))
            elif not refused:  # the client left, or the engine failed: the request was aborted
                self.metrics.observe_abort(params.n)

    async def _merge(self, prompts: list[Prompt], params: SamplingParams, rid: str, salt: str | None
                     ) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Outputs of every prompt's request, interleaved as they come, tagged with the prompt's index."""
        if len(prompts) == 1:
            async for out in self._generate(prompts[0], params, f"{rid}-0", salt):
                yield 0, out
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, prompt: Prompt) -> None:
            try:
                async for out in self._generate(prompt, params, f"{rid}-{i}", salt):
                    queue.put_nowait((i, out))
                queue.put_nowait((i, None))
            except Exception as e:
                queue.put_nowait(e)

        tasks = [asyncio.create_task(pump(i, p)) for i, p in enumerate(prompts)]
        try:
            remaining = len(tasks)
            while remaining:
                item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                if item[1] is None:
                    remaining -= 1
                else:
                    yield item
        finally:
            for t in tasks:
                t.cancel()

    async def _collect(self, request: Request, prompts: list[Prompt], params: SamplingParams, rid: str,
                       salt: str | None) -> list[RequestOutput]:
        """The final output of every prompt's request; cancelled if the client leaves."""

        async def run() -> list[RequestOutput]:
            finals: list[Any] = [None] * len(prompts)
            async for i, out in self._merge(prompts, params, rid, salt):
                finals[i] = out
            return finals

        return await self._unless_disconnected(request, run())

    async def _stream(self, request: Request, events: AsyncIterator[str]) -> Response:
        """An SSE response, started once the first event is ready so that early errors keep their status."""
        try:
            first = await self._unless_disconnected(request, anext(events, None))
        except _ClientGone:
            return Response(status_code=499)

        async def body() -> AsyncIterator[str]:
            try:
                if first is not None:
                    yield first
                async for event in events:
                    yield event
            except P.APIError as e:  # the status line is gone: report it inside the stream
                yield P.sse(e.body())
                yield P.DONE
            except Exception as e:
                logger.error("stream failed", exc_info=e)
                yield P.sse(P.APIError(500, f"internal error: {e}", "internal_server_error").body())
                yield P.DONE
            finally:
                await events.aclose()

        return StreamingResponse(body(), media_type="text/event-stream")

    # ---- simple routes --------------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        if self.llm.dead:
            return JSONResponse(P.APIError(503, self.llm.dead, "service_unavailable").body(), status_code=503)
        return PlainTextResponse("ok")

    async def version(self, request: Request) -> Response:
        return JSONResponse({"version": gllm_engine.__version__})

    async def metrics_route(self, request: Request) -> Response:
        body, content_type = self.metrics.render()
        return Response(body, media_type=content_type)

    async def models(self, request: Request) -> Response:
        self._authorize(request)
        return JSONResponse({"object": "list", "data": [{
            "id": self.model_name, "object": "model", "created": P.now(), "owned_by": "gllm",
            "max_model_len": self.llm.max_model_len}]})

    async def tokenize(self, request: Request) -> Response:
        body = await self._body(request)
        if "messages" in body:
            ids = self._chat_ids(P.messages(body), P.field(body, "add_generation_prompt", "bool", True))
        else:
            prompt = P.field(body, "prompt", "str")
            if prompt is None:
                raise P.bad("'prompt' (a string) or 'messages' is required", "prompt")
            ids = self._tokenizer().encode(prompt, add_special_tokens=P.field(body, "add_special_tokens", "bool",
                                                                              True))
        return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": self.llm.max_model_len})

    async def detokenize(self, request: Request) -> Response:
        body = await self._body(request)
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(type(t) is int and 0 <= t < self.vocab_size for t in tokens):
            raise P.bad(f"'tokens' must be a list of integers in [0, {self.vocab_size})", "tokens")
        return JSONResponse({"prompt": self._tokenizer().decode(tokens)})

    # ---- completions ----------------------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        body = await self._body(request)
        if body.get("suffix"):
            raise P.bad("'suffix' is not supported", "suffix")
        params = P.sampling_params(body, chat=False)
        echo = P.field(body, "echo", "bool", False)
        stream = P.field(body, "stream", "bool", False)
        params.output_kind = RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY
        include_usage = P.include_usage(body) if stream else False
        salt = P.cache_salt(body)
        prompts = [self._prompt(p) for p in P.prompts(body)]
        rid = P.new_id("cmpl")
        tok = self.llm.tokenizer

        def echoed(i: int) -> str:
            text, ids = prompts[i]
            return "" if not echo else text if text is not None else tok.decode(ids) if tok is not None else ""

        def response(choices: list[dict], **extra: Any) -> dict:
            return {"id": rid, "object": "text_completion", "created": P.now(), "model": self.model_name,
                    "choices": choices, **extra}

        if stream:
            chunks = P.ChunkEncoder(id=rid, object="text_completion", created=P.now(), model=self.model_name)

            async def events() -> AsyncIterator[str]:
                started: set[int] = set()  # choice indices whose first chunk (with the echo) went out
                totals = [0, 0, 0]  # prompt, completion, cached tokens
                async for pi, out in self._merge(prompts, params, rid, salt):
                    for o in out.outputs:  # each output holds only what is new
                        idx = pi * params.n + o.index
                        totals[1] += len(o.token_ids)
                        prefix = echoed(pi) if idx not in started else ""
                        if not (prefix or o.text or o.token_ids or o.finish_reason or o.logprobs):
                            continue  # (a token with no text yet still gets a chunk: clients time it)
                        started.add(idx)
                        yield chunks.event([{"index": idx, "text": prefix + o.text,
                                             "logprobs": P.completion_logprobs(o, tok),
                                             "finish_reason": o.finish_reason}])
                    if out.finished:
                        totals[0] += len(out.prompt_token_ids)
                        totals[2] += out.num_cached_tokens
                if include_usage:
                    yield chunks.event([], usage=P.usage(*totals))
                yield P.DONE

            return await self._stream(request, events())

        try:
            finals = await self._collect(request, prompts, params, rid, salt)
        except _ClientGone:
            return Response(status_code=499)
        choices, totals = [], [0, 0, 0]
        for pi, out in enumerate(finals):
            totals[0] += len(out.prompt_token_ids)
            totals[2] += out.num_cached_tokens
            for o in out.outputs:
                totals[1] += len(o.token_ids)
                choices.append({"index": pi * params.n + o.index, "text": echoed(pi) + o.text,
                                "logprobs": P.completion_logprobs(o, tok), "finish_reason": o.finish_reason})
        return JSONResponse(response(choices, usage=P.usage(*totals)))

    # ---- chat -----------------------------------------------------------------------------------------
    async def chat_completions(self, request: Request) -> Response:
        body = await self._body(request)
        messages = P.messages(body)
        params = P.sampling_params(body, chat=True)
        stream = P.field(body, "stream", "bool", False)
        params.output_kind = RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY
        include_usage = P.include_usage(body) if stream else False
        salt = P.cache_salt(body)
        prompt = self._prompt(self._chat_ids(messages))
        num_prompt = len(prompt[1])
        top_n = params.logprobs or 0
        rid = P.new_id("chatcmpl")
        tok = self.llm.tokenizer

        if stream:
            chunks = P.ChunkEncoder(id=rid, object="chat.completion.chunk", created=P.now(), model=self.model_name)

            async def events() -> AsyncIterator[str]:
                opened: set[int] = set()
                num_completion = 0
                final = None
                async for _, out in self._merge([prompt], params, rid, salt):
                    for o in out.outputs:  # each output holds only what is new
                        num_completion += len(o.token_ids)
                        if o.index not in opened:  # OpenAI opens each choice with the role
                            opened.add(o.index)
                            yield chunks.event([{"index": o.index, "delta": {"role": "assistant", "content": ""},
                                                 "logprobs": None, "finish_reason": None}])
                        if not (o.text or o.token_ids or o.finish_reason or o.logprobs):
                            continue  # (a token with no text yet still gets a chunk: clients time it)
                        yield chunks.event([{"index": o.index,
                                             "delta": {"content": o.text} if o.text or o.token_ids else {},
                                             "logprobs": P.chat_logprobs(o, tok, top_n),
                                             "finish_reason": o.finish_reason}])
                    final = out
                if include_usage and final is not None:
                    yield chunks.event([], usage=P.usage(num_prompt, num_completion, final.num_cached_tokens))
                yield P.DONE

            return await self._stream(request, events())

        try:
            (out,) = await self._collect(request, [prompt], params, rid, salt)
        except _ClientGone:
            return Response(status_code=499)
        choices = [{"index": o.index, "message": {"role": "assistant", "content": o.text},
                    "logprobs": P.chat_logprobs(o, tok, top_n), "finish_reason": o.finish_reason}
                   for o in out.outputs]
        return JSONResponse({"id": rid, "object": "chat.completion", "created": P.now(), "model": self.model_name,
                             "choices": choices, "usage": P.usage(num_prompt, sum(len(o.token_ids)
                                                                                  for o in out.outputs),
                                                                  out.num_cached_tokens)})
