"""Prometheus metrics of one server: engine gauges and counters read at scrape time, latency histograms."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class _EngineCollector:
    """Reads the engine's statistics when Prometheus scrapes."""

    def __init__(self, llm) -> None:
        self.llm = llm

    def collect(self):
        s = self.llm.stats()
        gauges = [("gllm:num_requests_running", "Requests being computed", s.num_running),
                  ("gllm:num_requests_waiting", "Requests waiting to be scheduled", s.num_waiting),
                  ("gllm:kv_cache_usage_perc", "Share of KV-cache blocks in use (0-1)", s.kv_cache_usage),
                  ("gllm:kv_cache_free_blocks", "Free KV-cache blocks", s.num_free_blocks),
                  ("gllm:kv_cache_total_blocks", "All KV-cache blocks", s.num_total_blocks)]
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=value)
        counters = [("gllm:prompt_tokens", "Prompt tokens received", s.num_prompt_tokens),
                    ("gllm:generation_tokens", "Tokens generated", s.num_generation_tokens),
                    ("gllm:num_preemptions", "Sequences preempted", s.num_preemptions),
                    ("gllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                     s.prefix_cache_queries),
                    ("gllm:prefix_cache_hits", "Prompt tokens found in the prefix cache", s.prefix_cache_hits)]
        for name, doc, value in counters:
            yield CounterMetricFamily(name, doc, value=value)


class ServerMetrics:
    def __init__(self, llm) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(llm))
        self.ttft = Histogram("gllm:time_to_first_token_seconds", "Time to the first generated token",
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.tpot = Histogram("gllm:time_per_output_token_seconds", "Mean time per output token after the first",
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.e2e = Histogram("gllm:e2e_request_latency_seconds", "Request latency from arrival to finish",
                             buckets=_LATENCY_BUCKETS, registry=self.registry)

    def observe_request(self, start: float, first: float | None, end: float, num_tokens: int) -> None:
        self.e2e.observe(end - start)
        if first is not None:
            self.ttft.observe(first - start)
            if num_tokens > 1:
                self.tpot.observe((end - first) / (num_tokens - 1))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
