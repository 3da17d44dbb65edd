"""Speculative decoding metrics: vLLM's spec_decode_* counters under the `pagedserve:` prefix, the
periodic log line, and a server started with --speculative-config serving them at /metrics."""

from __future__ import annotations

import logging

import httpx
import pytest
from prometheus_client import generate_latest

from pagedserve.engine import SchedulerStats
from pagedserve.metrics.loggers import LoggingStatLogger
from pagedserve.metrics.prometheus import PrometheusStatLogger
from pagedserve.metrics.stats import IterationStats
from pagedserve.spec_decode.metrics import SpecDecodingStats
from tests.entrypoints.openai.utils import RemoteOpenAIServer, metric_value


def _spec_stats(drafts: list[tuple[int, int]], k: int = 3) -> SpecDecodingStats:
    stats = SpecDecodingStats.new(k)
    for num_draft, num_accepted in drafts:
        stats.observe_draft(num_draft, num_accepted)
    return stats


def test_stats_count_drafts_acceptance_and_positions() -> None:
    stats = _spec_stats([(3, 3), (3, 1), (2, 0), (3, 2)])
    assert (stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens) == (4, 11, 6)
    assert stats.num_accepted_tokens_per_pos == [3, 2, 1]
    assert stats.acceptance_rate == pytest.approx(6 / 11)
    assert stats.mean_acceptance_length == pytest.approx(1 + 6 / 4)
    total = SpecDecodingStats()
    total.add(stats)
    total.add(_spec_stats([(1, 1)]))
    assert total.num_drafts == 5 and total.num_accepted_tokens_per_pos == [4, 2, 1]


def test_prometheus_counters_use_vllm_names() -> None:
    stat_logger = PrometheusStatLogger("m")
    for drafts in ([(3, 3), (3, 1)], [(2, 0)]):
        stat_logger.record(SchedulerStats(spec_decoding_stats=_spec_stats(drafts)), IterationStats())
    stat_logger.record(SchedulerStats(), IterationStats())  # a step without drafts
    text = generate_latest(stat_logger.registry).decode()

    def value(name: str, **labels: str) -> float:
        return metric_value(text, "pagedserve:" + name, {"model_name": "m", **labels})

    assert value("spec_decode_num_drafts_total") == 3
    assert value("spec_decode_num_draft_tokens_total") == 8
    assert value("spec_decode_num_accepted_tokens_total") == 4
    assert [value("spec_decode_num_accepted_tokens_per_pos_total", position=str(i)) for i in range(3)] == [2, 1, 1]


def test_no_spec_decode_metrics_without_speculation() -> None:
    stat_logger = PrometheusStatLogger("m")
    stat_logger.record(SchedulerStats(num_running_reqs=1), IterationStats(num_generation_tokens=1))
    assert "spec_decode" not in generate_latest(stat_logger.registry).decode()


def test_periodic_log_line(caplog: pytest.LogCaptureFixture) -> None:
    stat_logger = LoggingStatLogger()
    stat_logger.record(SchedulerStats(spec_decoding_stats=_spec_stats([(3, 3), (3, 1)])), IterationStats())
    with caplog.at_level(logging.INFO, logger="pagedserve.metrics.loggers"):
        stat_logger.log()
        stat_logger.log()  # nothing verified since: no second SpecDecoding line
    lines = [r.getMessage() for r in caplog.records if "SpecDecoding" in r.getMessage()]
    assert len(lines) == 1
    assert "mean acceptance length 3.00" in lines[0]
    assert "per-position acceptance rate 1.000, 0.500, 0.500" in lines[0]
    assert "avg draft acceptance rate 66.7%" in lines[0]


def test_draft_and_verify_times_per_step(caplog: pytest.LogCaptureFixture) -> None:
    """The worker's per-step times: a Prometheus histogram each, and means in the log line."""
    steps = [(0.004, 0.030), (0.006, 0.0), (0.002, 0.050)]  # the second step verified nothing
    prometheus, log = PrometheusStatLogger("m"), LoggingStatLogger()
    for draft_time_s, verify_time_s in steps:
        stats = _spec_stats([(3, 2)])
        stats.observe_times(draft_time_s, verify_time_s)
        for stat_logger in (prometheus, log):
            stat_logger.record(SchedulerStats(spec_decoding_stats=stats), IterationStats())
    text = generate_latest(prometheus.registry).decode()

    def value(name: str) -> float:
        return metric_value(text, "pagedserve:" + name, {"model_name": "m"})

    assert value("spec_decode_draft_time_seconds_count") == 3
    assert value("spec_decode_draft_time_seconds_sum") == pytest.approx(0.012)
    assert value("spec_decode_verify_time_seconds_count") == 2
    assert value("spec_decode_verify_time_seconds_sum") == pytest.approx(0.080)
    with caplog.at_level(logging.INFO, logger="pagedserve.metrics.loggers"):
        log.log()
    (line,) = [r.getMessage() for r in caplog.records if "SpecDecoding" in r.getMessage()]
    assert "draft time 4.0 ms/step, verify time 40.0 ms/step" in line


@pytest.mark.slow
def test_server_with_speculative_config_serves_the_metrics(make_tiny_checkpoint, tmp_path) -> None:
    server = RemoteOpenAIServer(
        make_tiny_checkpoint("llama"),
        [
            "--dtype",
            "float32",
            "--max-model-len",
            "512",
            "--speculative-config",
            '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}',
        ],
        tmp_path / "server.log",
    )
    try:
        before = httpx.get(server.url_for("metrics")).text
        assert metric_value(before, "pagedserve:spec_decode_num_drafts_total") == 0
        prompt = list(range(1000, 1012)) * 4
        response = httpx.post(
            server.url_for("v1", "completions"),
            json={"prompt": prompt, "max_tokens": 40, "temperature": 0, "ignore_eos": True},
            timeout=60,
        )
        assert response.status_code == 200, response.text
        text = httpx.get(server.url_for("metrics")).text
        assert metric_value(text, "pagedserve:spec_decode_num_drafts_total") > 0
        assert metric_value(text, "pagedserve:spec_decode_num_draft_tokens_total") > 0
    finally:
        server.terminate()
