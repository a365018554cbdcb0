"""Benchmark arithmetic: percentiles, latency summaries, TPOT, throughput and goodput."""

from __future__ import annotations

import pytest

from gllm_cli.metrics import RequestMetrics, goodput, percentile, report, summarize, throughput


def test_percentile_interpolates_between_ranks():
    values = [4.0, 1.0, 3.0, 2.0]  # unsorted on purpose
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 4.0
    assert percentile(values, 50) == 2.5
    assert percentile(values, 90) == pytest.approx(3.7)
    assert percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile(values, 101)


def test_summary_is_in_the_asked_unit_and_empty_is_none():
    assert summarize([0.001, 0.003], scale=1000) == pytest.approx({"mean": 2.0, "median": 2.0, "p90": 2.8,
                                                                   "p99": 2.98})
    assert summarize([]) == {"mean": None, "median": None, "p90": None, "p99": None}


def test_tpot_and_goodput():
    fast = RequestMetrics(prompt_tokens=10, output_tokens=5, ttft=0.1, latency=0.5)
    slow = RequestMetrics(prompt_tokens=10, output_tokens=3, ttft=0.4, latency=1.4)
    single = RequestMetrics(prompt_tokens=10, output_tokens=1, ttft=0.2, latency=0.2)
    failed = RequestMetrics(error="boom")
    assert fast.tpot == pytest.approx(0.1) and slow.tpot == pytest.approx(0.5) and single.tpot is None
    runs = [fast, slow, single, failed]
    assert goodput(runs, 2.0) is None  # no SLO, no goodput
    assert goodput(runs, 2.0, slo_ttft_s=0.3) == 1.0  # fast and single
    assert goodput(runs, 2.0, slo_tpot_s=0.2) == 1.0  # fast, and single has no TPOT to miss
    assert goodput(runs, 2.0, slo_ttft_s=0.15, slo_tpot_s=0.2) == 0.5


def test_report_counts_only_successes():
    runs = [RequestMetrics(10, 4, 0.1, 0.4, [0.1, 0.1, 0.1]), RequestMetrics(20, 2, 0.2, 0.3, [0.1]),
            RequestMetrics(error="first"), RequestMetrics(error="second")]
    r = report(runs, 2.0, slo_ttft_ms=150)
    assert (r["successful_requests"], r["failed_requests"], r["first_error"]) == (2, 2, "first")
    assert (r["total_input_tokens"], r["total_output_tokens"]) == (30, 6)
    assert r["request_throughput"] == 1.0 and r["total_token_throughput"] == 18.0
    assert r["ttft_ms"]["mean"] == pytest.approx(150) and r["itl_ms"]["median"] == pytest.approx(100)
    assert r["goodput"] == 0.5
    assert throughput(4.0, 2, 30, 6) == (0.5, 7.5, 1.5, 9.0)
    with pytest.raises(ValueError):
        throughput(0.0, 1, 1, 1)
