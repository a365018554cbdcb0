"""OpenAI request validation and response shapes; errors in OpenAI's JSON format.

Requests are plain dicts checked field by field, so every rejection names the field and the rule.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from gllm_engine.outputs import CompletionOutput, Logprob
from gllm_engine.sampling_params import SamplingParams


class APIError(Exception):
    """An error answered to the client as `{"error": {...}}` with an HTTP status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


_TYPES = {"int": int, "number": (int, float), "bool": bool, "str": str}


def field(body: dict, name: str, kind: str, default: Any = None) -> Any:
    """`body[name]` checked against `kind` ("int", "number", "bool", "str"); None/missing gives `default`."""
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, _TYPES[kind]) and not (kind in ("int", "number") and isinstance(value, bool))
    if not ok:
        raise bad(f"'{name}' must be of type {kind}, got {type(value).__name__}", name)
    return value


def sampling_params(body: dict, *, chat: bool) -> SamplingParams:
    """SamplingParams from an OpenAI request body; ValueError from SamplingParams becomes a 400."""
    max_tokens = field(body, "max_completion_tokens", "int") if chat else None
    max_tokens = max_tokens if max_tokens is not None else field(body, "max_tokens", "int")
    stop = body.get("stop")
    if stop is not None and not (isinstance(stop, str) or (isinstance(stop, list)
                                                           and all(isinstance(s, str) for s in stop))):
        raise bad("'stop' must be a string or a list of strings", "stop")
    if chat:
        logprobs = field(body, "top_logprobs", "int", 0) if field(body, "logprobs", "bool", False) else None
    else:
        logprobs = field(body, "logprobs", "int")
    kwargs = dict(
        n=field(body, "n", "int", 1), temperature=field(body, "temperature", "number", 1.0),
        top_p=field(body, "top_p", "number", 1.0), top_k=field(body, "top_k", "int", 0),
        min_p=field(body, "min_p", "number", 0.0), seed=field(body, "seed", "int"),
        max_tokens=max_tokens if max_tokens is not None else (None if chat else 16),
        min_tokens=field(body, "min_tokens", "int", 0), stop=stop,
        stop_token_ids=body.get("stop_token_ids"), ignore_eos=field(body, "ignore_eos", "bool", False),
        presence_penalty=field(body, "presence_penalty", "number", 0.0),
        frequency_penalty=field(body, "frequency_penalty", "number", 0.0),
        repetition_penalty=field(body, "repetition_penalty", "number", 1.0), logprobs=logprobs,
        skip_special_tokens=field(body, "skip_special_tokens", "bool", True))
    try:
        return SamplingParams(**kwargs)
    except ValueError as e:
        param = str(e).split(" ", 1)[0]
        raise bad(str(e), param if param in kwargs else None) from None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


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
    """The chat API's `{"content": [...]}` logprobs for tokens `start..` of an output."""
    if out.logprobs is None:
        return None
    content = []
    for token_id, entry in zip(out.token_ids[start:], out.logprobs[start:]):
        chosen = entry[token_id]
        ranked = sorted(entry.items(), key=lambda kv: kv[1].rank)[:top_n]
        content.append({"token": _text(chosen, token_id, tokenizer), "logprob": chosen.logprob, "bytes": None,
                        "top_logprobs": [{"token": _text(lp, t, tokenizer), "logprob": lp.logprob, "bytes": None}
                                         for t, lp in ranked]})
    return {"content": content}


def _text(lp: Logprob, token_id: int, tokenizer: Any) -> str:
    if lp.decoded_token is not None:
        return lp.decoded_token
    return tokenizer.decode([token_id]) if tokenizer is not None else str(token_id)


def now() -> int:
    return int(time.time())
