"""PrometheusStatLogger: engine stats in, vLLM-named `pagedserve:` metrics out."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest

from pagedserve.engine import FinishReason, SchedulerStats
from pagedserve.engine.output_processor import FinishedRequestStats
from pagedserve.metrics.prometheus import PrometheusStatLogger, build_1_2_5_buckets
from pagedserve.metrics.stats import IterationStats
from pagedserve.outputs import RequestMetrics
from tests.entrypoints.openai.utils import metric_value


def _finished(request_id: str, reason: FinishReason, num_prompt: int, num_generated: int) -> FinishedRequestStats:
    metrics = RequestMetrics(
        arrival_time=10.0,
        first_scheduled_time=10.25,
        first_token_time=10.5,
        last_token_time=11.5,
        finished_time=11.5,
        num_generation_tokens=num_generated,
        inter_token_latencies=[0.5, 0.5],
    )
    return FinishedRequestStats(request_id, reason, num_prompt, num_generated, metrics)


def test_records_gauges_counters_and_request_histograms():
    stat_logger = PrometheusStatLogger("m", max_model_len=1024)
    stat_logger.record(
        SchedulerStats(num_running_reqs=3, num_waiting_reqs=2, kv_cache_usage=0.25, prefix_cache_queries=64,
                       prefix_cache_hits=32, num_preemptions=1),
        IterationStats(num_generation_tokens=5, num_prompt_tokens=0),
    )  # fmt: skip
    stat_logger.record(
        SchedulerStats(num_running_reqs=0, num_waiting_reqs=0, kv_cache_usage=0.0, prefix_cache_queries=16),
        IterationStats(num_generation_tokens=3, num_prompt_tokens=40,
                       finished_requests=[_finished("a", FinishReason.LENGTH, 40, 3)]),
    )  # fmt: skip
    text = generate_latest(stat_logger.registry).decode()
    labels = {"model_name": "m"}

    def value(name: str, **extra: str) -> float:
        return metric_value(text, "pagedserve:" + name, {**labels, **extra})

    assert value("num_requests_running") == 0 and value("kv_cache_usage_perc") == 0
    assert value("prefix_cache_queries_total") == 80 and value("prefix_cache_hits_total") == 32
    assert value("num_preemptions_total") == 1
    assert value("prompt_tokens_total") == 40 and value("generation_tokens_total") == 8
    assert value("request_success_total", finished_reason="length") == 1
    assert value("request_success_total", finished_reason="stop") == 0
    assert value("time_to_first_token_seconds_sum") == pytest.approx(0.5)
    assert value("e2e_request_latency_seconds_sum") == pytest.approx(1.5)
    assert value("request_queue_time_seconds_sum") == pytest.approx(0.25)
    assert value("request_prefill_time_seconds_sum") == pytest.approx(0.25)
    assert value("request_decode_time_seconds_sum") == pytest.approx(1.0)
    assert value("inter_token_latency_seconds_count") == 2
    assert value("request_time_per_output_token_seconds_sum") == pytest.approx(0.5)
    assert value("request_prompt_tokens_sum") == 40 and value("request_generation_tokens_sum") == 3
    assert value("iteration_tokens_total_count") == 2
    assert "_created" not in text


def test_a_step_without_scheduler_stats_keeps_the_gauges():
    stat_logger = PrometheusStatLogger("m")
    stat_logger.record(SchedulerStats(num_running_reqs=4, kv_cache_usage=0.5), IterationStats())
    stat_logger.record(None, IterationStats(num_generation_tokens=2))
    text = generate_latest(stat_logger.registry).decode()
    assert metric_value(text, "pagedserve:num_requests_running") == 4
    assert metric_value(text, "pagedserve:kv_cache_usage_perc") == 0.5
    assert metric_value(text, "pagedserve:generation_tokens_total") == 2


def test_two_loggers_in_one_process_do_not_collide():
    first, second = PrometheusStatLogger("a"), PrometheusStatLogger("b")
    first.record(None, IterationStats(num_generation_tokens=1))
    assert metric_value(generate_latest(second.registry).decode(), "pagedserve:generation_tokens_total") == 0


def test_build_1_2_5_buckets():
    assert build_1_2_5_buckets(100) == [1, 2, 5, 10, 20, 50, 100]
    assert build_1_2_5_buckets(7) == [1, 2, 5]
