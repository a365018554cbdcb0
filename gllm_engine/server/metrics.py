"""Prometheus metrics of one server, in its own registry, named as vLLM's with a `gllm:` prefix.

Engine gauges and counters are read from `AsyncLLM.stats()` at scrape time; per-request latency
histograms and finish counters are recorded by the server as requests end. Every series carries a
`model_name` label, as vLLM's do, so dashboards built for vLLM work unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from gllm_engine.core.engine_core import EngineStats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.5)
FINISH_REASONS = ("stop", "length", "abort")


class _EngineCollector:
    """Reads the engine's statistics when Prometheus scrapes."""

    def __init__(self, stats: Callable[[], EngineStats], model_name: str) -> None:
        self.stats, self.model_name = stats, model_name

    def collect(self) -> Iterator[Metric]:
        s = self.stats()
        gauges = [("gllm:num_requests_running", "Sequences being computed", s.num_running),
                  ("gllm:num_requests_waiting", "Sequences waiting to be scheduled", s.num_waiting),
                  ("gllm:kv_cache_usage_perc", "Share of KV-cache blocks in use (0-1)", s.kv_cache_usage),
                  ("gllm:kv_cache_free_blocks", "Free KV-cache blocks", s.num_free_blocks),
                  ("gllm:kv_cache_total_blocks", "All KV-cache blocks", s.num_total_blocks)]
        for name, doc, value in gauges:
            family = GaugeMetricFamily(name, doc, labels=["model_name"])
            family.add_metric([self.model_name], value)
            yield family
        counters = [("gllm:prompt_tokens", "Prompt tokens received", s.num_prompt_tokens),
                    ("gllm:generation_tokens", "Tokens generated", s.num_generation_tokens),
                    ("gllm:num_preemptions", "Sequences preempted", s.num_preemptions),
                    ("gllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                     s.prefix_cache_queries),
                    ("gllm:prefix_cache_hits", "Prompt tokens found in the prefix cache", s.prefix_cache_hits)]
        for name, doc, value in counters:
            family = CounterMetricFamily(name, doc, labels=["model_name"])
            family.add_metric([self.model_name], value)
            yield family


class ServerMetrics:
    """The metrics of one server; `render()` gives the /metrics body and its content type."""

    def __init__(self, stats: Callable[[], EngineStats], model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(stats, model_name))
        labels = ["model_name"]

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=self.registry).labels(model_name)

        self.ttft = histogram("gllm:time_to_first_token_seconds", "Time from arrival to the first generated token",
                              LATENCY_BUCKETS)
        self.tpot = histogram("gllm:time_per_output_token_seconds", "Mean time per output token after the first",
                              TOKEN_LATENCY_BUCKETS)
        self.e2e = histogram("gllm:e2e_request_latency_seconds", "Time from arrival to the last token",
                             LATENCY_BUCKETS)
        success = Counter("gllm:request_success", "Requests finished, by finish reason",
                          [*labels, "finished_reason"], registry=self.registry)
        self.success = {reason: success.labels(model_name, reason) for reason in FINISH_REASONS}

    def observe_request(self, start: float, first: float | None, end: float, num_tokens: int,
                        finish_reasons: list[str | None]) -> None:
        """Record one finished request: arrival, first token and end times (monotonic), tokens per output."""
        self.e2e.observe(end - start)
        if first is not None:
            self.ttft.observe(first - start)
            if num_tokens > 1:
                self.tpot.observe((end - first) / (num_tokens - 1))
        for reason in finish_reasons:
            if reason in self.success:
                self.success[reason].inc()

    def observe_abort(self, num_outputs: int) -> None:
        """Record a request that ended before finishing (client gone, engine failure)."""
        self.success["abort"].inc(num_outputs)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
