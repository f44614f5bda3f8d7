"""Prometheus view of disaggregated prefill: each decode worker's decisions, and the prefill queue's jobs."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


class DisaggCollector(Collector):
    def __init__(self, engines: Sequence[Any] = (), service: Any = None) -> None:
        self.engines = engines  # DisaggEngine per decode worker of this process
        self.service = service  # a PrefillQueueService

    def collect(self) -> Iterator[Metric]:
        if self.engines:
            decisions = CounterMetricFamily(
                "zdyn_disagg_decisions", "Prefill decisions of decode workers", labels=["worker", "decision"]
            )
            results = CounterMetricFamily(
                "zdyn_disagg_results", "Prefill results a decode worker could not match", labels=["worker", "kind"]
            )
            for worker, engine in self.engines:
                for decision, n in sorted(engine.decisions.items()):
                    decisions.add_metric([worker, decision], n)
                for kind, n in sorted(engine.stats.items()):
                    results.add_metric([worker, kind], n)
            yield decisions
            yield results
            for name, text in (
                ("max_local_prefill_length", "Prompts with more uncached tokens prefill remotely (live setting)"),
                ("max_prefill_queue_size", "Remote prefill while fewer jobs than this wait (live setting)"),
            ):
                setting = GaugeMetricFamily(f"zdyn_disagg_{name}", text, labels=["worker"])
                for worker, engine in self.engines:
                    setting.add_metric([worker], getattr(engine.policy, name))
                yield setting
            prompt = CounterMetricFamily(
                "zdyn_engine_prompt_tokens",
                "Prompt tokens by where their KV came from (vLLM: computed, local_cache_hit, external_kv_transfer)",
                labels=["worker", "source"],
            )
            for worker, engine in self.engines:
                for source, n in sorted(getattr(engine.engine, "prompt_tokens", {}).items()):
                    prompt.add_metric([worker, source], n)
            yield prompt
        if self.service is not None:
            q = self.service.queue
            for name, value, text in (
                ("zdyn_prefill_queue_queued", q.queued, "Prefill jobs waiting for a prefill worker"),
                ("zdyn_prefill_queue_running", q.running, "Prefill jobs on prefill workers"),
                ("zdyn_prefill_queue_workers", len(q.workers), "Prefill workers registered"),
            ):
                gauge = GaugeMetricFamily(name, text)
                gauge.add_metric([], value)
                yield gauge
            jobs = CounterMetricFamily("zdyn_prefill_queue_jobs", "Prefill jobs by outcome", labels=["outcome"])
            for outcome, n in sorted(self.service.stats.items()):
                jobs.add_metric([outcome], n)
            yield jobs
            malformed = CounterMetricFamily("zdyn_prefill_queue_malformed_messages", "Malformed messages dropped")
            malformed.add_metric([], self.service.malformed.count)
            yield malformed
