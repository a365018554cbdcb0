"""OpenAI request validation and response shapes; errors in OpenAI's JSON format; SSE framing.

Requests are plain dicts checked field by field, so every rejection names the field and the rule.
Nothing here touches the engine: the app turns what these functions return into engine calls.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from typing import Any

from gllm_engine.outputs import CompletionOutput, Logprob
from gllm_engine.sampling_params import SamplingParams

MAX_N = 128  # OpenAI's limit on choices per request; also bounds the sequences one request can create
SEED_RANGE = (-(2**63), 2**63 - 1)  # what a torch.Generator takes, with room for the n samples' seed + i
DONE = "data: [DONE]\n\n"
ROLES = ("system", "user", "assistant", "developer")  # "developer" is OpenAI's newer name for "system"


class APIError(Exception):
    """An error answered to the client as `{"error": {...}}` with an HTTP status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None) -> APIError:
    """A 400 invalid_request_error about `param`."""
    return APIError(400, message, param=param)


def parse_body(raw: bytes) -> dict:
    """The request's JSON object; 400 for anything else (NaN and Infinity are not JSON either)."""

    def reject_constant(name: str) -> None:
        raise ValueError(f"{name} is not a JSON value")

    try:
        body = json.loads(raw, parse_constant=reject_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise bad(f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    return body


_TYPES = {"int": int, "number": (int, float), "bool": bool, "str": str, "object": dict}


def field(body: dict, name: str, kind: str, default: Any = None) -> Any:
    """`body[name]` checked against `kind` (int, number, bool, str, object); None or missing gives `default`."""
    value = body.get(name)
    if value is None:
        return default
    numeric = kind in ("int", "number")
    if not isinstance(value, _TYPES[kind]) or (numeric and isinstance(value, bool)):
        raise bad(f"'{name}' must be of type {'integer' if kind == 'int' else kind}, got "
                  f"{type(value).__name__}", name)
    if kind == "number" and not math.isfinite(value):
        raise bad(f"'{name}' must be a finite number, got {value}", name)
    return value


def _token_ids(value: Any) -> bool:
    return isinstance(value, list) and all(type(t) is int for t in value)


def sampling_params(body: dict, *, chat: bool) -> SamplingParams:
    """SamplingParams from an OpenAI request body (chat or completions); every problem is a 400 naming its field."""
    max_tokens = field(body, "max_completion_tokens", "int") if chat else None
    max_tokens = max_tokens if max_tokens is not None else field(body, "max_tokens", "int")
    stop = body.get("stop")
    if stop is not None and not (isinstance(stop, str) or (isinstance(stop, list)
                                                           and all(isinstance(s, str) for s in stop))):
        raise bad("'stop' must be a string or a list of strings", "stop")
    stop_token_ids = body.get("stop_token_ids")
    if stop_token_ids is not None and not _token_ids(stop_token_ids):
        raise bad("'stop_token_ids' must be a list of integers", "stop_token_ids")
    if chat:
        logprobs = field(body, "top_logprobs", "int", 0) if field(body, "logprobs", "bool", False) else None
    else:
        logprobs = field(body, "logprobs", "int")
    n = field(body, "n", "int", 1)
    if n > MAX_N:
        raise bad(f"'n' must be at most {MAX_N}, got {n}", "n")
    seed = field(body, "seed", "int")
    if seed is not None and not SEED_RANGE[0] <= seed <= SEED_RANGE[1] - MAX_N:
        raise bad(f"'seed' must be in [{SEED_RANGE[0]}, {SEED_RANGE[1] - MAX_N}], got {seed}", "seed")
    kwargs = dict(
        n=n, temperature=field(body, "temperature", "number", 1.0),
        top_p=field(body, "top_p", "number", 1.0), top_k=field(body, "top_k", "int", 0),
        min_p=field(body, "min_p", "number", 0.0), seed=seed,
        # OpenAI's defaults: 16 tokens for completions, up to the context limit for chat.
        max_tokens=max_tokens if max_tokens is not None else (None if chat else 16),
        min_tokens=field(body, "min_tokens", "int", 0), stop=stop, stop_token_ids=stop_token_ids,
        ignore_eos=field(body, "ignore_eos", "bool", False),
        presence_penalty=field(body, "presence_penalty", "number", 0.0),
        frequency_penalty=field(body, "frequency_penalty", "number", 0.0),
        repetition_penalty=field(body, "repetition_penalty", "number", 1.0), logprobs=logprobs,
        skip_special_tokens=field(body, "skip_special_tokens", "bool", True))
    try:
        return SamplingParams(**kwargs)
    except ValueError as e:  # SamplingParams names the field first
        name = str(e).split(" ", 1)[0]
        param = "top_logprobs" if chat and name == "logprobs" else name if name in kwargs else None
        if chat and name == "max_tokens" and body.get("max_completion_tokens") is not None:
            param = "max_completion_tokens"
        raise bad(str(e), param) from None


def cache_salt(body: dict) -> str | None:
    """vLLM's `cache_salt`: requests share cached prefix blocks only with requests of the same salt."""
    salt = field(body, "cache_salt", "str")
    if salt is not None and not salt:
        raise bad("'cache_salt' must be a non-empty string", "cache_salt")
    return salt


def include_usage(body: dict) -> bool:
    """`stream_options.include_usage`: a final chunk with the usage of a streamed request."""
    options = field(body, "stream_options", "object", {})
    value = options.get("include_usage", False)
    if not isinstance(value, bool):
        raise bad("'stream_options.include_usage' must be a boolean", "stream_options")
    return value


def prompts(body: dict) -> list[str | list[int]]:
    """The completions API's `prompt`: a string, a list of strings, token ids or a list of token-id lists."""
    prompt = body.get("prompt")
    if isinstance(prompt, str) or (_token_ids(prompt) and prompt):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt or not all(isinstance(p, str) or _token_ids(p) for p in prompt):
        raise bad("'prompt' must be a string, a list of strings, a list of token ids or a list of token-id lists",
                  "prompt")
    return prompt


def messages(body: dict) -> list[dict]:
    """Chat `messages` as `{"role", "content": str}` dicts; content may come as a list of text parts."""
    items = body.get("messages")
    if not isinstance(items, list) or not items:
        raise bad("'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(items):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise bad(f"messages[{i}].role must be one of {', '.join(ROLES)}", "messages")
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise bad(f"messages[{i}].content parts must be {{'type': 'text', 'text': '...'}}", "messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise bad(f"messages[{i}].content must be a string or a list of text parts", "messages")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    return out


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def completion_logprobs(out: CompletionOutput, tokenizer: Any, start: int = 0) -> dict | None:
    """The completions API's logprobs object for tokens `start..` of an output."""
    if out.logprobs is None:
        return None
    tokens, token_lps, tops = [], [], []
    for token_id, entry in zip(out.token_ids[start:], out.logprobs[start:]):
        chosen = entry[token_id]
        tokens.append(_text(chosen, token_id, tokenizer))
        token_lps.append(chosen.logprob)
        tops.append({_text(lp, t, tokenizer): lp.logprob for t, lp in entry.items()})
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": []}


def chat_logprobs(out: CompletionOutput, tokenizer: Any, top_n: int, start: int = 0) -> dict | None:
    """The chat API's `{"content": [...]}` logprobs for tokens `start..` of an output, `top_n` alternatives each."""
    if out.logprobs is None:
        return None
    content = []
    for token_id, entry in zip(out.token_ids[start:], out.logprobs[start:]):
        chosen = entry[token_id]
        ranked = sorted(entry.items(), key=lambda kv: kv[1].rank)[:top_n]
        content.append({"token": _text(chosen, token_id, tokenizer), "logprob": chosen.logprob,
                        "bytes": _bytes(chosen, token_id, tokenizer),
                        "top_logprobs": [{"token": _text(lp, t, tokenizer), "logprob": lp.logprob,
                                          "bytes": _bytes(lp, t, tokenizer)} for t, lp in ranked]})
    return {"content": content}


def _text(lp: Logprob, token_id: int, tokenizer: Any) -> str:
    if lp.decoded_token is not None:
        return lp.decoded_token
    return tokenizer.decode([token_id]) if tokenizer is not None else f"token_id:{token_id}"


def _bytes(lp: Logprob, token_id: int, tokenizer: Any) -> list[int]:
    return list(_text(lp, token_id, tokenizer).encode("utf-8"))


_encode = json.JSONEncoder(ensure_ascii=False).encode


def sse(obj: dict) -> str:
    """One server-sent event carrying `obj` as JSON; a stream ends with `DONE`."""
    return f"data: {_encode(obj)}\n\n"


class ChunkEncoder:
    """The SSE events of one streamed response: `{**shared, "choices": [...], **extra}` per chunk, with the
    fields every chunk shares (id, object, created, model) encoded once."""

    def __init__(self, **shared: Any):
        self._head = f"data: {_encode(shared)[:-1]}, \"choices\": "

    def event(self, choices: list[dict], **extra: Any) -> str:
        tail = f", {_encode(extra)[1:-1]}" if extra else ""
        return f"{self._head}{_encode(choices)}{tail}}}\n\n"
