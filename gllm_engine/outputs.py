"""What the engine returns for a request: vLLM-shaped output records."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    """Log-probability of one token, its rank in the distribution (1 = most likely) and its text."""

    logprob: float
    rank: int
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    """One of the `n` continuations of a request.

    `logprobs`, when asked for, holds one dict per generated token: token id -> Logprob, containing the
    sampled token and the top-k tokens. `finish_reason` is None while running, then "stop", "length"
    or "abort".
    """

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[dict[int, Logprob]] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """When a request reached the front end and when its first generated token did (`time.monotonic()`)."""

    arrival_time: float
    first_token_time: float | None = None


@dataclass
class RequestOutput:
    """The state of a request: its prompt and its `n` outputs.

    Outputs are cumulative so far, or, for `RequestOutputKind.DELTA`, only what each output gained
    since the request's previous RequestOutput (outputs with nothing new are left out; each
    `finish_reason` comes once). `metrics` is set by `AsyncLLM`.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    num_cached_tokens: int = 0
    finished: bool = False
    outputs: list[CompletionOutput] = field(default_factory=list)
    metrics: RequestMetrics | None = None
