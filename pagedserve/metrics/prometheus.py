"""PrometheusStatLogger: the engine's stats as Prometheus metrics, with vLLM's metric names under
the `pagedserve:` prefix (`vllm:num_requests_running` is `pagedserve:num_requests_running`).

Every metric carries a `model_name` label and an `engine` label (the data-parallel engine core's
index; "0" without data parallelism), as in vLLM. Counters are exposed with the `_total` suffix that
Prometheus adds (`pagedserve:prompt_tokens_total`); `_created` samples are disabled, as in vLLM.
Request-level histograms (TTFT, inter-token latency, end-to-end, queue time, token counts) are
observed when a request finishes, from its RequestMetrics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from types import SimpleNamespace
from typing import TYPE_CHECKING

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pagedserve.engine import SchedulerStats
from pagedserve.metrics.loggers import StatLoggerBase
from pagedserve.metrics.stats import IterationStats
from pagedserve.spec_decode.metrics import SpecDecodingStats

if TYPE_CHECKING:
    from pagedserve.config import EngineConfig

prometheus_client.disable_created_metrics()

METRIC_PREFIX = "pagedserve:"

# Seconds. Fine steps where CPU serving of small models lives, coarse ones for long queues.
_TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]  # fmt: skip
_ITL_BUCKETS = [0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0]  # fmt: skip
_REQUEST_LATENCY_BUCKETS = [0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
                            40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]  # fmt: skip
# Per step: n-gram drafts take tens of microseconds, a draft model's forwards tens of milliseconds.
_SPEC_STEP_BUCKETS = [0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]


def build_1_2_5_buckets(max_value: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to and including the first value >= max_value's decade."""
    buckets: list[int] = []
    exponent = 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > max_value:
                return buckets
            buckets.append(value)
        exponent += 1


class PrometheusStatLogger(StatLoggerBase):
    """Registers its metrics in `registry` (default: a fresh CollectorRegistry, so that several
    engines or test servers in one process never collide); serve `registry` at /metrics."""

    def __init__(
        self,
        model_name: str,
        max_model_len: int | None = None,
        registry: CollectorRegistry | None = None,
        engine_indexes: Iterable[int] = (0,),
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.model_name = model_name
        labels = ["model_name", "engine"]
        registry = self.registry

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(METRIC_PREFIX + name, doc, labels, registry=registry, multiprocess_mode="mostrecent")

        def counter(name: str, doc: str, extra_labels: tuple[str, ...] = ()) -> Counter:
            return Counter(METRIC_PREFIX + name, doc, labels + list(extra_labels), registry=registry)

        def histogram(name: str, doc: str, buckets: list[float] | list[int]) -> Histogram:
            return Histogram(METRIC_PREFIX + name, doc, labels, buckets=buckets, registry=registry)

        self.gauge_scheduler_running = gauge("num_requests_running", "Requests in the model's batch.")
        self.gauge_scheduler_waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled.")
        self.gauge_kv_cache_usage = gauge("kv_cache_usage_perc", "KV cache usage; 1 means 100 percent.")

        self.counter_prefix_cache_queries = counter(
            "prefix_cache_queries", "Prompt tokens looked up in the prefix cache."
        )
        self.counter_prefix_cache_hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self.counter_num_preemptions = counter("num_preemptions", "Requests preempted (their KV cache freed).")
        self.counter_prompt_tokens = counter("prompt_tokens", "Prefill tokens processed.")
        self.counter_generation_tokens = counter("generation_tokens", "Generation tokens processed.")
        self.counter_request_success = counter(
            "request_success", "Requests finished, by finish reason.", ("finished_reason",)
        )

        self._register_histograms(histogram, max_model_len)
        self.gauge_cache_config_info: Gauge | None = None
        # vLLM's lora_requests_info, made once the engine reports a LoRA config (its labels name
        # the adapters of the newest stats; the value is when they were recorded).
        self.gauge_lora_info: Gauge | None = None
        self.max_lora = 0
        # Speculative decoding (vLLM's spec_decode_* counters): registered by
        # log_engine_initialized for an engine that speculates, or with the first drafts.
        self.counter_spec_decode: SimpleNamespace | None = None

        # Label children resolved once per engine core: `.labels()` is a dict lookup under a lock.
        self._engines = {index: self._make_children(index) for index in engine_indexes}

    def _register_histograms(
        self, histogram: Callable[[str, str, list[float] | list[int]], Histogram], max_model_len: int | None
    ) -> None:
        token_buckets = build_1_2_5_buckets(max_model_len or 1 << 20)
        self.histogram_num_prompt_tokens_request = histogram(
            "request_prompt_tokens", "Prompt tokens per finished request.", token_buckets
        )
        self.histogram_num_generation_tokens_request = histogram(
            "request_generation_tokens", "Generated tokens per finished request.", token_buckets
        )
        self.histogram_iteration_tokens = histogram(
            "iteration_tokens_total", "Tokens per engine step that produced outputs.",
            [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384],
        )  # fmt: skip
        self.histogram_time_to_first_token = histogram(
            "time_to_first_token_seconds", "Time from arrival to the first generated token.", _TTFT_BUCKETS
        )
        self.histogram_inter_token_latency = histogram(
            "inter_token_latency_seconds", "Time between consecutive outputs of a request.", _ITL_BUCKETS
        )
        self.histogram_time_per_output_token_request = histogram(
            "request_time_per_output_token_seconds",
            "Mean time per output token after the first, per request.",
            _ITL_BUCKETS,
        )
        self.histogram_e2e_time_request = histogram(
            "e2e_request_latency_seconds", "Time from arrival to finish.", _REQUEST_LATENCY_BUCKETS
        )
        self.histogram_queue_time_request = histogram(
            "request_queue_time_seconds", "Time from arrival to first scheduling.", _REQUEST_LATENCY_BUCKETS
        )
        self.histogram_inference_time_request = histogram(
            "request_inference_time_seconds", "Time from first scheduling to finish.", _REQUEST_LATENCY_BUCKETS
        )
        self.histogram_prefill_time_request = histogram(
            "request_prefill_time_seconds", "Time from first scheduling to the first token.", _REQUEST_LATENCY_BUCKETS
        )
        self.histogram_decode_time_request = histogram(
            "request_decode_time_seconds", "Time from the first token to finish.", _REQUEST_LATENCY_BUCKETS
        )

    def _make_children(self, engine_index: int) -> SimpleNamespace:
        labels = (self.model_name, str(engine_index))
        children = SimpleNamespace(
            running=self.gauge_scheduler_running.labels(*labels),
            waiting=self.gauge_scheduler_waiting.labels(*labels),
            kv_usage=self.gauge_kv_cache_usage.labels(*labels),
            prefix_queries=self.counter_prefix_cache_queries.labels(*labels),
            prefix_hits=self.counter_prefix_cache_hits.labels(*labels),
            preemptions=self.counter_num_preemptions.labels(*labels),
            prompt_tokens=self.counter_prompt_tokens.labels(*labels),
            generation_tokens=self.counter_generation_tokens.labels(*labels),
            iteration_tokens=self.histogram_iteration_tokens.labels(*labels),
            request_prompt_tokens=self.histogram_num_prompt_tokens_request.labels(*labels),
            request_generation_tokens=self.histogram_num_generation_tokens_request.labels(*labels),
            ttft=self.histogram_time_to_first_token.labels(*labels),
            itl=self.histogram_inter_token_latency.labels(*labels),
            tpot=self.histogram_time_per_output_token_request.labels(*labels),
            e2e=self.histogram_e2e_time_request.labels(*labels),
            queue=self.histogram_queue_time_request.labels(*labels),
            inference=self.histogram_inference_time_request.labels(*labels),
            prefill=self.histogram_prefill_time_request.labels(*labels),
            decode=self.histogram_decode_time_request.labels(*labels),
            success={
                reason: self.counter_request_success.labels(*labels, reason)
                for reason in ("stop", "length", "abort", "error")
            },
        )
        return children

    def log_engine_initialized(self, config: EngineConfig) -> None:
        """Exports the cache configuration once the engine has sized the KV cache."""
        cache_config = config.cache_config
        info = {
            "block_size": str(cache_config.block_size),
            "num_gpu_blocks": str(cache_config.num_gpu_blocks),
            "enable_prefix_caching": str(cache_config.enable_prefix_caching),
        }
        if self.gauge_cache_config_info is None:
            self.gauge_cache_config_info = Gauge(
                METRIC_PREFIX + "cache_config_info",
                "Information of the KV cache configuration.",
                list(info),
                registry=self.registry,
            )
        self.gauge_cache_config_info.labels(**info).set(1)
        if config.lora_config is not None and self.gauge_lora_info is None:
            self.max_lora = config.lora_config.max_loras
            self.gauge_lora_info = Gauge(
                METRIC_PREFIX + "lora_requests_info",
                "Running stats on lora requests.",
                ["max_lora", "waiting_lora_adapters", "running_lora_adapters"],
                registry=self.registry,
                multiprocess_mode="livemostrecent",
            )
        if config.speculative_config is not None:
            self._register_spec_decode_metrics()

    def _record_lora_info(self, stats: SchedulerStats) -> None:
        assert self.gauge_lora_info is not None
        # NOTE: one series, the newest: vLLM keeps a series per label set ever seen, which grows
        # with every mix of adapters; the newest timestamp is what dashboards read either way.
        self.gauge_lora_info.clear()
        self.gauge_lora_info.labels(
            max_lora=str(self.max_lora),
            waiting_lora_adapters=",".join(sorted(stats.waiting_lora_adapters)),
            running_lora_adapters=",".join(sorted(stats.running_lora_adapters)),
        ).set_to_current_time()

    def _register_spec_decode_metrics(self) -> SimpleNamespace:
        if self.counter_spec_decode is None:
            labels = ["model_name", "engine"]

            def counter(name: str, doc: str, extra_labels: tuple[str, ...] = ()) -> Counter:
                return Counter(METRIC_PREFIX + name, doc, labels + list(extra_labels), registry=self.registry)

            def histogram(name: str, doc: str) -> Histogram:
                return Histogram(METRIC_PREFIX + name, doc, labels, buckets=_SPEC_STEP_BUCKETS, registry=self.registry)

            self.counter_spec_decode = SimpleNamespace(
                draft_time=histogram(
                    "spec_decode_draft_time_seconds", "Time per engine step spent proposing draft tokens."
                ),
                verify_time=histogram(
                    "spec_decode_verify_time_seconds",
                    "Time of an engine step that verified drafts (target forward and rejection sampling).",
                ),
                num_drafts=counter("spec_decode_num_drafts", "Draft sequences verified (speculative decoding)."),
                num_draft_tokens=counter("spec_decode_num_draft_tokens", "Draft tokens verified."),
                num_accepted_tokens=counter("spec_decode_num_accepted_tokens", "Draft tokens accepted."),
                num_accepted_tokens_per_pos=counter(
                    "spec_decode_num_accepted_tokens_per_pos",
                    "Drafts whose token at this position (0-based) was accepted.",
                    ("position",),
                ),
            )
        return self.counter_spec_decode

    def _record_spec_decoding(self, spec: SpecDecodingStats, engine_idx: int) -> None:
        counters = self._register_spec_decode_metrics()
        labels = (self.model_name, str(engine_idx))
        counters.num_drafts.labels(*labels).inc(spec.num_drafts)
        counters.num_draft_tokens.labels(*labels).inc(spec.num_draft_tokens)
        counters.num_accepted_tokens.labels(*labels).inc(spec.num_accepted_tokens)
        for position, count in enumerate(spec.num_accepted_tokens_per_pos):
            counters.num_accepted_tokens_per_pos.labels(*labels, str(position)).inc(count)
        # Stats come one engine step at a time: the mean is that step's time.
        if spec.num_draft_steps:
            counters.draft_time.labels(*labels).observe(spec.mean_draft_time_s)
        if spec.num_verify_steps:
            counters.verify_time.labels(*labels).observe(spec.mean_verify_time_s)

    def record(
        self, scheduler_stats: SchedulerStats | None, iteration_stats: IterationStats, engine_idx: int = 0
    ) -> None:
        m = self._engines.get(engine_idx)
        if m is None:
            m = self._engines[engine_idx] = self._make_children(engine_idx)
        if scheduler_stats is not None:
            m.running.set(scheduler_stats.num_running_reqs)
            m.waiting.set(scheduler_stats.num_waiting_reqs)
            m.kv_usage.set(scheduler_stats.kv_cache_usage)
            m.prefix_queries.inc(scheduler_stats.prefix_cache_queries)
            m.prefix_hits.inc(scheduler_stats.prefix_cache_hits)
            m.preemptions.inc(scheduler_stats.num_preemptions)
            if self.gauge_lora_info is not None:
                self._record_lora_info(scheduler_stats)
            if scheduler_stats.spec_decoding_stats is not None:
                self._record_spec_decoding(scheduler_stats.spec_decoding_stats, engine_idx)

        m.prompt_tokens.inc(iteration_stats.num_prompt_tokens)
        m.generation_tokens.inc(iteration_stats.num_generation_tokens)
        num_step_tokens = iteration_stats.num_prompt_tokens + iteration_stats.num_generation_tokens
        if num_step_tokens:
            m.iteration_tokens.observe(num_step_tokens)

        for finished in iteration_stats.finished_requests:
            m.success[str(finished.finish_reason)].inc()
            m.request_prompt_tokens.observe(finished.num_prompt_tokens)
            m.request_generation_tokens.observe(finished.num_generation_tokens)
            metrics = finished.metrics
            for latency in metrics.inter_token_latencies:
                m.itl.observe(latency)
            if (ttft := metrics.time_to_first_token) is not None:
                m.ttft.observe(ttft)
            if (e2e := metrics.e2e_latency) is not None:
                m.e2e.observe(e2e)
            first_token, last_token = metrics.first_token_time, metrics.last_token_time
            if first_token is not None and last_token is not None and finished.num_generation_tokens > 1:
                m.tpot.observe((last_token - first_token) / (finished.num_generation_tokens - 1))
            if first_token is not None and metrics.finished_time is not None:
                m.decode.observe(metrics.finished_time - first_token)
            scheduled = metrics.first_scheduled_time
            if scheduled is not None:
                m.queue.observe(scheduled - metrics.arrival_time)
                if metrics.finished_time is not None:
                    m.inference.observe(metrics.finished_time - scheduled)
                if first_token is not None:
                    m.prefill.observe(first_token - scheduled)
