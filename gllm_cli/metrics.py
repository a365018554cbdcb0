"""Benchmark arithmetic, in one place: percentiles, per-request latencies, throughput and goodput.

Used by `gllm bench` and the scripts in benchmarks/. Times are seconds unless a name says `_ms`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

STATS = ("mean", "median", "p90", "p99")


def percentile(values: Sequence[float], q: float) -> float:
    """The `q`-th percentile (0-100) of non-empty `values`, interpolating linearly between ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(values: Sequence[float], scale: float = 1.0) -> dict[str, float | None]:
    """Mean, median, p90 and p99 of `values` times `scale` (e.g. 1000 for seconds to ms); None each when empty."""
    if not values:
        return dict.fromkeys(STATS)
    scaled = [v * scale for v in values]
    return {"mean": sum(scaled) / len(scaled), "median": percentile(scaled, 50), "p90": percentile(scaled, 90),
            "p99": percentile(scaled, 99)}


class Throughput(NamedTuple):
    requests_per_s: float
    input_tokens_per_s: float
    output_tokens_per_s: float
    total_tokens_per_s: float


def throughput(seconds: float, requests: int, input_tokens: int, output_tokens: int) -> Throughput:
    """Rates over a run of `seconds`: requests, prompt tokens, generated tokens and both together, per second."""
    if seconds <= 0:
        raise ValueError(f"a run must last a positive time, got {seconds} s")
    return Throughput(requests / seconds, input_tokens / seconds, output_tokens / seconds,
                      (input_tokens + output_tokens) / seconds)


@dataclass
class RequestMetrics:
    """One request as its client saw it; times in seconds from when it was sent.

    `ttft` is the first streamed update with output, `itl` the gaps between later updates (an
    update usually carries one token), `latency` the end of the response. A failed request has
    `error` set and counts in no figure but the failure count.
    """

    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float | None = None
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first; None with fewer than two tokens."""
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def meets_slo(r: RequestMetrics, slo_ttft_s: float | None, slo_tpot_s: float | None) -> bool:
    """Whether a successful request met every SLO given (a request of one token has no TPOT to miss)."""
    if not r.ok:
        return False
    if slo_ttft_s is not None and (r.ttft is None or r.ttft > slo_ttft_s):
        return False
    tpot = r.tpot
    return slo_tpot_s is None or tpot is None or tpot <= slo_tpot_s


def goodput(results: Iterable[RequestMetrics], seconds: float, slo_ttft_s: float | None = None,
            slo_tpot_s: float | None = None) -> float | None:
    """Requests per second that met every SLO given; None when no SLO is given."""
    if slo_ttft_s is None and slo_tpot_s is None:
        return None
    return sum(meets_slo(r, slo_ttft_s, slo_tpot_s) for r in results) / seconds


def report(results: Sequence[RequestMetrics], seconds: float, slo_ttft_ms: float | None = None,
           slo_tpot_ms: float | None = None) -> dict:
    """The figures of one benchmark run, JSON-ready: counts, throughput, latency summaries in ms, goodput.

    Token counts and rates cover the successful requests only; `seconds` is the whole run.
    """
    ok = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    input_tokens, output_tokens = sum(r.prompt_tokens for r in ok), sum(r.output_tokens for r in ok)
    rates = throughput(seconds, len(ok), input_tokens, output_tokens)
    tpots = [t for r in ok if (t := r.tpot) is not None]
    to_s = lambda ms: None if ms is None else ms / 1000
    return {
        "successful_requests": len(ok), "failed_requests": len(failed),
        "first_error": failed[0].error if failed else None,
        "duration_s": seconds, "total_input_tokens": input_tokens, "total_output_tokens": output_tokens,
        "request_throughput": rates.requests_per_s, "input_token_throughput": rates.input_tokens_per_s,
        "output_token_throughput": rates.output_tokens_per_s, "total_token_throughput": rates.total_tokens_per_s,
        "ttft_ms": summarize([r.ttft for r in ok if r.ttft is not None], 1000), "tpot_ms": summarize(tpots, 1000),
        "itl_ms": summarize([gap for r in ok for gap in r.itl], 1000),
        "e2el_ms": summarize([r.latency for r in ok], 1000),
        "slo_ttft_ms": slo_ttft_ms, "slo_tpot_ms": slo_tpot_ms,
        "goodput": goodput(ok, seconds, to_s(slo_ttft_ms), to_s(slo_tpot_ms)),
    }
