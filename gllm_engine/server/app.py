"""The OpenAI-compatible HTTP server: starlette routes over one `AsyncLLM`."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

import gllm_engine
from gllm_engine.entrypoints.async_llm import AsyncLLM, EngineDeadError, QueueFullError
from gllm_engine.loader.tokenizer import apply_chat_template
from gllm_engine.outputs import RequestOutput
from gllm_engine.server import protocol as P
from gllm_engine.server.metrics import ServerMetrics

logger = logging.getLogger(__name__)


class OpenAIServer:
    """Routes and request handling; `app` is the ASGI application."""

    def __init__(self, llm: AsyncLLM, *, served_model_name: str | None = None, api_key: str | None = None,
                 chat_template: str | None = None):
        self.llm = llm
        self.model_name = served_model_name or llm.config.model.name
        self.api_key = api_key
        self.chat_template = chat_template
        self.metrics = ServerMetrics(llm)
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
        logger.exception("request failed")
        return JSONResponse(P.APIError(500, f"internal error: {exc}", "internal_server_error").body(), status_code=500)

    # ---- helpers --------------------------------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        if self.api_key and request.headers.get("authorization") != f"Bearer {self.api_key}":
            raise P.APIError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                             "authentication_error")

    async def _body(self, request: Request) -> dict:
        self._authorize(request)
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise P.bad(f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise P.bad("the request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise P.APIError(404, f"the model '{model}' does not exist; this server serves '{self.model_name}'",
                             "not_found_error", "model", "model_not_found")
        return body

    def _tokenizer(self) -> Any:
        if self.llm.tokenizer is None:
            raise P.bad("this server runs without a tokenizer: send token ids")
        return self.llm.tokenizer

    def _check_length(self, token_ids: list[int]) -> None:
        limit = self.llm.engine.max_seq_len
        if not token_ids:
            raise P.bad("the prompt is empty", "prompt")
        if len(token_ids) >= limit:
            raise P.bad(f"this model's maximum context length is {limit} tokens, but the prompt has "
                        f"{len(token_ids)} tokens (at least one must be left to generate)", "prompt")

    async def _generate(self, token_ids: list[int], params, request_id: str, prompt: str | None
                        ) -> AsyncIterator[RequestOutput]:
        """Engine outputs of one request, with errors mapped to API errors and metrics recorded."""
        start, first = time.monotonic(), None
        last = None
        try:
            async for out in self.llm.generate(token_ids, params, request_id, prompt):
                if first is None and any(o.token_ids for o in out.outputs):
                    first = time.monotonic()
                last = out
                yield out
        except QueueFullError as e:
            raise P.APIError(429, str(e), "rate_limit_error") from None
        except EngineDeadError as e:
            raise P.APIError(500, str(e), "internal_server_error") from None
        except ValueError as e:
            raise P.bad(str(e)) from None
        finally:
            if last is not None and last.finished:
                generated = sum(len(o.token_ids) for o in last.outputs)
                self.metrics.observe_request(start, first, time.monotonic(), generated)

    # ---- simple routes --------------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
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
            "max_model_len": self.llm.engine.max_seq_len}]})

    async def tokenize(self, request: Request) -> Response:
        body = await self._body(request)
        tok = self._tokenizer()
        if "messages" in body:
            ids = apply_chat_template(tok, self._messages(body), self.chat_template)
        else:
            prompt = P.field(body, "prompt", "str")
            if prompt is None:
                raise P.bad("'prompt' (a string) or 'messages' is required", "prompt")
            ids = tok.encode(prompt, add_special_tokens=P.field(body, "add_special_tokens", "bool", True))
        return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": self.llm.engine.max_seq_len})

    async def detokenize(self, request: Request) -> Response:
        body = await self._body(request)
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) and t >= 0 for t in tokens):
            raise P.bad("'tokens' must be a list of non-negative integers", "tokens")
        return JSONResponse({"prompt": self._tokenizer().decode(tokens)})

    # ---- completions ----------------------------------------------------------------------------------
    def _prompts(self, body: dict) -> list[tuple[str | None, list[int]]]:
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            prompt = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt:
            raise P.bad("'prompt' must be a string, a list of strings, token ids or lists of token ids", "prompt")
        out = []
        for p in prompt:
            if isinstance(p, str):
                out.append((p, self._tokenizer().encode(p)))
            elif isinstance(p, list) and all(isinstance(t, int) for t in p):
                out.append((None, list(p)))
            else:
                raise P.bad("each prompt must be a string or a list of token ids", "prompt")
        vocab = self.llm.config.model.hf_config.vocab_size
        for _, ids in out:
            self._check_length(ids)
            if any(not 0 <= t < vocab for t in ids):
                raise P.bad(f"token ids must be in [0, {vocab})", "prompt")
        return out

    async def completions(self, request: Request) -> Response:
        body = await self._body(request)
        if body.get("suffix"):
            raise P.bad("'suffix' is not supported", "suffix")
        prompts = self._prompts(body)
        params = P.sampling_params(body, chat=False)
        echo = P.field(body, "echo", "bool", False)
        rid = P.new_id("cmpl")
        stream = P.field(body, "stream", "bool", False)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage")) if stream else False
        tok = self.llm.tokenizer

        def choice_text(prompt_text: str | None, prompt_ids: list[int], text: str) -> str:
            if not echo:
                return text
            return (prompt_text if prompt_text is not None else tok.decode(prompt_ids) if tok else "") + text

        if stream:
            async def events() -> AsyncIterator[str]:
                sent: dict[int, int] = {}  # per choice: characters sent
                tokens_sent: dict[int, int] = {}  # per choice: tokens whose logprobs were sent
                usage = [0, 0, 0]
                async for pi, out in self._merge(prompts, params, rid):
                    for o in out.outputs:
                        idx = pi * params.n + o.index
                        start = sent.get(idx, 0)
                        if start == 0 and echo and (o.text or o.finish_reason):
                            prefix = choice_text(out.prompt, out.prompt_token_ids, "")
                        else:
                            prefix = ""
                        delta = o.text[start:]
                        if not delta and not prefix and o.finish_reason is None:
                            continue
                        sent[idx] = len(o.text)
                        lp = P.completion_logprobs(o, tok, tokens_sent.get(idx, 0))
                        tokens_sent[idx] = len(o.token_ids)
                        yield _sse({"id": rid, "object": "text_completion", "created": P.now(),
                                    "model": self.model_name, "choices": [{
                                        "index": idx, "text": prefix + delta, "finish_reason": o.finish_reason,
                                        "logprobs": lp}]})
                    if out.finished:
                        usage[0] += len(out.prompt_token_ids)
                        usage[1] += sum(len(o.token_ids) for o in out.outputs)
                        usage[2] += out.num_cached_tokens
                if include_usage:
                    yield _sse({"id": rid, "object": "text_completion", "created": P.now(), "model": self.model_name,
                                "choices": [], "usage": P.usage(*usage)})
                yield "data: [DONE]\n\n"
            return await self._stream(events())

        finals = await self._collect(prompts, params, rid)
        choices, usage = [], [0, 0, 0]
        for pi, out in enumerate(finals):
            usage[0] += len(out.prompt_token_ids)
            usage[2] += out.num_cached_tokens
            for o in out.outputs:
                usage[1] += len(o.token_ids)
                choices.append({"index": pi * params.n + o.index,
                                "text": choice_text(out.prompt, out.prompt_token_ids, o.text),
                                "finish_reason": o.finish_reason, "logprobs": P.completion_logprobs(o, tok)})
        return JSONResponse({"id": rid, "object": "text_completion", "created": P.now(), "model": self.model_name,
                             "choices": choices, "usage": P.usage(*usage)})

    # ---- chat -----------------------------------------------------------------------------------------
    @staticmethod
    def _messages(body: dict) -> list[dict]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise P.bad("'messages' must be a non-empty list", "messages")
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer"):
                raise P.bad(f"messages[{i}] needs a role of system, user or assistant", "messages")
            content = m.get("content")
            if isinstance(content, list):
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                           for p in content):
                    raise P.bad(f"messages[{i}].content parts must be {{'type': 'text', 'text': ...}}", "messages")
                content = "".join(p["text"] for p in content)
            if not isinstance(content, str):
                raise P.bad(f"messages[{i}].content must be a string or a list of text parts", "messages")
            out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
        return out

    async def chat_completions(self, request: Request) -> Response:
        body = await self._body(request)
        messages = self._messages(body)
        try:
            ids = apply_chat_template(self._tokenizer(), messages, self.chat_template)
        except ValueError as e:
            raise P.bad(str(e), "messages") from None
        self._check_length(ids)
        params = P.sampling_params(body, chat=True)
        top_n = params.logprobs or 0
        rid = P.new_id("chatcmpl")
        tok = self.llm.tokenizer
        stream = P.field(body, "stream", "bool", False)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage")) if stream else False
        prompts = [(None, ids)]

        def chunk(choices: list[dict], **extra) -> str:
            return _sse({"id": rid, "object": "chat.completion.chunk", "created": P.now(), "model": self.model_name,
                         "choices": choices, **extra})

        if stream:
            async def events() -> AsyncIterator[str]:
                sent: dict[int, int] = {}
                tokens_sent: dict[int, int] = {}
                final = None
                async for _, out in self._merge(prompts, params, rid):
                    for o in out.outputs:
                        start = sent.get(o.index)
                        if start is None:
                            start = sent[o.index] = 0
                            yield chunk([{"index": o.index, "delta": {"role": "assistant", "content": ""},
                                          "logprobs": None, "finish_reason": None}])
                        delta = o.text[start:]
                        if not delta and o.finish_reason is None:
                            continue
                        sent[o.index] = len(o.text)
                        lp = P.chat_logprobs(o, tok, top_n, tokens_sent.get(o.index, 0))
                        tokens_sent[o.index] = len(o.token_ids)
                        yield chunk([{"index": o.index, "delta": {"content": delta} if delta else {},
                                      "logprobs": lp, "finish_reason": o.finish_reason}])
                    final = out
                if include_usage and final is not None:
                    yield chunk([], usage=P.usage(len(ids), sum(len(o.token_ids) for o in final.outputs),
                                                  final.num_cached_tokens))
                yield "data: [DONE]\n\n"
            return await self._stream(events())

        (out,) = await self._collect(prompts, params, rid)
        choices = [{"index": o.index, "message": {"role": "assistant", "content": o.text},
                    "logprobs": P.chat_logprobs(o, tok, top_n), "finish_reason": o.finish_reason}
                   for o in out.outputs]
        return JSONResponse({"id": rid, "object": "chat.completion", "created": P.now(), "model": self.model_name,
                             "choices": choices, "usage": P.usage(len(ids), sum(len(o.token_ids) for o in out.outputs),
                                                                  out.num_cached_tokens)})

    # ---- running requests -----------------------------------------------------------------------------
    async def _collect(self, prompts: list[tuple[str | None, list[int]]], params, rid: str) -> list[RequestOutput]:
        async def one(i: int, text: str | None, ids: list[int]) -> RequestOutput:
            last = None
            async for out in self._generate(ids, params, f"{rid}-{i}", text):
                last = out
            return last

        return list(await asyncio.gather(*(one(i, t, ids) for i, (t, ids) in enumerate(prompts))))

    async def _merge(self, prompts: list[tuple[str | None, list[int]]], params, rid: str
                     ) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Outputs of several prompts' requests, interleaved as they come, tagged with the prompt index."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, text: str | None, ids: list[int]) -> None:
            try:
                async for out in self._generate(ids, params, f"{rid}-{i}", text):
                    await queue.put((i, out))
            except Exception as e:
                await queue.put(e)
            finally:
                await queue.put((i, None))

        tasks = [asyncio.create_task(pump(i, t, ids)) for i, (t, ids) in enumerate(prompts)]
        try:
            remaining = len(tasks)
            while remaining:
                item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                if item[1] is None:
                    remaining -= 1
                    continue
                yield item
        finally:
            for t in tasks:
                t.cancel()

    async def _stream(self, events: AsyncIterator[str]) -> Response:
        """Start an SSE response once the first event is ready, so early errors still get a status code."""
        try:
            first = await events.__anext__()
        except StopAsyncIteration:
            first = None

        async def body() -> AsyncIterator[str]:
            if first is not None:
                yield first
            try:
                async for event in events:
                    yield event
            except P.APIError as e:  # after the status line: report it in the stream
                yield _sse(e.body())
                yield "data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream")


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"
